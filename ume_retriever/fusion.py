"""How the disc and gen scores of a point are combined at query time.

The stores search each query vector's nearest points in the engine (one batched call) and
fuse those ranked lists here, with ``fuse_lists``: the same formulas as Qdrant's own fusion
(RRF, DBSF, a weighted sum), plus what Qdrant cannot do, the rule for points whose gen
vector is not computed yet (see ``fuse_lists``). ``fuse_reference`` is the exact version over
all points, from a score matrix; tests check both engines against it.
"""

from __future__ import annotations

import heapq
import math
import numbers
from dataclasses import dataclass
from typing import Collection, Hashable, Literal, Mapping, Sequence

import numpy as np

FusionMethod = Literal["weighted", "rrf", "dbsf", "disc", "gen", "adaptive"]
FUSION_METHODS: tuple[str, ...] = ("weighted", "rrf", "dbsf", "disc", "gen", "adaptive")
# What ``adaptive`` may fuse with once it decides to reason.
ADAPTIVE_THEN: tuple[str, ...] = ("rrf", "weighted", "dbsf", "gen")
# The string form's parameters each method uses (``Fusion.parse`` refuses the others).
METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "weighted": ("disc", "gen"), "rrf": ("disc", "gen", "k"), "dbsf": (), "disc": (), "gen": (),
    "adaptive": ("margin", "then", "disc", "gen", "k"),
}
_PARAMETER_FIELDS = {"disc": "disc_weight", "gen": "gen_weight", "k": "k", "margin": "margin", "then": "then"}
# ``adaptive`` has no default margin: the right one depends on the checkpoint (its disc score
# gaps) and is measured with ``ume-eval --calibrate-adaptive`` (docs/evaluation.md).


