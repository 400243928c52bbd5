"""The adaptive router: which queries reason under ``Fusion`` ``adaptive``, and its calibration.

A query's disc scores over its candidate pool decide. ``adaptive:margin=M`` reasons when the
first disc hit's cosine minus the second's is below ``M`` (never with fewer than two
candidates); the answer is then the ``then`` fusion's ranking, else the disc ranking. So a
query's adaptive metrics are its disc metrics or its fused metrics, and a whole curve of
thresholds is computed from those two per-query rows without ranking again.

``calibrate`` sweeps the threshold on a dev half of the queries and reports the other (test)
half, for two routers:

- ``margin``: reason when top-1 minus top-2 disc cosine < M (what ``adaptive`` does);
- ``top1``: reason when the top-1 disc cosine < T (for comparison; no fusion string runs it).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..fusion import ADAPTIVE_THEN, Fusion
from .metrics import METRICS

# Metrics the curve reports (all of METRICS) plus the fraction of queries that reason.
REASONED = "reasoned"
TOLERANCE = 0.01  # the chosen threshold keeps dev Hit@1 within this of max(disc, fused)
GRID_POINTS = 40  # quantile steps of the observed router scores (2.5 % of the dev queries each)
_ROUND = 1e-4  # thresholds are multiples of this, so the printed fusion string is the threshold


def disc_gap(scores: Sequence[float] | np.ndarray) -> float:
    """Top-1 minus top-2 of a query's disc scores over its pool; +inf with fewer than two
    candidates (such a query never reasons)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size < 2:
        return math.inf
    top = np.partition(s, s.size - 2)[-2:]
    return float(top[1] - top[0])


def disc_top1(scores: Sequence[float] | np.ndarray) -> float:
    """The top-1 disc score; +inf with fewer than two candidates (never reasons)."""
    s = np.asarray(scores, dtype=np.float64)
    return math.inf if s.size < 2 else float(s.max())


def reasons(fusion: Fusion, scores: Sequence[float] | np.ndarray) -> bool:
    """Whether ``fusion`` reasons for a query with these disc scores (non-adaptive: whether it
    uses a gen vector at all)."""
    if not fusion.adaptive:
        return fusion.needs_gen
    return disc_gap(scores) < fusion.margin


def then_fusion(value: Fusion | str) -> Fusion:
    """The fusion a calibration fuses with when a query reasons: one of ``ADAPTIVE_THEN``
    (with its parameters), or an ``adaptive`` fusion (its ``then``)."""
    fusion = Fusion.parse(value).when_reasoning()
    if fusion.method not in ADAPTIVE_THEN:
        raise ValueError(f"--calibrate-adaptive fuses with one of {', '.join(ADAPTIVE_THEN)}; got {str(fusion)!r}")
    return fusion


def adaptive_fusion(then: Fusion, margin: float) -> Fusion:
    """``adaptive:margin=M,then=...`` with ``then``'s parameters."""
    return Fusion("adaptive", disc_weight=then.disc_weight, gen_weight=then.gen_weight, k=then.k, margin=margin,
                  then=then.method)


def _mix(disc: list[dict[str, float]], fused: list[dict[str, float]], reason: Sequence[bool],
         queries: Sequence[int]) -> dict[str, float]:
    """Mean metrics over ``queries`` when those with ``reason`` take their fused row."""
    if not queries:
        return {**{m: float("nan") for m in METRICS}, REASONED: float("nan")}
    rows = [fused[i] if reason[i] else disc[i] for i in queries]
    return {**{m: float(np.mean([r[m] for r in rows])) for m in METRICS},
            REASONED: float(np.mean([bool(reason[i]) for i in queries]))}


