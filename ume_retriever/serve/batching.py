"""Request batching for the encoder deployment: several requests' inputs, one ``encode`` call.

``@serve.batch`` hands the encoder replica a list of ``EncodeCall``s that arrived together;
``encode_calls`` groups those that ask for the same thing (mode, sampling), runs each group as
one ``encode`` (which sorts by length and batches forward passes), and splits the results
back per call. Pure Python over an encoder, so it is tested without Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import InputError, UMEError
from ..inputs.item import Item
from ..model.protocol import EncoderLike
from ..results import EncodeResult

logger = logging.getLogger(__name__)

# encode() keywords a remote caller may set; the rest (batch_size, show_progress, output) are
# the replica's business
CALL_OPTIONS = ("num_samples", "do_sample", "temperature", "top_p", "seed", "max_new_tokens")


@dataclass
class EncodeCall:
    """One caller's inputs and what to compute for them."""

    items: list[Item]
    mode: str = "disc"
    options: dict[str, Any] = field(default_factory=dict)

    def key(self) -> tuple:
        return (self.mode, tuple(sorted((k, repr(v)) for k, v in self.options.items())))


@dataclass
class EncodeReply:
    results: list[EncodeResult]
    prompt_tokens: int = 0  # text tokens of the inputs (OpenAI's usage figure)


def make_call(items: Sequence[Item], mode: str, kwargs: dict[str, Any]) -> EncodeCall:
    """An ``EncodeCall`` from ``encode()``-style keywords (those a replica ignores dropped)."""
    if mode not in ("disc", "gen", "both"):
        raise ValueError(f"mode must be 'disc', 'gen' or 'both', got {mode!r}")
    return EncodeCall(list(items), mode, {k: kwargs[k] for k in CALL_OPTIONS if kwargs.get(k) is not None})


def encode_calls(encoder: EncoderLike, calls: Sequence[EncodeCall]) -> list[EncodeReply]:
    """One reply per call, in order; calls with the same mode and options share an ``encode``."""
    groups: dict[tuple, list[int]] = {}
    for i, call in enumerate(calls):
        groups.setdefault(call.key(), []).append(i)
    replies: list[EncodeReply | None] = [None] * len(calls)
    tokenizer = getattr(getattr(encoder, "processor", None), "tokenizer", None)
    for members in groups.values():
        first = calls[members[0]]
        items = [item for i in members for item in calls[i].items]
        try:
            results = encoder.encode(items, mode=first.mode, **first.options) if items else []
        except Exception as exc:  # noqa: BLE001 - a failed group fails its callers, not the batch
            logger.exception("encode failed for %d input(s)", len(items))
            results = [EncodeResult(index=j, error=UMEError(f"encoding failed: {exc}")) for j in range(len(items))]
        start = 0
        for i in members:
            n = len(calls[i].items)
            mine = results[start:start + n]
            for j, r in enumerate(mine):
                r.index = j
                r.error = _portable(r.error)
            replies[i] = EncodeReply(mine, _text_tokens(tokenizer, calls[i].items))
            start += n
    return replies  # type: ignore[return-value]


def _portable(error: Exception | None) -> Exception | None:
    """An error that survives pickling to another process, with the same message."""
    if error is None or isinstance(error, InputError):
        return error
    return UMEError(str(error))


def _text_tokens(tokenizer: Any, items: Sequence[Item]) -> int:
    texts = [t for item in items for t in (item.instruction, item.text) if t]
    if tokenizer is None or not texts:
        return 0
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
