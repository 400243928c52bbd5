"""Query encoding for search, with an LRU cache: a repeated query runs no model.

The cache holds each query's disc vector and its gen result (reasoning, vectors) separately,
keyed by the query's content (``item_hash``: text, instruction, image and video bytes), the
vector kind, the sampling settings, and the encoder settings that decide vectors
(``encoder_settings``). So a fused search after an ``adaptive`` one that did not reason reuses
its disc vector, and an ``rrf`` search after a ``gen`` one runs no model at all.

Only deterministic encodings are cached: disc always; gen with one greedy sample, or with a
``seed``. Sampled gen without a seed asks for fresh samples each time and is never cached.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable

import numpy as np

from .inputs.item import Item
from .inputs.loaders import item_hash
from .model.checkpoint import pixel_caps
from .model.protocol import EncoderLike
from .results import EncodeResult

DEFAULT_QUERY_CACHE_SIZE = 1024


@dataclass
class QueryVectors:
    """What a search needs of its query: the disc vector and one gen vector per sample."""

    disc: np.ndarray | None = None
    gens: list[np.ndarray] = field(default_factory=list)
    reasoning: str | None = None  # the first sample's
    cached: bool = False  # no model ran for this query


class QueryEncoder:
    """Encodes search queries through ``encoder``, remembering the last ``cache_size`` (0: off)."""

    def __init__(self, encoder: EncoderLike, cache_size: int = DEFAULT_QUERY_CACHE_SIZE):
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"query_cache_size must be an integer >= 0, got {cache_size!r}")
        self.encoder = encoder
        self.cache_size = cache_size
        self._cache: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def encode(self, item: Item, *, disc: bool, gen: bool, sampling: dict[str, Any] | None = None) -> QueryVectors:
        """The query's disc and/or gen vectors; only what the cache lacks is computed, in one call."""
        sampling = dict(sampling or {})
        content = self._content_key(item) if self.cache_size else None
        disc_key = (content, "disc") if content else None
        deterministic = sampling.get("num_samples", 1) == 1 or sampling.get("seed") is not None
        gen_key = (content, "gen", json.dumps(sampling, sort_keys=True)) if content and deterministic else None
        out = QueryVectors()
        have_disc = self._get(disc_key) if disc else None
        have_gen = self._get(gen_key) if gen else None
        need = [name for name, wanted, have in (("disc", disc, have_disc), ("gen", gen, have_gen))
                if wanted and have is None]
        if need:
            mode = "both" if len(need) == 2 else need[0]
            res: EncodeResult = self.encoder.encode(item, mode=mode, **(sampling if "gen" in need else {}))
            res.raise_for_error()
            if "disc" in need:
                have_disc = _finite("disc", np.asarray(res.disc, dtype=np.float32))
                self._put(disc_key, have_disc)
            if "gen" in need:
                have_gen = ([_finite("gen", np.asarray(s.vector, dtype=np.float32)) for s in res.samples],
                            res.reasoning)
                self._put(gen_key, have_gen)
        out.cached = not need
        out.disc = have_disc
        if have_gen is not None:
            out.gens, out.reasoning = list(have_gen[0]), have_gen[1]
        return out

    def _content_key(self, item: Item) -> str:
        settings = {"pixel_caps": pixel_caps(self.encoder.processor), "max_new_tokens": self.encoder.max_new_tokens,
                    "model": getattr(self.encoder, "name_or_path", None)}
        digest = hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
        return f"{item_hash(item)}:{digest}"

    def _get(self, key: Hashable | None) -> Any:
        if key is None:
            return None
        with self._lock:
            value = self._cache.get(key)
            if value is None:
                self.misses += 1
                return None
            self._cache.move_to_end(key)
            self.hits += 1
            return value

    def _put(self, key: Hashable | None, value: Any) -> None:
        if key is None:
            return
        with self._lock:
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)


def _finite(name: str, vector: np.ndarray) -> np.ndarray:
    if not np.isfinite(vector).all():
        raise ValueError(f"the model gave a non-finite (NaN/inf) {name} vector for the query: the checkpoint "
                         "or its dtype is broken (try dtype=float32)")
    return vector