@dataclass(frozen=True)
class Fusion:
    """A fusion of the disc and gen scores.

    - ``weighted``: ``w_disc * cos_disc + w_gen * cos_gen`` (a score missing from a prefetch
      counts as 0); with ``gen_samples=k`` each gen sample weighs ``w_gen / k``.
    - ``rrf``: reciprocal rank fusion as Qdrant computes it: ``sum_i 1 / (k + rank_i)`` with
      ranks counted from 0 (so ``k=61`` is the literature's 60); a weight ``w`` stretches a
      prefetch's ranks: ``1 / (k - 1 + (rank_i + 1) / w)``. Weights 1 by default.
    - ``dbsf``: distribution-based score fusion (each prefetch's scores normalised by its mean
      +- 3 sample std, then summed), unweighted.
    - ``disc`` / ``gen``: one vector only.
    - ``adaptive``: search with the disc vector first; when the disc scores of the first two
      hits differ by ``margin`` or more, the disc ranking is the answer and no reasoning runs;
      otherwise the query reasons and the hits are fused with ``then`` (default ``rrf``, with
      this fusion's weights and ``k``). ``margin=0`` never reasons (ranks as ``disc``);
      ``margin=2`` (more than any cosine gap) always reasons (ranks as ``then``).
    """

    method: FusionMethod = "rrf"
    disc_weight: float = 1.0
    gen_weight: float = 1.0
    k: int = 60
    margin: float | None = None  # adaptive only, and required there
    then: str = "rrf"  # adaptive only

    def __post_init__(self) -> None:
        if self.method not in FUSION_METHODS:
            raise ValueError(f"fusion must be one of {', '.join(FUSION_METHODS)}; got {self.method!r}")
        if self.then not in ADAPTIVE_THEN:
            raise ValueError(f"adaptive then= must be one of {', '.join(ADAPTIVE_THEN)}; got {self.then!r}")
        if self.method == "adaptive" and self.margin is None:
            raise ValueError("adaptive fusion needs its margin, e.g. adaptive:margin=0.02: the disc top-1/top-2 score "
                             "gap below which the query reasons; calibrate it for your checkpoint with "
                             "ume-eval --calibrate-adaptive (docs/evaluation.md)")
        if self.margin is not None and (isinstance(self.margin, bool) or not isinstance(self.margin, numbers.Real)
                                        or not math.isfinite(self.margin) or self.margin < 0):
            raise ValueError(f"the adaptive margin must be a finite number >= 0, got {self.margin!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral):
            raise ValueError(f"rrf k must be an integer, got {self.k!r}")
        if self.k < 1:
            raise ValueError(f"rrf k must be >= 1, got {self.k}")
        for name, w in (("disc", self.disc_weight), ("gen", self.gen_weight)):
            if isinstance(w, bool) or not isinstance(w, numbers.Real):
                raise ValueError(f"the {name} weight must be a number, got {w!r}")
            if not math.isfinite(w):  # NaN would silently drop that vector's prefetch (NaN > 0 is False)
                raise ValueError(f"the {name} weight must be a finite number, got {w}")
            if w < 0:
                raise ValueError(f"fusion weights must be >= 0, got {name}={w}")
        if self.method in ("weighted", "rrf", "adaptive") and self.disc_weight == 0 and self.gen_weight == 0:
            raise ValueError("the disc and gen weights are both 0: at least one must be > 0")

    @classmethod
    def parse(cls, value: "Fusion | str") -> "Fusion":
        """``Fusion``, a name ("rrf", "weighted", "dbsf", "disc", "gen"), or a name with
        parameters as the command line writes them: "weighted:disc=0.3,gen=0.7", "rrf:k=61".

        Parameters: ``disc=W`` and ``gen=W`` (finite, >= 0) for ``weighted`` and ``rrf``;
        ``k=N`` (an integer >= 1) for ``rrf``; ``dbsf``, ``disc`` and ``gen`` take none;
        ``adaptive`` takes ``margin=M`` and ``then=rrf|weighted|dbsf|gen`` and the parameters
        of its ``then`` method: "adaptive:margin=0.05,then=weighted,disc=0.3,gen=0.7".
        A parameter given twice, or one the method does not use, is an error (never ignored).
        """
        if isinstance(value, Fusion):
            return value
        if not isinstance(value, str):
            raise ValueError(f"fusion must be a Fusion or a string, got {type(value).__name__}")
        method, _, params = value.partition(":")
        method = method.strip()
        if method not in FUSION_METHODS:
            raise ValueError(f"fusion {value!r}: the method must be one of {', '.join(FUSION_METHODS)}; got {method!r}")
        allowed = METHOD_PARAMETERS[method]
        kwargs: dict[str, float | int | str] = {}
        for part in (p.strip() for p in params.split(",")):
            if not part:
                if params.strip():  # "weighted:disc=1,,gen=2" or a trailing comma
                    raise ValueError(f"fusion {value!r}: an empty parameter (two commas, or a comma at an end)")
                continue
            key, eq, raw = (s.strip() for s in part.partition("="))
            if not eq or key not in _PARAMETER_FIELDS:
                raise ValueError(f"fusion {value!r}: parameters are disc=W, gen=W, k=N, and for adaptive margin=M "
                                 f"and then=METHOD (got {part!r})")
            if key not in allowed:
                uses = f"takes only {', '.join(p + '=' for p in allowed)}" if allowed else "takes no parameters"
                raise ValueError(f"fusion {value!r}: {key}= does not apply to {method} ({method} {uses})")
            field_name = _PARAMETER_FIELDS[key]
            if field_name in kwargs:
                raise ValueError(f"fusion {value!r}: {key} is given twice")
            if key == "then":
                kwargs[field_name] = raw  # checked by the constructor
                continue
            try:
                number: float | int = int(raw) if key == "k" else float(raw)
            except ValueError:
                kind = "an integer" if key == "k" else "a number"
                raise ValueError(f"fusion {value!r}: {key} must be {kind}, got {raw!r}") from None
            if not math.isfinite(number):
                raise ValueError(f"fusion {value!r}: {key} must be a finite number, got {raw!r}")
            kwargs[field_name] = number
        try:
            return cls(method=method, **kwargs)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"fusion {value!r}: {exc}") from None

    def __str__(self) -> str:
        """The ``parse`` form: "rrf", "weighted:disc=0.3,gen=0.7", "adaptive:margin=0.05,then=rrf"."""
        params = []
        fused = self.then if self.method == "adaptive" else self.method
        if self.method == "adaptive":
            params += [f"margin={self.margin:g}", f"then={self.then}"]
        if fused in ("weighted", "rrf") and (self.disc_weight, self.gen_weight) != (1.0, 1.0):
            params += [f"disc={self.disc_weight:g}", f"gen={self.gen_weight:g}"]
        if fused == "rrf" and self.k != 60:
            params.append(f"k={self.k}")
        return self.method + (":" + ",".join(params) if params else "")

    @property
    def needs_disc(self) -> bool:
        return self.method != "gen"

    @property
    def needs_gen(self) -> bool:
        return self.method != "disc"

    @property
    def adaptive(self) -> bool:
        return self.method == "adaptive"

    def when_reasoning(self) -> "Fusion":
        """The fusion an ``adaptive`` search uses once it reasons (itself for other methods)."""
        if not self.adaptive:
            return self
        return Fusion(self.then, disc_weight=self.disc_weight, gen_weight=self.gen_weight, k=self.k)  # type: ignore[arg-type]

    def prefetch_weights(self, uses: Sequence[str]) -> list[float]:
        """One weight per query vector (``uses`` lists "disc"/"gen" per vector)."""
        n_gen = max(1, sum(u == "gen" for u in uses))
        return [self.disc_weight if u == "disc" else self.gen_weight / n_gen for u in uses]


