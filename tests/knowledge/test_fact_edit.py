"""The fact-edit trainer on the tiny Engram model: it teaches, touches only the rows its sentences
read, leaves the model as it was, and its patch applies and reverts bit for bit."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from engram.knowledge.editor import FactEditConfig, FactEditError, coverage, edit_facts, trained_rows
from engram.knowledge.facts import Fact, FactsFileError, invent_facts, read_facts
from engram.knowledge.scoring import fact_cases, score
from engram.knowledge.templates import KINDS, RELATIONS, bank, chat_format, templates
from engram.patches.apply import apply_to_model, revert_from_model


def test_held_out_questions_are_never_training_sentences():
    for rel, splits in bank().items():
        train = [t.text for t in splits["train"]] + [t.user or "" for t in splits["train"]]
        assert {t.kind for t in splits["train"]} == set(KINDS), rel
        for split in ("dev", "test"):
            assert splits[split], (rel, split)
            for t in splits[split]:
                head = t.text.split("{A}")[0]
                assert all(head not in s and not s.startswith(head) for s in train), (rel, t.text)
        assert not {t.text for t in splits["dev"]} & {t.text for t in splits["test"]}


def test_facts_file_triples_marked_sentences_and_errors(tmp_path):
    p = tmp_path / "facts.jsonl"
    p.write_text(json.dumps({"subject": "Zorvia", "relation": "capital", "answer": "Blenmar"}) + "\n\n"
                 + json.dumps({"text": "The flag of Zorvia is [[green]].", "subject": "Zorvia"}) + "\n")
    facts, marked = read_facts(p)
    assert facts == [Fact("Zorvia", "capital", "Blenmar")]
    assert (marked[0].prompt, marked[0].answer, marked[0].tail) == ("The flag of Zorvia is", "green", ".")
    bad = tmp_path / "bad.jsonl"
    for line, msg in ((json.dumps({"subject": "A", "relation": "mayor", "answer": "B"}), "no templates"),
                      (json.dumps({"text": "no marks here"}), "mark the answer"),
                      ("{oops", "not JSON"),
                      (json.dumps({"subject": "A"}), "missing")):
        bad.write_text(line + "\n")
        with pytest.raises(FactsFileError, match=msg):
            read_facts(bad)


def test_invented_names_are_fresh_and_unique():
    facts = invent_facts(40, seed=3, forbidden="Zorvia the cat")
    names = [f.subject for f in facts] + [f.answer for f in facts]
    assert len(set(names)) == len(names)
    assert invent_facts(40, seed=3, forbidden="Zorvia the cat") == facts
    assert {f.relation for f in facts} == set(RELATIONS)


def test_edit_teaches_only_its_rows_and_reverts_bit_for_bit(world, one_thread):
    model, tok = world
    facts = invent_facts(4, seed=0, relations=("capital",))
    chat = chat_format(tok)
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement", "cloze")), chat, True)
    asked = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement",)), chat)
    before_tables = {e.layer_id: e.table.weight.detach().clone() for e in model.engram_layers}
    x = torch.tensor([train[0].ids])
    logits_before = model(x).logits
    exact_before = score(model, asked, 0)["exact"]
    res = edit_facts(model, tok, train, FactEditConfig(lr=0.3, steps=100, batch_size=8, neutral_windows=2,
                                                       neutral_len=16, kl_weight=0.1, neutral_kl_weight=0.1,
                                                       patience=100),
                     dev_cases=asked, progress=False)
    # the model is left as it was, bit for bit
    for e in model.engram_layers:
        assert torch.equal(e.table.weight, before_tables[e.layer_id])
    assert res.report["answer_loss_last"] < 0.85 * res.report["answer_loss_first"]
    # the patch writes only rows the training sentences read
    rows = trained_rows(res.patch)
    from engram.knowledge.editor import rows_read
    read = {lid: torch.cat([rows_read(model, torch.tensor([c.ids]))[lid] for c in train]).unique() for lid in rows}
    for lid, r in rows.items():
        assert r.numel() > 0 and bool(torch.isin(r, read[lid]).all())
    assert coverage(model, asked, rows)["questions_all"] == 1.0  # the asked forms are trained forms here
    apply_to_model(model, res.patch)
    after = score(model, asked, 0)["exact"]
    assert after == res.report["best_dev_exact"] > exact_before  # the kept rows are the best dev rows
    revert_from_model(model, res.patch)
    assert torch.equal(model(x).logits, logits_before)


def test_an_adapter_with_a_zero_value_projection_is_refused(world):
    model, tok = world
    facts = invent_facts(1, seed=0)
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train"), chat_format(tok), True)
    e = model.engram_layers[0]
    w = e.value_proj.weight.detach().clone()
    with torch.no_grad():
        e.value_proj.weight.zero_()
    try:
        with pytest.raises(FactEditError, match="value projection is all zero"):
            edit_facts(model, tok, train, FactEditConfig(steps=1), progress=False)
    finally:
        with torch.no_grad():
            e.value_proj.weight.copy_(w)
    with pytest.raises(FactEditError, match="lr=0"):
        FactEditConfig(lr=0)


def test_patch_train_facts_command_writes_a_patch_that_applies(tiny, tmp_path, capsys, one_thread):
    from engram.cli.main import main
    from engram.patches.patchfile import load_patch

    data = tiny.dataset(tmp_path / "data")
    tiny.save_run(tmp_path / "run", data)
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps({"subject": f.subject, "relation": f.relation, "answer": f.answer})
                               for f in invent_facts(2, seed=1)) + "\n"
                     + json.dumps({"text": "The flag of Zorvia is [[red]]."}) + "\n")
    out = tmp_path / "facts.engp"
    assert main(["patch", "train", "--ckpt", str(tmp_path / "run"), "--facts", str(facts), "--out", str(out),
                 "--edit-steps", "4", "--edit-eval-every", "2", "--edit-neutral-windows", "2",
                 "--edit-neutral-len", "16", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "2 facts + 1 sentences" in text and "held-out questions" in text
    patch = load_patch(out)
    assert patch.meta["provenance"]["trainer"] == "fact-edit" and sum(lp.rows.numel() for lp in patch.layers.values())
    assert main(["knowledge", "ask", "--ckpt", str(tmp_path / "run"), "--facts", str(facts), "--patch", str(out),
                 "--json", "--quiet"]) == 0
    asked = json.loads(capsys.readouterr().out)
    assert set(asked) == {"train", "dev", "test"} and asked["test"]["n"] > 0
    # exactly one of --data / --facts
    assert main(["patch", "train", "--ckpt", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert "exactly one of --data" in capsys.readouterr().err
    # keyed entries: a keyed patch, asked through the model, refused by a table file with a one-line reason
    keyed = tmp_path / "keyed.engp"
    assert main(["patch", "train", "--ckpt", str(tmp_path / "run"), "--facts", str(facts), "--out", str(keyed),
                 "--edit-steps", "4", "--edit-eval-every", "2", "--edit-neutral-windows", "2",
                 "--edit-neutral-len", "16", "--edit-keyed", "--quiet"]) == 0
    assert "keyed entries" in capsys.readouterr().out and load_patch(keyed).keyed
    assert main(["patch", "info", str(keyed)]) == 0 and "N-gram-keyed entries" in capsys.readouterr().out
    assert main(["knowledge", "ask", "--ckpt", str(tmp_path / "run"), "--facts", str(facts), "--patch", str(keyed),
                 "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["n"] > 0
    table = tmp_path / "t.engt"
    assert main(["table", "convert", str(tmp_path / "run"), str(table), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["patch", "apply", str(table), str(keyed)]) != 0
    err = capsys.readouterr().err
    assert "is keyed" in err and "Traceback" not in err


def test_every_form_tokenises_with_the_answer_on_a_token_boundary(world):
    _, tok = world
    facts = invent_facts(8, seed=5)
    chat = chat_format(tok)
    for split in ("train", "dev", "test"):
        cases = fact_cases(tok, facts, lambda f: templates(f.relation, split), chat, with_tail=True)
        assert len(cases) == sum(len(templates(f.relation, split)) for f in facts), split
        assert all(c.subject_pos and c.answer_ids for c in cases)


def test_topk_kl_is_the_full_kl_when_it_keeps_every_token_and_a_lower_bound_otherwise():
    from engram.knowledge.editor import _kl, _kl_topk

    torch.manual_seed(0)
    logits, base = torch.randn(2, 5, 30), torch.randn(2, 5, 30)
    base_lp = torch.log_softmax(base, -1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    full = _kl(logits, base_lp, mask)
    for k, exact in ((30, True), (6, False)):
        top = base_lp[mask].topk(k, -1)
        approx = _kl_topk(logits, mask, top.indices, top.values)
        if exact:
            assert torch.allclose(approx, full, atol=1e-5)
        else:
            assert 0 < float(approx) < float(full)


def test_epoch_batches_visit_every_sentence_once_with_little_padding():
    import numpy as np

    from engram.knowledge.editor import epoch_batches

    lengths = list(np.random.default_rng(0).integers(5, 40, size=203))
    batches = epoch_batches(lengths, 16, np.random.default_rng(1))
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert all(len(b) <= 16 for b in batches)
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 10  # random batches of 16 from 5..39 spread ~30


def test_subject_rows_edit_trains_only_subject_and_answer_rows(world, one_thread):
    from engram.knowledge.editor import rows_read, rows_to_train

    model, tok = world
    facts = invent_facts(3, seed=1, relations=("capital",))
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement", "question")),
                       chat_format(tok), True)
    every = rows_to_train(model, train, "all")
    own = rows_to_train(model, train, "subject")
    for lid in every:
        assert torch.equal(every[lid], torch.cat([rows_read(model, torch.tensor([c.ids]))[lid] for c in train]).unique())
        assert bool(torch.isin(own[lid], every[lid]).all()) and own[lid].numel() < every[lid].numel()
    res = edit_facts(model, tok, train, FactEditConfig(lr=0.3, steps=4, batch_size=8, neutral_windows=2,
                                                       neutral_len=16, rows="subject"), progress=False)
    for lid, r in trained_rows(res.patch).items():
        assert bool(torch.isin(r, own[lid]).all())


def test_cached_topk_kl_trains_like_the_full_reference(world, one_thread):
    """The base's distribution kept as its top-k (all tokens here) gives the reference's patch."""
    model, tok = world
    facts = invent_facts(2, seed=2, relations=("capital",))
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement",)), chat_format(tok), True)
    V = model(torch.tensor([train[0].ids])).logits.shape[-1]
    cfg = dict(lr=0.1, steps=3, batch_size=4, neutral_windows=2, neutral_len=16, kl_weight=1.0)
    ref = edit_facts(model, tok, train, FactEditConfig(kl_topk=0, **cfg), progress=False)
    fast = edit_facts(model, tok, train, FactEditConfig(kl_topk=V, **cfg), progress=False)
    for lid, lp in ref.patch.layers.items():
        assert torch.equal(lp.rows, fast.patch.layers[lid].rows)
        assert torch.allclose(lp.new.float(), fast.patch.layers[lid].new.float(), atol=1e-4)
    with pytest.raises(FactEditError, match="rows="):
        FactEditConfig(rows="everything")


def test_scoring_in_length_sorted_batches_matches_one_case_at_a_time(world, one_thread):
    model, tok = world
    facts = invent_facts(4, seed=5)
    cases = [c for c in fact_cases(tok, facts, lambda f: templates(f.relation, "train"), chat_format(tok))
             if len(c.ids) <= model.cfg.max_seq_len]
    assert len({len(c.ids) for c in cases}) > 3  # lengths differ, so sorting reorders
    batched = score(model, cases, 0, batch_size=8)
    alone = [score(model, [c], 0) for c in cases]
    assert batched["per_case_exact"] == [a["per_case_exact"][0] for a in alone]
    assert batched["answer_nll"] == pytest.approx(sum(a["answer_nll"] for a in alone) / len(cases), rel=1e-4)


def test_keyed_edit_teaches_leaves_other_ngrams_alone_and_reverts(world, one_thread, tmp_path):
    """A keyed edit trains one entry per (head, N-gram) its sentences read; text whose N-grams
    only share hashed rows with them reads the table as before; apply installs, revert removes."""
    from engram.knowledge.editor import keys_to_train
    from engram.patches.patchfile import load_patch, save_patch

    model, tok = world
    facts = invent_facts(4, seed=0, relations=("capital",))
    chat = chat_format(tok)
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement", "cloze")), chat, True)
    asked = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement",)), chat)
    x = torch.tensor([train[0].ids])
    logits_before = model(x).logits
    exact_before = score(model, asked, 0)["exact"]
    cfg = FactEditConfig(lr=0.3, steps=100, batch_size=8, neutral_windows=2, neutral_len=16, kl_weight=0.1,
                         neutral_kl_weight=0.1, patience=100, rows="all", keyed=True)
    res = edit_facts(model, tok, train, cfg, dev_cases=asked, progress=False)
    assert res.patch.keyed and res.report["answer_loss_last"] < 0.85 * res.report["answer_loss_first"]
    assert torch.equal(model(x).logits, logits_before)  # nothing installed after training
    want = keys_to_train(model, train, "all")
    for lid, lp in res.patch.layers.items():
        assert bool(torch.isin(lp.keys, want[lid][0]).all()) and lp.keys.numel() > 0
    assert coverage(model, asked, trained_rows(res.patch), keyed=True)["questions_all"] == 1.0
    p = load_patch(save_patch(res.patch, tmp_path / "k.engp"))
    assert p.keyed and p.patch_id == res.patch.patch_id
    # a sequence reading exactly the trained rows at one head but other N-grams elsewhere: made by
    # hand, a position whose rows equal a trained entry's on one head only reads the table there
    e = model.engram_layers[0]
    hid = model.compute_hash_ids(x)[e.layer_id]  # [1, T, H]
    other = hid.clone()
    other[..., 1:] = (other[..., 1:] + 1) % torch.tensor(e.multi_head_embedding.head_sizes[1:])
    apply_to_model(model, p)
    assert score(model, asked, 0)["exact"] == res.report["best_dev_exact"] > exact_before
    plain = e.multi_head_embedding.embedding(e.multi_head_embedding.rows(other))
    assert torch.equal(e.multi_head_embedding(other), plain)  # same head-0 rows, other N-grams: untouched
    assert not torch.equal(e.multi_head_embedding(hid), e.multi_head_embedding.embedding(e.multi_head_embedding.rows(hid)))
    revert_from_model(model, p)
    assert torch.equal(model(x).logits, logits_before) and not e.multi_head_embedding.installed


def test_keyed_edit_skipping_unread_neutral_windows_gives_the_reference_kl_and_gradient(world, one_thread):
    """The neutral windows that read no trained entry have a KL of 0 (the edited model computes
    them as the unedited one): skipping their forward gives the KL and the gradient of the
    reference that computes every window."""
    from engram.knowledge.editor import _Keyed, _neutral_kl, _windows_reading, keys_to_train, windows_topk
    from engram.knowledge.scoring import neutral_windows

    model, tok = world
    facts = invent_facts(3, seed=2, relations=("capital",))
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement", "cloze")), chat_format(tok), True)
    e = model.engram_layers[0]
    keys, rows = keys_to_train(model, train, "subject")[e.layer_id]
    held = {e.layer_id: _Keyed(e.multi_head_embedding, e.table.weight, keys, rows)}
    with torch.no_grad():
        held[e.layer_id].delta.normal_()
    neutral = neutral_windows(tok, "train", 16, 16)
    top = windows_topk(model, neutral, 8)
    reads = _windows_reading(model, neutral, held)
    assert 0 < int(reads.sum()) < len(neutral)  # some windows read an entry, some do not

    def fwd(x):
        return model(x, patches=[{lid: h.overlay() for lid, h in held.items()}]).logits

    for k in range(0, len(neutral), 2):
        sel = torch.arange(k, k + 2)
        got = [_neutral_kl(fwd, neutral, sel, top, None, r) for r in (reads, None)]
        if got[0] is None:  # both skipped: the reference's KL is 0 up to rounding, its gradient exactly 0
            assert not bool(reads[sel].any()) and float(got[1].detach()) < 1e-6
            got[1].backward()
            assert held[e.layer_id].delta.grad is None or not bool(held[e.layer_id].delta.grad.any())
            continue
        grads = []
        for g in got:
            held[e.layer_id].delta.grad = None
            g.backward()
            grads.append(held[e.layer_id].delta.grad.clone())
        assert torch.allclose(got[0], got[1], rtol=1e-5, atol=1e-7)
        assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_keyed_edit_skipping_unread_windows_top_k_gives_the_reference_patch(world, one_thread):
    """Skipping the unread neutral windows (their forward and their cached top-k) trains the
    same entries to the same values as computing every window."""
    model, tok = world
    facts = invent_facts(3, seed=2, relations=("capital",))
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement", "cloze")), chat_format(tok), True)
    cfg = FactEditConfig(lr=0.1, steps=4, batch_size=4, neutral_windows=8, neutral_len=16, keyed=True)
    fast = edit_facts(model, tok, train, cfg, progress=False)
    ref = edit_facts(model, tok, train, cfg, progress=False, skip_unread_neutral=False)
    assert 0 < fast.report["neutral_windows_reading_edit"] < 8
    for lid, lp in ref.patch.layers.items():
        assert torch.equal(lp.keys, fast.patch.layers[lid].keys)
        assert torch.allclose(lp.new.float(), fast.patch.layers[lid].new.float(), atol=1e-5)


def test_bf16_autocast_keeps_the_unedited_kl_at_zero_and_teaches(world, one_thread):
    """The unedited model's cached distribution is computed at the training precision: bf16
    rounding alone then gives a KL of 0, where a float32 cache would show a KL floor; a bf16
    edit still teaches and writes a float32 patch."""
    from engram.knowledge.editor import _autocast, _kl_topk, windows_topk
    from engram.knowledge.scoring import neutral_windows

    model, tok = world
    w = neutral_windows(tok, "train", 4, 16)
    bf16, fp32 = FactEditConfig(autocast="bf16"), FactEditConfig()
    V = model(w[:1]).logits.shape[-1]
    everywhere = torch.ones(w.shape, dtype=torch.bool)
    kls = {}
    for cache_cfg in (bf16, fp32):
        with _autocast(cache_cfg):
            ids, lps = windows_topk(model, w, V)
        with torch.no_grad(), _autocast(bf16):
            kls[cache_cfg.autocast] = float(_kl_topk(model(w).logits, everywhere, ids.flatten(0, 1), lps.flatten(0, 1)))
    assert kls["bf16"] < 1e-9 < kls["off"]
    facts = invent_facts(2, seed=4, relations=("capital",))
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement",)), chat_format(tok), True)
    cfg = dict(lr=0.3, steps=30, batch_size=4, neutral_windows=2, neutral_len=16)
    ref = edit_facts(model, tok, train, FactEditConfig(**cfg), progress=False)
    res = edit_facts(model, tok, train, FactEditConfig(autocast="bf16", **cfg), progress=False)
    assert res.report["answer_loss_last"] < 0.85 * res.report["answer_loss_first"]
    assert res.report["answer_loss_last"] == pytest.approx(ref.report["answer_loss_last"], rel=0.02)  # as float32 does
    assert all(lp.new.dtype == torch.float32 for lp in res.patch.layers.values())
    with pytest.raises(FactEditError, match="autocast="):
        FactEditConfig(autocast="fp16")


def test_a_gradient_left_on_the_model_neither_enters_the_edit_nor_is_lost(world, one_thread):
    """A dense gradient on a table from earlier use of the model would be added to the edit's
    first step: the edit holds it aside, trains as without it, and puts it back."""
    model, tok = world
    facts = invent_facts(2, seed=6, relations=("capital",))
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement",)), chat_format(tok), True)
    cfg = FactEditConfig(lr=0.1, steps=2, batch_size=4, neutral_windows=2, neutral_len=16)
    clean = edit_facts(model, tok, train, cfg, progress=False)
    w = model.engram_layers[0].table.weight
    stale = torch.ones_like(w)
    w.grad = stale
    try:
        dirty = edit_facts(model, tok, train, cfg, progress=False)
        assert w.grad is stale
    finally:
        w.grad = None
    for lid, lp in clean.patch.layers.items():
        assert torch.equal(lp.new, dirty.patch.layers[lid].new)


def test_dev_question_sample_is_fixed_and_leaves_training_as_it_was(world, one_thread):
    """``dev_questions`` scores a fixed sample of the dev questions; the batches, and so the
    training losses, are those of the edit that scores every dev question."""
    model, tok = world
    facts = invent_facts(4, seed=0, relations=("capital",))
    chat = chat_format(tok)
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement", "cloze")), chat, True)
    asked = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement", "cloze")), chat)
    cfg = FactEditConfig(lr=0.3, steps=10, batch_size=4, neutral_windows=2, neutral_len=16, eval_every=5, patience=100)
    every = edit_facts(model, tok, train, cfg, dev_cases=asked, progress=False).report
    some = edit_facts(model, tok, train, replace(cfg, dev_questions=3), dev_cases=asked, progress=False).report
    assert (every["dev_questions_given"], every["dev_questions_scored"]) == (len(asked), len(asked)) and len(asked) > 3
    assert (some["dev_questions_given"], some["dev_questions_scored"]) == (len(asked), 3)
    assert all(round(h["dev_exact"] * 3, 6) == round(h["dev_exact"] * 3) for h in some["history"])
    assert [h["answer_loss"] for h in some["history"]] == pytest.approx([h["answer_loss"] for h in every["history"]])
    with pytest.raises(FactEditError, match="dev_questions=-1"):
        FactEditConfig(dev_questions=-1)


def test_time_budget_stops_after_one_more_dev_evaluation_and_keeps_the_best_step(world, one_thread):
    """``max_seconds`` ends training at the first step past the budget, scores the dev questions
    there (off the ``eval_every`` grid) and reports why it stopped; without it the cap ends it."""
    model, tok = world
    facts = invent_facts(4, seed=0, relations=("capital",))
    chat = chat_format(tok)
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement",)), chat, True)
    asked = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement",)), chat)
    cfg = FactEditConfig(lr=0.3, steps=6, batch_size=4, neutral_windows=2, neutral_len=16, eval_every=5, patience=100)
    capped = edit_facts(model, tok, train, cfg, dev_cases=asked, progress=False).report
    assert (capped["stopped"], capped["steps_run"], [h["step"] for h in capped["history"]]) == ("steps", 6, [5, 6])
    timed = edit_facts(model, tok, train, replace(cfg, max_seconds=1e-9), dev_cases=asked, progress=False).report
    assert (timed["stopped"], timed["steps_run"], [h["step"] for h in timed["history"]]) == ("time", 1, [1])
    assert timed["best_step"] == 1 and timed["best_dev_exact"] == timed["history"][0]["dev_exact"]
    with pytest.raises(FactEditError, match="max_seconds=-1"):
        FactEditConfig(max_seconds=-1)


def test_bf16_weight_copies_give_autocasts_patch_bit_for_bit(world, one_thread):
    """bfloat16 copies of the frozen weights hold the values autocast's per-call casts give: the
    edit trains the same entries to the same values, and every weight is float32 again after."""
    model, tok = world
    facts = invent_facts(3, seed=5, relations=("capital",))
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement", "cloze")), chat_format(tok), True)
    before = {n: (p.dtype, p.detach().clone()) for n, p in model.named_parameters()}
    for keyed in (True, False):
        cfg = FactEditConfig(lr=0.1, steps=4, batch_size=4, neutral_windows=4, neutral_len=16, keyed=keyed,
                             autocast="bf16")
        fast = edit_facts(model, tok, train, cfg, progress=False)
        ref = edit_facts(model, tok, train, cfg, progress=False, bf16_copies=False)
        assert fast.report["answer_loss_first"] == ref.report["answer_loss_first"]
        assert fast.report["answer_loss_last"] == ref.report["answer_loss_last"]
        for lid, lp in ref.patch.layers.items():
            assert torch.equal(lp.new, fast.patch.layers[lid].new)
    for n, p in model.named_parameters():
        assert p.dtype == before[n][0] and torch.equal(p.detach(), before[n][1]), n
    from engram.knowledge.editor import _Bf16Weights
    copies = _Bf16Weights(model, {id(model.lm_head.weight)})
    with copies.active():  # the copies stand in for every frozen Linear but those that train
        assert model.lm_head.weight.dtype == torch.float32 and len(copies.swaps) > 1
        assert all(m.weight.dtype == torch.bfloat16 for m, *_ in copies.swaps)


def test_output_head_from_the_first_read_on_gives_the_reference_patch(world, one_thread):
    """Running the output head and the KL only from each sentence's and window's first position
    that reads the edit trains the same entries (keyed) and rows (hashed) to the same values as
    computing every position: the positions before it compute as unedited."""
    from engram.knowledge.editor import _first_reads, keys_to_train

    model, tok = world
    facts = invent_facts(3, seed=8, relations=("capital", "teacher"))
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement", "question", "usage")),
                       chat_format(tok), True)
    for keyed in (True, False):
        cfg = FactEditConfig(lr=0.1, steps=5, batch_size=4, neutral_windows=6, neutral_len=16, keyed=keyed)
        fast = edit_facts(model, tok, train, cfg, progress=False)
        ref = edit_facts(model, tok, train, cfg, progress=False, skip_unaffected=False)
        assert fast.report["answer_loss_first"] == pytest.approx(ref.report["answer_loss_first"], rel=1e-5)
        for lid, lp in ref.patch.layers.items():
            assert torch.equal(lp.rows, fast.patch.layers[lid].rows)
            assert torch.allclose(lp.new.float(), fast.patch.layers[lid].new.float(), atol=1e-5)
    # the skip is real: some sentences read the edit only after their first positions
    held = {lid: SimpleNamespace(keys=k) for lid, (k, _) in keys_to_train(model, train, "subject").items()}
    first = torch.cat([_first_reads(model, torch.tensor([c.ids]), held, True) for c in train])
    assert bool((first > 0).any()) and bool((first < torch.tensor([len(c.ids) for c in train])).all())


def test_measure_edit_can_score_a_fixed_sample_of_the_training_forms(world, one_thread):
    """The study's measure of a large edit may score a sample of the training-form questions; the
    edit and every other measure are those of the full scoring."""
    from engram.knowledge.scoring import logprobs, neutral_windows
    from engram.science.fact_edit import measure_edit

    model, tok = world
    facts = invent_facts(2, seed=0, relations=("capital",))
    neutral = neutral_windows(tok, "eval", 2, 16)
    before = logprobs(model, neutral)
    cfg = FactEditConfig(lr=0.3, steps=4, batch_size=4, neutral_windows=2, neutral_len=16, eval_every=2,
                         kinds=("statement", "cloze"))
    full = measure_edit(model, tok, facts, cfg, neutral, before, 0)
    some = measure_edit(model, tok, facts, cfg, neutral, before, 0, train_forms_questions=3)
    assert full["train_forms_questions"] == full["train_forms_given"] == some["train_forms_given"] > 3
    assert some["train_forms_questions"] == 3 and round(some["train_forms_exact"] * 3, 6) == round(some["train_forms_exact"] * 3)
    assert (some["test_exact"], some["neutral"]) == (full["test_exact"], full["neutral"])
    assert some["reverted_bit_exact"] and full["reverted_bit_exact"]
