"""Held-out retrieval during and after training: Hit@1 of each query against the pool of all
targets, for disc vectors and for gen vectors made through real generation."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import numpy as np

from ume_retriever.inputs.records import PairRecord


def retrieval_hit_at_1(encoder: Any, records: list[PairRecord], modes: Iterable[str] = ("disc", "gen"),
                       batch_size: int = 32) -> dict[str, float]:
    """``{mode}_hit1`` over all records, ``{mode}_hit1_{dataset}`` per record group, and
    ``gen_well_formed`` (share of generated answers in the UME-R1 format, both sides).

    Query i's positive is target i; the pool is every record's target (so targets must be
    distinct items). Chance is 1 / len(records).
    """
    from ume_retriever.model.prompt import is_well_formed

    modes = tuple(modes)
    mode = "both" if {"disc", "gen"} <= set(modes) else modes[0]
    queries = encoder.encode([r.query.to_item() for r in records], mode=mode, batch_size=batch_size)
    targets = encoder.encode([r.target.to_item() for r in records], mode=mode, batch_size=batch_size)
    for res in (*queries, *targets):
        res.raise_for_error()
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.dataset or "all"].append(i)
    out: dict[str, float] = {}
    for m in modes:
        q = np.stack([getattr(r, m) for r in queries])
        t = np.stack([getattr(r, m) for r in targets])
        hits = (q @ t.T).argmax(axis=1) == np.arange(len(records))
        out[f"{m}_hit1"] = float(hits.mean())
        if len(groups) > 1:
            for name, rows in sorted(groups.items()):
                out[f"{m}_hit1_{name}"] = float(hits[rows].mean())
    if "gen" in modes:
        answers = [r.reasoning or "" for r in (*queries, *targets)]
        out["gen_well_formed"] = float(np.mean([is_well_formed(a) for a in answers]))
    return out