def _grid(values: np.ndarray, dev: Sequence[int], floor: float | None, points: int) -> list[float]:
    """Thresholds from "never reasons" to "always reasons": ``floor`` (or just below the least
    finite value), the dev values' quantiles (rounded up to ``_ROUND``), and a value above the
    largest finite value of all queries."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return [0.0 if floor is None else floor]
    dev_vals = values[list(dev)]
    dev_vals = dev_vals[np.isfinite(dev_vals)]
    low = floor if floor is not None else math.floor(float(finite.min()) / _ROUND) * _ROUND
    high = math.ceil(float(finite.max()) / _ROUND) * _ROUND + _ROUND
    grid = {round(low, 4), round(high, 4)}
    if dev_vals.size:
        for q in np.quantile(dev_vals, np.linspace(0, 1, points + 1)):
            grid.add(round(math.ceil(float(q) / _ROUND) * _ROUND, 4))
    return sorted(t for t in grid if low <= t <= high)


def sweep_router(values: Sequence[float], disc: list[dict[str, float]], fused: list[dict[str, float]],
                 dev: Sequence[int], test: Sequence[int], *, floor: float | None = None,
                 points: int = GRID_POINTS, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """One router (reason when ``values[i] < threshold``) swept over its grid.

    The chosen threshold is the one with the least dev reasoning whose dev Hit@1 is at least
    max(dev disc Hit@1, dev fused Hit@1) - ``tolerance`` (ties: the smaller threshold); the
    grid's two ends are the pure disc and pure fused rankings, so one always qualifies.
    """
    vals = np.asarray(values, dtype=np.float64)
    curve = []
    for t in _grid(vals, dev, floor, points):
        reason = vals < t
        curve.append({"threshold": t, "dev": _mix(disc, fused, reason, dev), "test": _mix(disc, fused, reason, test)})
    target = max(_mix(disc, fused, [False] * len(vals), dev)["hit@1"],
                 _mix(disc, fused, [True] * len(vals), dev)["hit@1"]) - tolerance
    ok = [c for c in curve if c["dev"]["hit@1"] >= target - 1e-12]
    chosen = min(ok, key=lambda c: (c["dev"][REASONED], c["threshold"])) if ok else curve[-1]
    return {"curve": curve, "target_dev_hit@1": target, "chosen": chosen}


def calibrate(disc: list[dict[str, float]], fused: list[dict[str, float]], gaps: Sequence[float],
              top1: Sequence[float], dev: Sequence[int], test: Sequence[int], then: Fusion, *,
              points: int = GRID_POINTS, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The adaptive calibration of one task.

    ``disc`` / ``fused``: per query, ``score_ranking`` of its disc ranking and of its ``then``
    ranking; ``gaps`` / ``top1``: its ``disc_gap`` and ``disc_top1``; ``dev`` / ``test``:
    query indices. Returns the JSON-ready dict ``results.json`` keeps as "adaptive_calibration".
    """
    n = len(disc)
    if not (len(fused) == len(gaps) == len(top1) == n):
        raise ValueError("calibrate: disc, fused, gaps and top1 need one entry per query")
    never, always = [False] * n, [True] * n
    # The per-query oracle: the better of disc and fused on each metric; it needs to reason
    # only where fused is strictly better on Hit@1.
    best = [{m: max(d[m], f[m]) for m in METRICS} for d, f in zip(disc, fused)]
    wins = [f["hit@1"] > d["hit@1"] for d, f in zip(disc, fused)]
    routers = {
        "margin": {"rule": "reason when top-1 minus top-2 disc cosine < threshold (adaptive:margin=threshold)",
                   **sweep_router(gaps, disc, fused, dev, test, floor=0.0, points=points, tolerance=tolerance)},
        "top1": {"rule": "reason when the top-1 disc cosine < threshold",
                 **sweep_router(top1, disc, fused, dev, test, points=points, tolerance=tolerance)},
    }
    margin = routers["margin"]["chosen"]["threshold"]
    routers["margin"]["fusion"] = str(adaptive_fusion(then, margin))
    rm, rt = (routers[r]["chosen"]["dev"][REASONED] for r in ("margin", "top1"))
    less = "margin" if rm < rt else "top1" if rt < rm else "equal"
    for router in routers.values():
        router["area"] = {s: _area(router["curve"], s) for s in ("dev", "test")}
    return {
        "then": str(then), "dev_queries": len(dev), "test_queries": len(test), "tolerance": tolerance,
        "disc": {s: _mix(disc, fused, never, q) for s, q in (("dev", dev), ("test", test))},
        "fused": {s: _mix(disc, fused, always, q) for s, q in (("dev", dev), ("test", test))},
        "oracle": {s: _mix(best, best, wins, q) for s, q in (("dev", dev), ("test", test))},
        "routers": routers,
        "chosen_margin": margin,
        "chosen_fusion": routers["margin"]["fusion"],
        "less_reasoning": less,
        "comparison": _comparison(less, routers),
    }


def _area(curve: list[dict[str, Any]], split: str) -> float:
    """Area under Hit@1 against the reasoning share (trapezoids over the curve's span, 0 to 1
    unless some queries have a single candidate): the mean Hit@1 a router gives over all
    reasoning budgets; of two routers the larger is the better on average over budgets."""
    xs = [c[split][REASONED] for c in curve]
    ys = [c[split]["hit@1"] for c in curve]
    return float(sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:])))


def _comparison(less: str, routers: dict[str, Any]) -> str:
    m, t = routers["margin"]["chosen"], routers["top1"]["chosen"]
    text = (f"at dev Hit@1 >= {routers['margin']['target_dev_hit@1']:.3f}: margin router M={m['threshold']:g} "
            f"reasons on {m['dev'][REASONED]:.1%} of dev queries (test {m['test'][REASONED]:.1%}, Hit@1 "
            f"{m['test']['hit@1']:.3f}), top-1 router T={t['threshold']:g} on {t['dev'][REASONED]:.1%} "
            f"(test {t['test'][REASONED]:.1%}, Hit@1 {t['test']['hit@1']:.3f})")
    text += "; the two reason equally often" if less == "equal" else f"; {less} reasons less"
    am, at = routers["margin"]["area"]["test"], routers["top1"]["area"]["test"]
    return text + f". Area under Hit@1 vs reasoning share (test): margin {am:.3f}, top-1 {at:.3f}"
