"""How the disc and gen scores of a point are combined at query time, and a numpy reference.

The stores run fusion inside Qdrant (prefetch per query vector, then one fusion query). The
numpy functions here compute the same thing from exact scores; tests check both engines
against them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

FusionMethod = Literal["weighted", "rrf", "dbsf", "disc", "gen"]
FUSION_METHODS: tuple[str, ...] = ("weighted", "rrf", "dbsf", "disc", "gen")
# The string form's parameters each method uses (``Fusion.parse`` refuses the others).
METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "weighted": ("disc", "gen"), "rrf": ("disc", "gen", "k"), "dbsf": (), "disc": (), "gen": (),
}
_PARAMETER_FIELDS = {"disc": "disc_weight", "gen": "gen_weight", "k": "k"}


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
    """

    method: FusionMethod = "rrf"
    disc_weight: float = 1.0
    gen_weight: float = 1.0
    k: int = 60

    def __post_init__(self) -> None:
        if self.method not in FUSION_METHODS:
            raise ValueError(f"fusion must be one of {', '.join(FUSION_METHODS)}; got {self.method!r}")
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
        if self.method in ("weighted", "rrf") and self.disc_weight == 0 and self.gen_weight == 0:
            raise ValueError("the disc and gen weights are both 0: at least one must be > 0")

    @classmethod
    def parse(cls, value: "Fusion | str") -> "Fusion":
        """``Fusion``, a name ("rrf", "weighted", "dbsf", "disc", "gen"), or a name with
        parameters as the command line writes them: "weighted:disc=0.3,gen=0.7", "rrf:k=61".

        Parameters: ``disc=W`` and ``gen=W`` (finite, >= 0) for ``weighted`` and ``rrf``;
        ``k=N`` (an integer >= 1) for ``rrf`` only; ``dbsf``, ``disc`` and ``gen`` take none.
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
        kwargs: dict[str, float | int] = {}
        for part in (p.strip() for p in params.split(",")):
            if not part:
                if params.strip():  # "weighted:disc=1,,gen=2" or a trailing comma
                    raise ValueError(f"fusion {value!r}: an empty parameter (two commas, or a comma at an end)")
                continue
            key, eq, raw = (s.strip() for s in part.partition("="))
            if not eq or key not in _PARAMETER_FIELDS:
                raise ValueError(f"fusion {value!r}: parameters are disc=W, gen=W and k=N (got {part!r})")
            if key not in allowed:
                uses = f"takes only {', '.join(p + '=' for p in allowed)}" if allowed else "takes no parameters"
                raise ValueError(f"fusion {value!r}: {key}= does not apply to {method} ({method} {uses})")
            field_name = _PARAMETER_FIELDS[key]
            if field_name in kwargs:
                raise ValueError(f"fusion {value!r}: {key} is given twice")
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
        """The ``parse`` form: "rrf", "weighted:disc=0.3,gen=0.7"."""
        params = []
        if self.method in ("weighted", "rrf") and (self.disc_weight, self.gen_weight) != (1.0, 1.0):
            params += [f"disc={self.disc_weight:g}", f"gen={self.gen_weight:g}"]
        if self.method == "rrf" and self.k != 60:
            params.append(f"k={self.k}")
        return self.method + (":" + ",".join(params) if params else "")

    @property
    def needs_disc(self) -> bool:
        return self.method != "gen"

    @property
    def needs_gen(self) -> bool:
        return self.method != "disc"

    def prefetch_weights(self, uses: Sequence[str]) -> list[float]:
        """One weight per query vector (``uses`` lists "disc"/"gen" per vector)."""
        n_gen = max(1, sum(u == "gen" for u in uses))
        return [self.disc_weight if u == "disc" else self.gen_weight / n_gen for u in uses]


def rank_lists(scores: np.ndarray, limit: int) -> list[np.ndarray]:
    """Per query row of ``scores`` (n_queries, n_points): the ``limit`` best point indices."""
    return [np.argsort(-row, kind="stable")[:limit] for row in scores]


def fuse_reference(
    scores: np.ndarray, uses: Sequence[str], fusion: Fusion, prefetch_limit: int, limit: int
) -> list[tuple[int, float]]:
    """Exact fusion over all points: ``scores`` is (n_queries, n_points) cosine similarities.

    Returns ``(point index, fused score)`` best first, as the engines should (ties aside).
    """
    weights = fusion.prefetch_weights(uses)
    keep = [i for i, w in enumerate(weights) if w > 0]  # a zero weight drops that prefetch
    scores, uses, weights = scores[keep], [uses[i] for i in keep], [weights[i] for i in keep]
    if len(uses) == 1:
        order = np.argsort(-scores[0], kind="stable")[:limit]
        return [(int(i), float(scores[0, i])) for i in order]
    lists = rank_lists(scores, prefetch_limit)
    fused: dict[int, float] = {}
    if fusion.method == "rrf":
        for w, ranked in zip(weights, lists):
            for rank, idx in enumerate(ranked, start=1):
                fused[int(idx)] = fused.get(int(idx), 0.0) + 1.0 / (fusion.k - 1 + rank / w)
    elif fusion.method == "dbsf":
        for ranked, row in zip(lists, scores):
            s = row[ranked].astype(np.float64)
            mean, std = s.mean(), s.std(ddof=1) if len(s) > 1 else 0.0
            low, high = mean - 3 * std, mean + 3 * std
            for idx, value in zip(ranked, s):
                norm = 0.0 if high == low else (value - low) / (high - low)
                fused[int(idx)] = fused.get(int(idx), 0.0) + norm
    else:  # weighted, and disc-only / gen-only over several samples (weighted mean)
        found = set(int(i) for ranked in lists for i in ranked)
        for idx in found:
            total = 0.0
            for w, ranked, row in zip(weights, lists, scores):
                if idx in set(ranked.tolist()):
                    total += w * float(row[idx])
            fused[idx] = total
    ranked_all = sorted(fused.items(), key=lambda kv: -kv[1])
    return ranked_all[:limit]
