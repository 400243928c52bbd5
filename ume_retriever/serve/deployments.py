"""The two back-end deployments of ``ume serve``.

- ``EncoderService``: one ``UMEEncoder`` per replica (one GPU each where the cluster has
  GPUs); requests that arrive together are encoded together (``@serve.batch``).
- ``IndexService``: owns the ``UMEIndex`` (the store), runs searches, ingests and deletes,
  and backfills pending gen vectors. Its encoder is a ``RemoteEncoder`` over the encoder
  deployment. One replica for the embedded store (single-process); several against a
  Qdrant server.

Methods of ``IndexService`` answer ``("ok", value)`` or ``("error", status, message)``:
the ingress turns the second into an HTTP error without unpickling foreign exceptions.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

from ray import serve

from ..errors import UMEError
from ..inputs.item import Item
from .batching import EncodeCall, EncodeReply, encode_calls
from .config import ServeConfig
from .remote_encoder import EncoderSpec, RemoteEncoder
from .wire import hit_json, report_json

logger = logging.getLogger(__name__)

Answer = tuple  # ("ok", value) | ("error", status, message)


@serve.deployment(name="encoder")
class EncoderService:
    def __init__(self, config: ServeConfig):
        from ..model.encoder import UMEEncoder

        kwargs = {k: getattr(config, k) for k in ("device", "dtype", "batch_size", "max_new_tokens")
                  if getattr(config, k) is not None}
        self.encoder = UMEEncoder.from_pretrained(config.model, **kwargs)
        self.encode.set_max_batch_size(config.max_batch_size)
        self.encode.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)

    def spec(self) -> EncoderSpec:
        return EncoderSpec.of(self.encoder)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)  # set from the config in __init__
    async def encode(self, calls: list[EncodeCall]) -> list[EncodeReply]:
        # in a thread: the event loop keeps queueing the next batch while this one runs
        return await asyncio.to_thread(encode_calls, self.encoder, calls)


@serve.deployment(name="index")
class IndexService:
    async def __init__(self, encoder: Any, config: ServeConfig):
        from ..index import UMEIndex
        from ..retriever import UMERetriever

        self.config = config
        spec: EncoderSpec = await encoder.spec.remote()
        remote = RemoteEncoder(encoder, spec)
        index = UMEIndex(remote, config.store, url=config.url, api_key=config.qdrant_api_key,
                         collection=config.collection)
        self.retriever = UMERetriever(index)
        self.ingest_lock = threading.Lock()  # one ingest at a time; searches run beside it
        if config.backfill and index.vectors == ("disc", "gen"):
            self.retriever.start_backfill(poll_seconds=2.0)

    @property
    def index(self):
        return self.retriever.index

    def health(self) -> Answer:
        return _answer(lambda: {"model": self.index.encoder.name_or_path, "store": str(self.index.store.location),
                                "collection": self.config.collection, "points": self.index.count(),
                                "gen_pending": self.index.pending_gen(), "gen_failed": self.index.failed_gen(),
                                "vectors": list(self.index.vectors)})

    def search(self, item: Item, k: int, fusion: str | None, filter: dict | None,  # noqa: A002
               gen_samples: int, instruction: str | None) -> Answer:
        def run() -> list[dict]:
            hits = self.index.search(item, k, fusion=fusion, filter=filter, gen_samples=gen_samples,
                                     instruction=instruction)
            return [hit_json(h) for h in hits]

        return _answer(run)

    def add(self, paths: list[str], gen: str, prune: bool) -> Answer:
        def run() -> dict:
            with self.ingest_lock:
                report = self.index.add(paths, prune=prune, gen=gen)
                return report_json(report, self.index.count(), self.index.pending_gen())

        return _answer(run)

    def add_uploads(self, files: list[tuple[str, bytes]], gen: str) -> Answer:
        """Keep each uploaded file under the upload folder (by content), then index them."""
        def run() -> dict:
            paths = []
            for name, data in files:
                folder = Path(self.config.uploads) / hashlib.sha256(data).hexdigest()[:16]
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / _safe_name(name)
                if not path.exists():
                    tmp = path.with_name(path.name + ".part")
                    tmp.write_bytes(data)
                    os.replace(tmp, path)  # never a half-written file under its real name
                paths.append(str(path))
            with self.ingest_lock:
                report = self.index.add(paths, gen=gen)
                return report_json(report, self.index.count(), self.index.pending_gen())

        return _answer(run)

    def delete(self, source: str) -> Answer:
        def run() -> Any:
            n = self.index.delete(source)
            if n == 0:
                return ("error", 404, f"source {source!r} is not in the index")
            return {"source": source, "deleted": n, "points": self.index.count()}

        return _answer(run)

    def __del__(self) -> None:  # Serve calls it on a graceful shutdown: stop backfill, release the store
        retriever = getattr(self, "retriever", None)
        if retriever is not None:
            retriever.close()


def _answer(fn: Callable[[], Any]) -> Answer:
    try:
        value = fn()
    except (UMEError, ValueError, TypeError, KeyError) as exc:  # bad request contents (fusion, filter, ...)
        return ("error", 400, str(exc))
    except Exception as exc:  # noqa: BLE001 - the service keeps serving; the caller learns why
        logger.exception("index service failure")
        return ("error", 500, f"{type(exc).__name__}: {exc}")
    if isinstance(value, tuple) and value and value[0] == "error":
        return value
    return ("ok", value)


def _safe_name(name: str) -> str:
    """The file name of an upload, without any folder part (no writing outside the folder)."""
    base = os.path.basename(name.replace("\\", "/")).strip()
    if base in ("", ".", ".."):
        raise ValueError(f"upload file name {name!r} is not a file name")
    return base
