"""The evaluation runner: disc, gen, every fusion, the oracle, pass@k, a fusion weight sweep
and the adaptive calibration.

Two scoring paths over the same (cached) vectors:
- ``index`` (default): candidates are ingested into a real ``UMEIndex`` (embedded Qdrant Edge
  store in a temporary folder unless one is given) and every query goes through
  ``UMEIndex.search``: what is measured is the product users run, the store's fusion included.
- ``exact``: numpy cosine over the whole pool and the numpy fusion reference; for large pools.
pass@k, the weight sweep and the adaptive calibration always use the exact path (they are
properties of the vectors). An ``adaptive`` fusion's modes also report ``reasoned``, the share
of queries whose disc scores made it reason (``calibrate.reasons``).
"""

from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from ..fusion import Fusion, fuse_reference
from ..model.protocol import EncoderLike
from .cache import CachedEncoder
from .calibrate import REASONED, calibrate, disc_gap, disc_top1, reasons, then_fusion
from .metrics import DEPTH, METRICS, hit_at_k, score_ranking
from .tasks import EvalQuery, EvalTask

logger = logging.getLogger(__name__)
PREFETCH_FACTOR = 4
SWEEP_WEIGHTS = tuple(round(w / 10, 1) for w in range(11))  # disc weight; gen weight = 1 - it


@dataclass
class TaskResult:
    task: str
    queries: int
    candidates: int
    modes: dict[str, dict[str, float]] = field(default_factory=dict)  # mode -> metric -> mean
    pass_at_k: dict[int, float] = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)
    adaptive_calibration: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "queries": self.queries, "candidates": self.candidates, "modes": self.modes,
                "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()}, "sweep": self.sweep,
                "adaptive_calibration": self.adaptive_calibration}


@dataclass
class _Vectors:
    disc: dict[str, np.ndarray]  # id -> vector
    gen: dict[str, np.ndarray]
    samples: dict[str, list[np.ndarray]]  # query id -> sampled gen vectors


def evaluate_task(
    encoder: EncoderLike,
    task: EvalTask,
    *,
    fusions: Sequence[Fusion | str] = ("rrf", "weighted", "dbsf"),
    pass_k: Sequence[int] = (1, 2, 4, 8),
    path: Literal["index", "exact"] = "index",
    store: Any = None,
    sweep: bool = True,
    calibrate_adaptive: Fusion | str | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    show_progress: bool = False,
) -> TaskResult:
    """Metrics of one task. ``encoder``: an ``UMEEncoder`` or a ``CachedEncoder`` around one.

    ``calibrate_adaptive``: the fusion an adaptive search reasons with ("rrf",
    "weighted:disc=0.3,gen=0.7", or an adaptive fusion, whose ``then`` is used): sweep the
    router's threshold on a dev half of the queries (``calibrate.calibrate``).
    """
    fusions = [Fusion.parse(f) for f in fusions]
    then = then_fusion(calibrate_adaptive) if calibrate_adaptive is not None else None
    vectors = _encode(encoder, task, max(pass_k) if pass_k else 0, temperature, seed, show_progress)
    result = TaskResult(task.name, len(task.queries), len(task.candidates))
    modes: list[tuple[str, Fusion]] = [("disc", Fusion("disc")), ("gen", Fusion("gen"))]
    modes += [(str(f), f) for f in fusions]
    if path == "index":
        rankings = _index_rankings(encoder, task, modes, store, show_progress)
    elif path == "exact":
        rankings = {name: [_exact_ranking(task, q, vectors, f) for q in task.queries] for name, f in modes}
    else:
        raise ValueError(f"path must be 'index' or 'exact', got {path!r}")
    per_query = {name: [score_ranking(r, q.positives) for r, q in zip(ranks, task.queries)]
                 for name, ranks in rankings.items()}
    for name, rows in per_query.items():
        result.modes[name] = _mean(rows)
    for name, fusion in modes:
        if fusion.adaptive:  # the decision the index makes too: it is a function of the disc scores
            result.modes[name][REASONED] = float(np.mean([reasons(fusion, _disc_scores(task, q, vectors))
                                                          for q in task.queries]))
    # The oracle: per query, the better of disc and gen on each metric (the paper's upper bound).
    result.modes["oracle"] = _mean([{m: max(d[m], g[m]) for m in METRICS}
                                    for d, g in zip(per_query["disc"], per_query["gen"])])
    if pass_k:
        result.pass_at_k = _pass_at_k(task, vectors, sorted(set(pass_k)))
    if sweep:
        result.sweep = _weight_sweep(task, vectors, seed)
    if then is not None:
        result.adaptive_calibration = _calibration(task, vectors, then, seed)
    return result


