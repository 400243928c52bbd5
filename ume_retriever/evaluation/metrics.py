"""Retrieval metrics on ranked ids: plain functions, binary relevance.

``ranked``: candidate ids best first; ``relevant``: the set of positive ids.
"""

from __future__ import annotations

import math
from typing import Hashable, Sequence, Set


def hit_at_k(ranked: Sequence[Hashable], relevant: Set[Hashable], k: int) -> float:
    """1.0 if any of the first ``k`` ranked ids is relevant, else 0.0."""
    _check(k)
    return float(any(r in relevant for r in ranked[:k]))


def ndcg_at_k(ranked: Sequence[Hashable], relevant: Set[Hashable], k: int) -> float:
    """NDCG@k with linear gain and binary relevance: DCG = sum over relevant ranks i (from 1)
    of 1 / log2(i + 1); the ideal DCG puts min(k, |relevant|) relevant items first."""
    _check(k)
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(i + 2) for i, r in enumerate(ranked[:k]) if r in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal


def mrr_at_k(ranked: Sequence[Hashable], relevant: Set[Hashable], k: int) -> float:
    """1 / rank of the first relevant id within the first ``k``, 0.0 if none."""
    _check(k)
    for i, r in enumerate(ranked[:k]):
        if r in relevant:
            return 1.0 / (i + 1)
    return 0.0


METRICS = {"hit@1": (hit_at_k, 1), "hit@5": (hit_at_k, 5), "ndcg@5": (ndcg_at_k, 5), "mrr@10": (mrr_at_k, 10)}
DEPTH = 10  # ranks needed by the metrics above


def score_ranking(ranked: Sequence[Hashable], relevant: Set[Hashable]) -> dict[str, float]:
    """Every metric in ``METRICS`` for one query."""
    return {name: fn(ranked, relevant, k) for name, (fn, k) in METRICS.items()}


def _check(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
