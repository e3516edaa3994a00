"""How much other text an edit reaches through the hash: the rows a fact edit trains, and how
often neutral text reads them.

A table patch changes only the rows its sentences read, but each row is shared, through the
hash, by every N-gram that lands on it. With ``R`` rows per head and ``n`` trained rows, an
N-gram of other text reads a trained row in a head with probability about ``n / R``; a token
reads one row per head and N-gram order, so the share of tokens that read at least one edited
row grows fast with the number of facts. Those tokens are where an edit can move the model's
answers on unrelated text (the neutral-text KL). :func:`reach` measures it, before training,
from the rows the trainer would train (:func:`engram.knowledge.editor.rows_to_train`).

It also separates the two causes. A token whose N-gram of some order reads a trained row in
*every* head of that order reads an N-gram the facts' sentences contain (a chance collision in
all K heads at once has probability about (n / R)^K): that reach is the text's, and no table
size removes it. The rest arrives through hash collisions, and a larger table shrinks it.

Shape legend
    T tokens of neutral text   H rows read per token (heads x N-gram orders)
    O N-gram orders            K heads per order (H = O * K, order-major)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from engram.knowledge.editor import rows_to_train
from engram.knowledge.facts import invent_facts
from engram.knowledge.scoring import fact_cases, neutral_text
from engram.knowledge.templates import chat_format, templates


def rows_per_token(model: Any, ids: torch.Tensor, chunk: int = 4096) -> dict[int, torch.Tensor]:
    """{layer_id: [T, H] global rows} that the token sequence ``ids`` [T] reads, per token."""
    out: dict[int, list[torch.Tensor]] = {e.layer_id: [] for e in model.engram_layers}
    for s in range(0, ids.numel(), chunk):  # chunks restart the N-gram history: a few tokens per chunk
        piece = ids[s:s + chunk][None]
        hash_ids = model.compute_hash_ids(piece)
        for e in model.engram_layers:
            out[e.layer_id].append(e.multi_head_embedding.rows(hash_ids[e.layer_id])[0].reshape(piece.shape[1], -1))
    return {lid: torch.cat(r) for lid, r in out.items()}


def reach(model: Any, tokenizer: Any, n_facts: Sequence[int], *, kinds: Sequence[str], rows: str = "subject",
          seed: int = 0, neutral_tokens: int = 50_000) -> list[dict[str, Any]]:
    """Per fact count: the rows an edit of that many invented facts trains (and their share of the
    table), and the share of neutral-text tokens (the measuring half, never trained on) that read
    at least one of them, in any Engram layer."""
    ids = torch.tensor(tokenizer.encode(neutral_text("eval"), add_special_tokens=False).ids[:neutral_tokens])
    read = rows_per_token(model, ids)
    table_rows = {e.layer_id: e.table.weight.shape[0] for e in model.engram_layers}
    chat = chat_format(tokenizer)
    out = []
    for n in n_facts:
        facts = invent_facts(n, seed)
        cases = fact_cases(tokenizer, facts, lambda f: templates(f.relation, "train", kinds), chat, True)
        trained = rows_to_train(model, cases, rows)
        hit_tok = torch.zeros(ids.numel(), dtype=torch.bool)
        key_tok = torch.zeros(ids.numel(), dtype=torch.bool)
        hit_reads, reads = 0, 0
        orders = model.hasher.max_ngram_size - 1
        for lid, r in read.items():
            inside = torch.isin(r, trained[lid])  # [T,H]
            hit_tok |= inside.any(1)
            key_tok |= inside.reshape(r.shape[0], orders, -1).all(-1).any(-1)  # [T,O,K] -> [T]
            hit_reads += int(inside.sum())
            reads += inside.numel()
        out.append({"facts": n, "trained_rows": sum(int(t.numel()) for t in trained.values()),
                    "table_rows": sum(table_rows.values()),
                    "trained_share": sum(int(t.numel()) for t in trained.values()) / sum(table_rows.values()),
                    "neutral_tokens": int(ids.numel()), "tokens_reading_a_trained_row": float(hit_tok.float().mean()),
                    # the same N-gram as the facts' sentences (every head of an order trained)
                    "tokens_reading_a_trained_ngram": float(key_tok.float().mean()),
                    "reads_of_trained_rows": hit_reads / max(1, reads)})
    return out


def reach_table(rows: Sequence[dict[str, Any]]) -> str:
    """:func:`reach`'s rows as a markdown table (rows measured before the N-gram column have a dash)."""
    lines = ["| facts | trained rows | share of the table | neutral tokens reading a trained row | "
             "of which the same N-gram as the facts' sentences | reads of trained rows |", "|---|---|---|---|---|---|"]
    for r in rows:
        key = r.get("tokens_reading_a_trained_ngram")
        lines.append(f"| {r['facts']} | {r['trained_rows']:,} | {100 * r['trained_share']:.2f}% | "
                     f"{100 * r['tokens_reading_a_trained_row']:.1f}% | {'-' if key is None else f'{100 * key:.1f}%'} | "
                     f"{100 * r['reads_of_trained_rows']:.2f}% |")
    return "\n".join(lines)