def _encode(encoder: EncoderLike, task: EvalTask, samples: int, temperature: float, seed: int,
            show_progress: bool) -> _Vectors:
    cids, qids = list(task.candidates), [q.id for q in task.queries]
    cands = encoder.encode([task.candidates[c] for c in cids], mode="both", show_progress=show_progress)
    queries = encoder.encode([q.item for q in task.queries], mode="both", show_progress=show_progress)
    bad = [(i, r) for i, r in zip(cids + qids, cands + queries) if r.error is not None]
    if bad:
        raise ValueError(f"task {task.name!r}: {len(bad)} inputs could not be encoded: "
                         + "; ".join(f"{i}: {r.error}" for i, r in bad[:5]))
    vectors = _Vectors(
        disc={**{c: np.asarray(r.disc) for c, r in zip(cids, cands)}, **{q: np.asarray(r.disc) for q, r in zip(qids, queries)}},
        gen={**{c: np.asarray(r.gen) for c, r in zip(cids, cands)}, **{q: np.asarray(r.gen) for q, r in zip(qids, queries)}},
        samples={})
    if samples > 1:
        sampled = encoder.encode([q.item for q in task.queries], mode="gen", num_samples=samples,
                                 temperature=temperature, seed=seed, show_progress=show_progress)
        for q, r in zip(qids, sampled):
            r.raise_for_error()
            vectors.samples[q] = [np.asarray(s.vector) for s in r.samples]
    return vectors


def _index_rankings(encoder: EncoderLike, task: EvalTask, modes: list[tuple[str, Fusion]], store: Any,
                    show_progress: bool) -> dict[str, list[list[str]]]:
    from ..index import UMEIndex
    from ..inputs.item import Item

    with tempfile.TemporaryDirectory(prefix="ume-eval-") as tmp:
        index = UMEIndex(encoder, store if store is not None else tmp, collection=f"eval-{_safe(task.name)}",
                         prefetch_factor=PREFETCH_FACTOR)
        try:
            items = [Item(**{**item.__dict__, "metadata": {**item.metadata, "source": f"eval:{task.name}:{cid}",
                                                            "eval_id": cid}})
                     for cid, item in task.candidates.items()]
            report = index.add(items, show_progress=show_progress)
            if report.failed:
                raise ValueError(f"task {task.name!r}: {len(report.failed)} candidates failed to index: "
                                 f"{report.failed[0].reason}")
            out: dict[str, list[list[str]]] = {name: [] for name, _ in modes}
            for q in _progress(task.queries, show_progress, f"{task.name}: queries"):
                flt = {"eval_id": q.candidates} if q.candidates is not None else None
                for name, fusion in modes:
                    hits = index.search(q.item, DEPTH, fusion=fusion, filter=flt)
                    out[name].append([h.payload["eval_id"] for h in hits])
            return out
        finally:
            index.close()


def _disc_scores(task: EvalTask, q: EvalQuery, v: _Vectors) -> np.ndarray:
    """The query's disc cosines over its pool, in pool order."""
    return np.stack([v.disc[c] for c in task.pool(q)]) @ v.disc[q.id]


def _exact_ranking(task: EvalTask, q: EvalQuery, v: _Vectors, fusion: Fusion, gen_vector: np.ndarray | None = None,
                   depth: int = DEPTH) -> list[str]:
    if fusion.adaptive:  # the disc ranking, or the then fusion's when the disc gap is below the margin
        chosen = fusion.when_reasoning() if reasons(fusion, _disc_scores(task, q, v)) else Fusion("disc")
        return _exact_ranking(task, q, v, chosen, gen_vector, depth)
    pool = task.pool(q)
    rows, uses = [], []
    if fusion.needs_disc:
        rows.append(np.stack([v.disc[c] for c in pool]) @ v.disc[q.id])
        uses.append("disc")
    if fusion.needs_gen:
        rows.append(np.stack([v.gen[c] for c in pool]) @ (v.gen[q.id] if gen_vector is None else gen_vector))
        uses.append("gen")
    fused = fuse_reference(np.stack(rows), uses, fusion, prefetch_limit=depth * PREFETCH_FACTOR, limit=depth)
    return [pool[i] for i, _ in fused]


