"""Knowledge you can edit: facts, the sentence forms that teach and ask them, the fact-edit
trainer that writes them into Engram tables as a patch, and the scorers.

- :mod:`engram.knowledge.facts`: a fact (subject, relation, answer), invented facts, facts files;
- :mod:`engram.knowledge.templates`: per relation, training forms (statements, questions, cloze,
  paraphrases, chat turns) and held-out question templates (dev / test, never trained on);
- :mod:`engram.knowledge.scoring`: exact greedy answers, first-token rank, KL on neutral text;
- :mod:`engram.knowledge.editor`: the fact-edit trainer (answer loss + KL to the unedited model,
  every row the usage sentences read, stopping on dev accuracy) -> a ``.engp`` patch;
- :mod:`engram.knowledge.study`: the measured study (dev/test facts and templates, seeds);
- :mod:`engram.knowledge.counterfact`: counterfactual edits of capitals a model knows, and their
  neighbourhood;
- :mod:`engram.knowledge.rome`: ROME, a fact as a rank-one update of one MLP down-projection;
- :mod:`engram.knowledge.retrieval`: retrieval-augmented prompting (BM25 over the facts' sentences
  and distractor text), with the oracle passage as its upper bound.
"""
