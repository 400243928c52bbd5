"""Typed results of ``UMEEncoder.encode``: one ``EncodeResult`` per input."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

import numpy as np

Vector = Union[np.ndarray, list]  # float32 numpy array, or python floats with output="list"


class GenOutcome(str, Enum):
    """How a gen vector was obtained."""

    OK = "ok"  # read at the generated <gen_emb> token
    # No <gen_emb> in the completion (e.g. max_new_tokens reached): like the reference
    # implementation, the state of the last generated step is used instead. The vector
    # exists but is not a real gen embedding; filter on this when it matters.
    NO_GEN_EMB = "no_gen_emb"


@dataclass
class GenSample:
    """One reasoning chain and the gen vector read after it."""

    vector: Vector
    reasoning: str
    outcome: GenOutcome
    num_tokens: int  # generated tokens, end-of-turn included

    @property
    def fallback(self) -> bool:
        return self.outcome is not GenOutcome.OK


@dataclass
class EncodeResult:
    """The embeddings of one input.

    ``disc``/``gen`` are L2-normalised (None where not computed or on error). ``gen`` and
    ``reasoning`` come from the first sample; with ``num_samples=k`` all k are in ``samples``.
    ``error`` is None unless this input failed (then nothing else is set).
    """

    index: int
    disc: Vector | None = None
    gen: Vector | None = None
    reasoning: str | None = None
    gen_outcome: GenOutcome | None = None
    samples: list[GenSample] = field(default_factory=list)
    error: Exception | None = None
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> "EncodeResult":
        if self.error is not None:
            raise self.error
        return self

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (vectors as python floats)."""

        def plain(v: Any) -> Any:
            return v.tolist() if isinstance(v, np.ndarray) else v

        return {
            "index": self.index,
            "disc": plain(self.disc),
            "gen": plain(self.gen),
            "reasoning": self.reasoning,
            "gen_outcome": self.gen_outcome.value if self.gen_outcome else None,
            "samples": [
                {"vector": plain(s.vector), "reasoning": s.reasoning, "outcome": s.outcome.value,
                 "num_tokens": s.num_tokens}
                for s in self.samples
            ],
            "error": str(self.error) if self.error else None,
            "truncated": self.truncated,
            "warnings": list(self.warnings),
        }