PointId = Hashable


@dataclass(frozen=True)
class RankedList:
    """One query vector's nearest points, best first: ``(point id, cosine)`` pairs."""

    using: str  # "disc" or "gen"
    entries: Sequence[tuple[PointId, float]]


def fuse_lists(
    lists: Sequence[RankedList], fusion: Fusion, limit: int, without_gen: Collection[PointId] = (),
) -> list[tuple[PointId, float]]:
    """Fuse ranked lists (one per query vector, in query order) into ``(id, score)`` best first.

    The formulas are Qdrant's (see ``Fusion``); a list's weight is ``fusion.prefetch_weights``
    of its vector; zero-weight lists are dropped.

    ``without_gen``: points that have no gen vector yet (staged ingestion). Such a point cannot
    be in a gen list, and would sink below every point that is; instead it is ranked in each
    gen list as it ranks in the disc list: its gen term is its disc term with the gen list's
    weight (RRF: its disc rank; weighted: its disc cosine; DBSF: its normalised disc score).
    With every point pending, the fused ranking is the disc ranking.
    """
    weights = fusion.prefetch_weights([rl.using for rl in lists])
    kept = [(rl, w) for rl, w in zip(lists, weights) if w > 0]
    if not kept:
        raise ValueError("every query vector has weight 0")
    if len(kept) == 1:
        return [(pid, float(score)) for pid, score in kept[0][0].entries[:limit]]
    disc = next((rl for rl, _ in kept if rl.using == "disc"), None)
    stand_ins = [] if disc is None or not without_gen else \
        [(rank, pid, score) for rank, (pid, score) in enumerate(disc.entries) if pid in without_gen]
    fused: dict[PointId, float] = {}
    get = fused.get
    for rl, w in kept:
        borrowed = stand_ins if rl.using == "gen" else []
        if fusion.method == "rrf":
            offset = fusion.k + 1 / w - 1
            for rank, (pid, _) in enumerate(rl.entries):
                fused[pid] = get(pid, 0.0) + 1.0 / (offset + rank / w)
            for rank, pid, _ in borrowed:
                fused[pid] = get(pid, 0.0) + 1.0 / (offset + rank / w)
        elif fusion.method == "dbsf":
            own = _dbsf_normaliser([s for _, s in rl.entries])
            for pid, score in rl.entries:
                fused[pid] = get(pid, 0.0) + own(score)
            if borrowed and disc is not None:
                theirs = _dbsf_normaliser([s for _, s in disc.entries])
                for _, pid, score in borrowed:
                    fused[pid] = get(pid, 0.0) + theirs(score)
        else:  # weighted (and disc-only / gen-only over several samples: a weighted mean)
            for pid, score in rl.entries:
                fused[pid] = get(pid, 0.0) + w * float(score)
            for _, pid, score in borrowed:
                fused[pid] = get(pid, 0.0) + w * float(score)
    return heapq.nlargest(limit, fused.items(), key=lambda kv: kv[1])


def _dbsf_normaliser(scores: Sequence[float]):  # noqa: ANN202 - a small closure
    """Qdrant's DBSF: a score mapped by the list's mean +- 3 sample standard deviations."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return lambda value: 0.0
    mean, std = s.mean(), s.std(ddof=1) if len(s) > 1 else 0.0
    low, high = mean - 3 * std, mean + 3 * std
    return lambda value: 0.0 if high == low else (float(value) - low) / (high - low)


def fuse_reference(
    scores: np.ndarray, uses: Sequence[str], fusion: Fusion, prefetch_limit: int, limit: int,
    without_gen: Collection[int] = (),
) -> list[tuple[int, float]]:
    """Exact fusion over all points: ``scores`` is (n_queries, n_points) cosine similarities
    (a point in ``without_gen`` has no gen vector: its gen scores are ignored).

    Returns ``(point index, fused score)`` best first, as the engines should (ties aside).
    """
    weights = fusion.prefetch_weights(uses)
    n_kept = sum(w > 0 for w in weights)
    lists = []
    missing = np.asarray(sorted(without_gen), dtype=int)
    for row, using, w in zip(scores, uses, weights):
        row = np.array(row, dtype=np.float64)
        if using == "gen" and len(missing):
            row[missing] = -np.inf
        depth = limit if n_kept == 1 and w > 0 else prefetch_limit
        order = [i for i in np.argsort(-row, kind="stable")[:depth] if np.isfinite(row[i])]
        lists.append(RankedList(using, [(int(i), float(row[i])) for i in order]))
    return [(int(i), s) for i, s in fuse_lists(lists, fusion, limit, without_gen=set(int(i) for i in missing))]
