"""Prime table sizes: every hash head of the model gets its own prime number of rows.

A prime modulus spreads the multiply-XOR mixes evenly over the rows, and giving each head a
*different* prime makes two heads that collide on one N-gram unlikely to collide on another
(the paper's multi-head hashing). ``find_table_sizes`` reproduces DeepSeek's reference search.
"""

from __future__ import annotations

from engram.config import EngramConfig


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin; the first 12 prime bases are exact for all n < 3.3e24."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def find_table_sizes(cfg: EngramConfig) -> dict[int, list[list[int]]]:
    """Prime table size of every head: ``{layer_id: [order n=2..N][head]}``.

    Each order's search restarts just above ``rows_per_head[n-2] - 1`` and takes the next
    primes not yet used anywhere in the model, so no two heads (of any layer) share a size.
    """
    used: set[int] = set()
    sizes: dict[int, list[list[int]]] = {}
    for layer_id in cfg.layer_ids:
        per_order = []
        for n in range(2, cfg.max_ngram_size + 1):
            candidate = cfg.rows_per_head[n - 2] - 1
            heads = []
            for _ in range(cfg.n_head_per_ngram):
                candidate += 1
                while candidate in used or not is_prime(candidate):
                    candidate += 1
                used.add(candidate)
                heads.append(candidate)
            per_order.append(heads)
        sizes[layer_id] = per_order
    return sizes




def next_prime(n: int) -> int:
    """The smallest prime >= ``n`` (and >= 2)."""
    n = max(2, int(n))
    while not is_prime(n):
        n += 1
    return n