def _pass_at_k(task: EvalTask, v: _Vectors, ks: list[int]) -> dict[int, float]:
    """Share of queries where at least one of the first k sampled reasoning chains puts a
    positive at rank 1 (gen vector only). k=1 uses the first sample (not greedy decoding)."""
    if not v.samples:
        ks = [1]
    out = {}
    for k in ks:
        hits = []
        for q in task.queries:
            samples = v.samples.get(q.id) or [v.gen[q.id]]
            hits.append(max(hit_at_k(_exact_ranking(task, q, v, Fusion("gen"), s, depth=1), q.positives, 1)
                            for s in samples[:k]))
        out[k] = float(np.mean(hits))
    return out


def dev_test_split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Query indices split in a dev half and a test half (the larger), shuffled by ``seed``;
    the weight sweep and the adaptive calibration use the same split."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[: n // 2]), sorted(order[n // 2:])


def _weight_sweep(task: EvalTask, v: _Vectors, seed: int) -> dict[str, Any]:
    """Weighted fusion from pure gen (disc weight 0) to pure disc (1): the best weight on a dev
    half of the queries (by Hit@1, then NDCG@5), reported on the other (test) half."""
    dev, test = dev_test_split(len(task.queries), seed)
    curve = []
    for w in SWEEP_WEIGHTS:
        fusion = Fusion("weighted", disc_weight=w, gen_weight=round(1 - w, 1))
        rows = [score_ranking(_exact_ranking(task, q, v, fusion), q.positives) for q in task.queries]
        curve.append({"disc_weight": w, "dev": _mean([rows[i] for i in dev]), "test": _mean([rows[i] for i in test])})
    best = max(curve, key=lambda c: (c["dev"]["hit@1"], c["dev"]["ndcg@5"], -abs(c["disc_weight"] - 0.5)))
    return {"dev_queries": len(dev), "test_queries": len(test), "curve": curve,
            "best_disc_weight": best["disc_weight"], "best_fusion": f"weighted:disc={best['disc_weight']:g},"
            f"gen={1 - best['disc_weight']:g}", "test_at_best": best["test"]}


def _calibration(task: EvalTask, v: _Vectors, then: Fusion, seed: int) -> dict[str, Any]:
    """Per query its disc and ``then`` metrics and its disc gap and top-1 (exact path), swept by
    ``calibrate`` on the weight sweep's dev/test split."""
    disc = [score_ranking(_exact_ranking(task, q, v, Fusion("disc")), q.positives) for q in task.queries]
    fused = [score_ranking(_exact_ranking(task, q, v, then), q.positives) for q in task.queries]
    scores = [_disc_scores(task, q, v) for q in task.queries]
    dev, test = dev_test_split(len(task.queries), seed)
    return calibrate(disc, fused, [disc_gap(s) for s in scores], [disc_top1(s) for s in scores], dev, test, then)


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {m: float("nan") for m in METRICS}
    return {m: float(np.mean([r[m] for r in rows])) for m in METRICS}


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _progress(items: Iterable[Any], show: bool, desc: str) -> Iterable[Any]:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="query")


def evaluate(encoder: EncoderLike, tasks: Sequence[EvalTask], *, cache_dir: str | None = None, **kwargs: Any) -> list[TaskResult]:
    """Every task; vectors cached under ``cache_dir`` (per model and input content)."""
    cached = encoder if isinstance(encoder, CachedEncoder) else CachedEncoder(encoder, cache_dir)
    results = []
    try:
        for task in tasks:
            logger.info("task %s: %d queries, %d candidates", task.name, len(task.queries), len(task.candidates))
            results.append(evaluate_task(cached, task, **kwargs))
    finally:
        cached.save()
    return results
