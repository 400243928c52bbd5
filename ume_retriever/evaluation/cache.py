"""``CachedEncoder``: an encoder whose results are kept on disk, per model and input content.

The evaluation runs the real ``UMEIndex`` (ingest, store, fused search), which calls
``encode`` for candidates and queries. Behind this wrapper each input is encoded once per
model: re-running an evaluation, adding a fusion or a task sharing items never re-encodes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..inputs.item import as_item
from ..model.protocol import EncoderLike
from ..results import EncodeResult, GenOutcome, GenSample

logger = logging.getLogger(__name__)


@dataclass
class _Gen:
    vector: np.ndarray
    reasoning: str
    outcome: str
    num_tokens: int


class CachedEncoder:
    """Wraps an ``UMEEncoder``; ``encode`` serves cached disc vectors, greedy gen results and
    sampled gen results (keyed by num_samples, temperature, top_p, seed) and encodes the rest.
    Other attributes are the wrapped encoder's. ``save()`` writes the cache (also on ``close``)."""

    def __init__(self, encoder: EncoderLike, cache_dir: str | os.PathLike | None = None):
        self.encoder = encoder
        model_key = f"{encoder.name_or_path}|{getattr(encoder, 'revision', None)}|{encoder.max_new_tokens}"
        digest = hashlib.blake2b(model_key.encode(), digest_size=8).hexdigest()
        self.path = Path(cache_dir) / f"encodings-{digest}.pkl" if cache_dir is not None else None
        self._entries: dict[tuple, Any] = {}
        if self.path is not None and self.path.is_file():
            with open(self.path, "rb") as f:
                self._entries = pickle.load(f)
            logger.info("encoding cache %s: %d entries", self.path, len(self._entries))
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:  # name_or_path, embedding_dim, processor, batch_size, ...
        return getattr(self.encoder, name)

    def encode(self, inputs: Any, mode: str = "disc", **kwargs: Any) -> EncodeResult | list[EncodeResult]:
        from ..index import item_hash
        from ..model.encoder import _SINGLE_TYPES

        single = isinstance(inputs, _SINGLE_TYPES) or hasattr(inputs, "convert")
        values: Sequence[Any] = [inputs] if single else list(inputs)
        num_samples = kwargs.get("num_samples", 1)
        sampled = num_samples > 1 or kwargs.get("do_sample")
        gen_key = ("samples", num_samples, kwargs.get("temperature", 1.0), kwargs.get("top_p", 1.0),
                   kwargs.get("seed")) if sampled else ("gen",)
        kinds = {"disc": [("disc",)], "gen": [gen_key], "both": [("disc",), gen_key]}[mode]
        hashes = [item_hash(as_item(v)) for v in values]
        missing = [i for i, h in enumerate(hashes) if any((h, *k) not in self._entries for k in kinds)]
        self.hits += len(values) - len(missing)
        self.misses += len(missing)
        failed: dict[int, EncodeResult] = {}
        if missing:
            fresh = self.encoder.encode([values[i] for i in missing], mode=mode, **kwargs)
            for i, res in zip(missing, fresh):
                if res.error is not None:
                    failed[i] = res
                    continue
                if res.disc is not None:
                    self._entries[(hashes[i], "disc")] = np.asarray(res.disc, dtype=np.float32)
                if res.samples:
                    self._entries[(hashes[i], *gen_key)] = [
                        _Gen(np.asarray(s.vector, dtype=np.float32), s.reasoning, s.outcome.value, s.num_tokens)
                        for s in res.samples]
        out = []
        for i, h in enumerate(hashes):
            if i in failed:
                failed[i].index = i
                out.append(failed[i])
                continue
            res = EncodeResult(index=i)
            if mode in ("disc", "both"):
                res.disc = self._entries[(h, "disc")]
            if mode in ("gen", "both"):
                res.samples = [GenSample(g.vector, g.reasoning, GenOutcome(g.outcome), g.num_tokens)
                               for g in self._entries[(h, *gen_key)]]
                first = res.samples[0]
                res.gen, res.reasoning, res.gen_outcome = first.vector, first.reasoning, first.outcome
            out.append(res)
        return out[0] if single else out

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(self._entries, f)
        os.replace(tmp, self.path)
