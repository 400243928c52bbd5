"""``RemoteEncoder``: an ``EncoderLike`` whose ``encode`` runs on the encoder deployment.

The search/index deployment owns a ``UMEIndex`` like any process does; only its encoder is
this stand-in, so ingest, backfill, the query cache and fused search are the same code as in
process, and every model call joins the encoder replicas' request batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

from ..inputs.item import as_item
from ..results import EncodeResult
from .batching import make_call


@dataclass
class EncoderSpec:
    """What an index needs to know of the encoder besides ``encode`` (sent once at start)."""

    name_or_path: str
    revision: str | None
    embedding_dim: int
    batch_size: int
    max_new_tokens: int
    num_video_frames: int | None
    processor: Any  # the Qwen2-VL processor: its pixel caps size PDF pages and images

    @classmethod
    def of(cls, encoder: Any) -> "EncoderSpec":
        return cls(encoder.name_or_path, getattr(encoder, "revision", None), encoder.embedding_dim,
                   encoder.batch_size, encoder.max_new_tokens,
                   getattr(getattr(encoder, "preparer", None), "num_video_frames", None), encoder.processor)


class RemoteEncoder:
    """Call only from a thread that is not running an event loop (``.result()`` blocks)."""

    def __init__(self, handle: Any, spec: EncoderSpec):
        self.handle = handle
        self.name_or_path = spec.name_or_path
        self.revision = spec.revision
        self.embedding_dim = spec.embedding_dim
        self.batch_size = spec.batch_size
        self.max_new_tokens = spec.max_new_tokens
        self.processor = spec.processor
        self.preparer = SimpleNamespace(num_video_frames=spec.num_video_frames)  # read by encoder_settings

    def encode(self, inputs: Any | Sequence[Any], mode: str = "disc", **kwargs: Any) -> EncodeResult | list[EncodeResult]:
        single = not isinstance(inputs, (list, tuple))
        items = [as_item(v) for v in ([inputs] if single else inputs)]
        reply = self.handle.encode.remote(make_call(items, mode, kwargs)).result()
        if kwargs.get("output") == "list":
            for r in reply.results:
                r.disc = None if r.disc is None else r.disc.tolist()
                r.gen = None if r.gen is None else r.gen.tolist()
        return reply.results[0] if single else reply.results
