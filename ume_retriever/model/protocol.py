"""``EncoderLike``: what the index, the integrations and the evaluation runner use of an encoder.

``UMEEncoder`` is the implementation; evaluation's ``CachedEncoder`` wraps one and stands in
for it. Typing the consumers with this protocol (not ``Any``) says what a replacement must offer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:
    from ..results import EncodeResult


class EncoderLike(Protocol):
    @property
    def name_or_path(self) -> str | None:
        """The checkpoint (hub name or absolute folder) the vectors come from; indexes record it."""

    @property
    def embedding_dim(self) -> int:
        """Size of the disc and the gen vectors."""

    @property
    def batch_size(self) -> int:
        """Inputs per forward pass when ``encode`` is not told otherwise."""

    @property
    def max_new_tokens(self) -> int:
        """Generation budget of a gen vector's reasoning."""

    @property
    def processor(self) -> Any:
        """The Qwen2-VL processor (its pixel caps size images and PDF pages)."""

    def encode(self, inputs: Any | Sequence[Any], mode: str = "disc", **kwargs: Any) -> EncodeResult | list[EncodeResult]:
        """One result per input (a list for a sequence), in order; see ``UMEEncoder.encode``."""
