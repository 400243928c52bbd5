"""``UMEIndex``: files and items in, disc + gen vectors side by side in a store, fused search out.

Ingest is idempotent and crash-safe: a point's id is a UUID of (source, locator, content
hash, vector set), so re-adding never duplicates; unchanged content is found by id (and, for
files, by a per-file manifest written last) without running the model; a changed file's old
points are deleted once its new ones are in. A run killed at any moment and started again
ends with exactly one point per item.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from .errors import InputError
from .fusion import Fusion
from .inputs.item import Item, as_item
from .model.checkpoint import max_image_pixels
from .model.protocol import EncoderLike
from .inputs.loaders import FileLoadError, LoadedItem, LoaderConfig, LoadFailure, file_hash, load_file, walk
from .store import DISC, GEN, FilterSpec, StoredPoint, StoreSchema, VectorQuery, VectorStore, open_store

logger = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("6f1d3c52-8a4e-4b7e-9a55-3f2f6c1e9b10")
Status = Literal["indexed", "unchanged", "failed"]


@dataclass
class IngestEntry:
    source: str
    locator: str
    status: Status
    reason: str | None = None
    id: str | None = None


@dataclass
class IngestReport:
    """Every input of an ``add``: indexed, unchanged, or failed with a reason."""

    entries: list[IngestEntry] = field(default_factory=list)
    deleted_stale: int = 0
    seconds: float = 0.0

    def _with(self, status: str) -> list[IngestEntry]:
        return [e for e in self.entries if e.status == status]

    @property
    def indexed(self) -> list[IngestEntry]:
        return self._with("indexed")

    @property
    def unchanged(self) -> list[IngestEntry]:
        return self._with("unchanged")

    @property
    def failed(self) -> list[IngestEntry]:
        return self._with("failed")

    def summary(self) -> str:
        lines = [f"indexed {len(self.indexed)}, unchanged {len(self.unchanged)}, failed {len(self.failed)}, "
                 f"stale points removed {self.deleted_stale} in {self.seconds:.1f}s"]
        lines += [f"  failed: {e.source}{' ' + e.locator if e.locator else ''}: {e.reason}" for e in self.failed]
        return "\n".join(lines)


@dataclass
class Hit:
    """One search result. ``disc_score``/``gen_score`` are the cosines of each vector (None where
    the query did not compute that vector); with several gen samples, their mean."""

    id: str
    score: float
    disc_score: float | None
    gen_score: float | None
    payload: dict[str, Any]

    @property
    def reasoning(self) -> str | None:
        return self.payload.get("reasoning")

    @property
    def source(self) -> str | None:
        return self.payload.get("source")

    @property
    def page(self) -> int | None:
        return self.payload.get("page")


def point_id(source: str, locator: str, content_hash: str, vectors: Sequence[str]) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{source}|{locator}|{content_hash}|{'+'.join(vectors)}"))


def manifest_id(source: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{source}|manifest"))


def item_hash(item: Item) -> str:
    """A content hash of an in-memory item (text, instruction, image and video bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (item.instruction or "", item.text or ""):
        h.update(part.encode())
        h.update(b"\x00")
    media = list(item.all_images()) + ([] if item.video is None else
                                        (item.video if isinstance(item.video, (list, tuple)) else [item.video]))
    for src in media:
        if isinstance(src, (str, os.PathLike)):
            h.update(file_hash(Path(src)).encode() if Path(src).is_file() else os.fspath(src).encode())
        elif isinstance(src, (bytes, bytearray)):
            h.update(src)
        elif hasattr(src, "tobytes"):
            h.update(src.tobytes())
        h.update(b"\x01")
    h.update(f"{item.video_start}-{item.video_end}".encode())
    return h.hexdigest()


class UMEIndex:
    """Disc and gen vectors of files and items, in a Qdrant store, searched with fusion.

    ``store``: a ``VectorStore``, or a folder for the embedded Qdrant Edge store (default
    ``./ume-index``); ``url`` (+ ``api_key``) instead: a Qdrant server or cluster.
    ``vectors``: which vectors to compute and store ("disc", "gen" or both).
    """

    def __init__(
        self,
        encoder: EncoderLike,
        store: VectorStore | str | os.PathLike | None = None,
        *,
        vectors: Sequence[str] = (DISC, GEN),
        collection: str = "ume",
        url: str | None = None,
        api_key: str | None = None,
        loader: LoaderConfig | None = None,
        batch_size: int | None = None,
        default_fusion: Fusion | str = "rrf",
        prefetch_factor: int = 4,
        flush_batches: int = 4,
    ):
        if not set(vectors) <= {DISC, GEN} or not vectors:
            raise ValueError(f"vectors must be 'disc', 'gen' or both, got {vectors!r}")
        self.encoder = encoder
        self.vectors = tuple(v for v in (DISC, GEN) if v in vectors)
        self.schema = StoreSchema(vector_size=encoder.embedding_dim, model=encoder.name_or_path,
                                  revision=getattr(encoder, "revision", None))
        if url is not None and store is not None:
            raise ValueError("give a store path/object or a url, not both")
        if store is None or isinstance(store, (str, os.PathLike)):
            store = open_store(self.schema, store, url=url, api_key=api_key, collection=collection)
        self.store: VectorStore = store
        cap = max_image_pixels(encoder.processor)
        self.loader = loader or LoaderConfig(pdf_max_pixels=cap)
        if self.loader.pdf_max_pixels is None:
            self.loader = LoaderConfig(**{**self.loader.__dict__, "pdf_max_pixels": cap})
        self.batch_size = batch_size or encoder.batch_size
        self.flush_batches = max(1, flush_batches)  # batches encoded (then upserted) together
        self.default_fusion = Fusion.parse(default_fusion)
        if prefetch_factor < 1:
            raise ValueError("prefetch_factor must be >= 1")
        self.prefetch_factor = prefetch_factor

    @property
    def mode(self) -> str:
        return "both" if len(self.vectors) == 2 else self.vectors[0]

    # -- ingest -------------------------------------------------------------------------------

    def add(self, inputs: Iterable[Any] | str | os.PathLike, *, show_progress: bool = False) -> IngestReport:
        """Index files, folders and items; return what happened to each."""
        started = time.perf_counter()
        report = IngestReport()
        if isinstance(inputs, (str, os.PathLike, Item)):
            inputs = [inputs]
        # Bounded (rendered pages wait here), but deep enough for the loader to run a flush ahead.
        work: queue.Queue = queue.Queue(maxsize=2 * self.batch_size * self.flush_batches)
        stop = threading.Event()  # set when this call ends, however it ends: the loader quits
        loader = threading.Thread(target=self._produce, args=(list(inputs), _Feed(work, stop)), daemon=True)
        loader.start()  # loading/rendering overlaps with encoding
        from tqdm.auto import tqdm

        pending: list[tuple[LoadedItem, str]] = []
        source_ids: dict[str, dict[str, str]] = {}  # source -> {point id: locator}
        source_failed: set[str] = set()
        loaded_sources: list[tuple[str, str]] = []  # fully loaded files waiting for their last batch

        def flush() -> None:
            nonlocal pending
            self._flush(pending, report, source_failed)
            bar.update(len(pending))
            pending = []
            # Files whose items are all in the store now: drop stale points, write manifests.
            done = [(src, fhash, source_ids.get(src, {})) for src, fhash in loaded_sources if src not in source_failed]
            report.deleted_stale += self._finish_sources(done)
            loaded_sources.clear()

        with tqdm(desc="indexing", unit="item", disable=not show_progress) as bar:
            try:
                while True:
                    msg = work.get()
                    if msg is None:
                        break
                    kind, payload = msg
                    if kind == "failure":
                        report.entries.append(IngestEntry(payload.source, "", "failed", payload.reason))
                        source_failed.add(payload.source)
                    elif kind == "unchanged":
                        report.entries.extend(payload)
                        bar.update(len(payload))
                    elif kind == "item":
                        loaded: LoadedItem = payload
                        pid = point_id(loaded.source, loaded.locator, loaded.content_hash, self.vectors)
                        source_ids.setdefault(loaded.source, {})[pid] = loaded.locator
                        pending.append((loaded, pid))
                        # A few batches per encode call (encode() sorts them by length, less padding),
                        # but never let the model wait for the loader: go as soon as a batch is
                        # ready and nothing else is queued.
                        if len(pending) >= self.batch_size * self.flush_batches or (
                                len(pending) >= self.batch_size and work.empty()):
                            flush()
                    elif kind == "done":  # finished at the next flush, so small files share batches
                        loaded_sources.append(payload)
                flush()
            finally:
                stop.set()  # a consumer that raised must not leave the loader blocked on a full queue
                loader.join()
        report.seconds = time.perf_counter() - started
        logger.info("ingest: %s", report.summary())
        return report

    def update(self, inputs: Iterable[Any] | str | os.PathLike, **kwargs: Any) -> IngestReport:
        """Same as ``add``: changed content replaces its old points, unchanged content is skipped."""
        return self.add(inputs, **kwargs)

    def delete(self, source: str | os.PathLike) -> int:
        """Remove every point of a source (a file path or an item's ``metadata['source']``)."""
        keys = source_keys(source)
        n = self.store.count({"source": keys, "kind": "item"})
        self.store.delete_where({"source": keys})
        return n

    def count(self, flt: FilterSpec | None = None) -> int:
        return self.store.count({**(flt or {}), "kind": "item"})

    def _produce(self, inputs: list[Any], out: "_Feed") -> None:
        """Loader thread: items (lazily), per-file 'unchanged' shortcuts and failures, in order."""
        seen: set[str] = set()  # a file named twice (or inside a folder also named) is indexed once
        try:
            for value in inputs:
                if isinstance(value, (str, os.PathLike)):
                    for path in walk([value]):
                        if isinstance(path, LoadFailure):
                            out.put(("failure", path))
                        elif str(path) not in seen:
                            seen.add(str(path))
                            self._produce_file(path, out)
                else:
                    try:
                        item = as_item(value)
                    except InputError as exc:
                        out.put(("failure", LoadFailure(f"<input {type(value).__name__}>", exc.reason)))
                        continue
                    source = str(item.metadata.get("source") or f"item:{item_hash(item)}")
                    chash = item_hash(item)
                    out.put(("item", LoadedItem(item, source, str(item.metadata.get("locator", "")),
                                                _modality(item), chash, chash, text=item.text)))
        except _Stopped:
            return  # the consumer has gone
        except Exception as exc:  # noqa: BLE001 - never leave the consumer waiting
            logger.exception("loader thread failed")
            with contextlib.suppress(_Stopped):
                out.put(("failure", LoadFailure("<loader>", f"{type(exc).__name__}: {exc}")))
        with contextlib.suppress(_Stopped):
            out.put(None)

    def _produce_file(self, path: Path, out: "_Feed") -> None:
        source = str(path)
        try:
            fhash = file_hash(path)
        except OSError as exc:
            out.put(("failure", LoadFailure(source, f"cannot read file ({exc.strerror or exc})")))
            return
        unchanged = self._unchanged_file(source, fhash)
        if unchanged is not None:
            out.put(("unchanged", unchanged))
            return
        try:
            for loaded in load_file(path, self.loader, fhash):
                out.put(("item", loaded))
        except FileLoadError as exc:
            out.put(("failure", LoadFailure(source, str(exc))))
            return
        out.put(("done", (source, fhash)))

    def _unchanged_file(self, source: str, fhash: str) -> list[IngestEntry] | None:
        """Entries for a file whose manifest says it is fully indexed as it is now, else None."""
        found = self.store.scroll({"source": source, "kind": "manifest"}, ["file_hash", "vectors", "items"])
        for _, manifest in found:
            if manifest.get("file_hash") == fhash and manifest.get("vectors") == list(self.vectors):
                items = manifest.get("items", [])
                if self.store.count({"source": source, "kind": "item"}) == len(items):
                    return [IngestEntry(source, loc, "unchanged", id=pid) for pid, loc in items]
        return None

    def _flush(self, pending: list[tuple[LoadedItem, str]], report: IngestReport, failed: set[str]) -> None:
        """Encode what is not in the store yet, upsert it, and report every item."""
        if not pending:
            return
        existing = self.store.existing_ids([pid for _, pid in pending])
        todo = [(loaded, pid) for loaded, pid in pending if pid not in existing]
        report.entries.extend(IngestEntry(l.source, l.locator, "unchanged", id=pid)
                              for l, pid in pending if pid in existing)
        if not todo:
            return
        results = self.encoder.encode([loaded.item for loaded, _ in todo], mode=self.mode, batch_size=self.batch_size)
        now = datetime.now(timezone.utc).isoformat()
        points = []
        for (loaded, pid), res in zip(todo, results):
            if res.error is not None:
                report.entries.append(IngestEntry(loaded.source, loaded.locator, "failed", res.error.reason
                                                  if isinstance(res.error, InputError) else str(res.error)))
                failed.add(loaded.source)
                continue
            vectors = {}
            if res.disc is not None:
                vectors[DISC] = res.disc
            if res.gen is not None:
                vectors[GEN] = res.gen
            payload = {
                **{k: v for k, v in loaded.item.metadata.items() if k not in ("source", "locator")},
                **loaded.fields,
                "kind": "item", "source": loaded.source, "locator": loaded.locator, "modality": loaded.modality,
                "text": loaded.text, "reasoning": res.reasoning,
                "gen_outcome": res.gen_outcome.value if res.gen_outcome else None,
                "content_hash": loaded.content_hash, "file_hash": loaded.file_hash,
                "model": self.schema.model, "revision": self.schema.revision, "vectors": list(self.vectors),
                "ingested_at": now,
            }
            points.append(StoredPoint(id=pid, vectors=vectors, payload=payload))
            report.entries.append(IngestEntry(loaded.source, loaded.locator, "indexed", id=pid))
        self.store.upsert(points)

    def _finish_sources(self, done: list[tuple[str, str, dict[str, str]]]) -> int:
        """For fully loaded files: delete points that are not current, then write their
        manifests (last, in one upsert: a crash before it only means a slow path next time)."""
        if not done:
            return 0
        stale = []
        for source, _, ids in done:
            stale += [pid for pid, _ in self.store.scroll({"source": source, "kind": "item"}, []) if pid not in ids]
        self.store.delete_ids(stale)
        self.store.upsert([
            StoredPoint(id=manifest_id(source), vectors={}, payload={
                "kind": "manifest", "source": source, "file_hash": fhash, "vectors": list(self.vectors),
                "items": sorted([pid, loc] for pid, loc in ids.items())})
            for source, fhash, ids in done
        ])
        return len(stale)

    def optimize(self) -> None:
        """Build the store's vector indexes (after a large ingest)."""
        self.store.optimize()

    # -- search -------------------------------------------------------------------------------

    def search(
        self,
        query: Any,
        k: int = 10,
        *,
        fusion: Fusion | str | None = None,
        filter: FilterSpec | None = None,  # noqa: A002 - the name users expect
        gen_samples: int = 1,
        instruction: str | None = None,
        prefetch_factor: int | None = None,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[Hit]:
        """The ``k`` best points for a query (text, image, video, or an ``Item`` mixing them).

        ``fusion``: "rrf" (default), "weighted", "dbsf", "disc", "gen" or a ``Fusion``.
        ``gen_samples=k`` samples k reasoning chains and fuses their k gen prefetches with the
        disc one (pass@k at query time). Each prefetch fetches ``k * prefetch_factor`` points.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        fusion = Fusion.parse(fusion or self.default_fusion)
        if fusion.needs_disc and DISC not in self.vectors or fusion.needs_gen and GEN not in self.vectors:
            only = self.vectors[0]
            if fusion.method in ("disc", "gen"):
                raise ValueError(f"this index stores only {only} vectors: fusion {fusion.method!r} is impossible")
            fusion = Fusion(only)  # the other vector does not exist here: search the one there is
        item = as_item(query)
        if instruction is not None:
            item = Item(**{**item.__dict__, "instruction": instruction})
        mode = "both" if fusion.needs_disc and fusion.needs_gen else ("disc" if fusion.needs_disc else "gen")
        sampling = {"num_samples": gen_samples, "temperature": temperature, "seed": seed} if gen_samples > 1 else {}
        res = self.encoder.encode(item, mode=mode, **sampling)
        res.raise_for_error()
        queries = [VectorQuery(DISC, res.disc)] if res.disc is not None else []
        queries += [VectorQuery(GEN, np.asarray(s.vector)) for s in res.samples]
        factor = prefetch_factor or self.prefetch_factor
        stored = self.store.query(queries, fusion, limit=k, prefetch_limit=k * factor, flt=filter)
        hits = []
        gen_rows = [i for i, q in enumerate(queries) if q.using == GEN]
        for h in stored:
            disc_score = h.query_scores[0] if res.disc is not None else None
            gen_scores = [h.query_scores[i] for i in gen_rows if h.query_scores[i] is not None]
            gen_score = float(np.mean(gen_scores)) if gen_scores else None
            hits.append(Hit(id=h.id, score=h.score, disc_score=disc_score, gen_score=gen_score, payload=h.payload))
        return hits

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "UMEIndex":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def source_keys(source: str | os.PathLike) -> list[str]:
    """How a source may be stored: files as absolute paths (even once gone from disk), item
    sources (``metadata['source']``, e.g. "db://notes/1") as given."""
    text = os.fspath(source)
    keys = [str(Path(text).expanduser().absolute())]
    if not isinstance(source, os.PathLike) and text not in keys:
        keys.append(text)
    return keys


def _modality(item: Item) -> str:
    if item.video is not None:
        return "video"
    if item.all_images():
        return "image+text" if item.text else "image"
    return "text"


class _Stopped(Exception):
    """The consumer of an ingest ended; the loader thread stops."""


class _Feed:
    """The loader's end of the work queue: ``put`` gives up once the consumer has stopped."""

    def __init__(self, work: queue.Queue, stop: threading.Event):
        self.work = work
        self.stop = stop

    def put(self, msg: Any) -> None:
        while not self.stop.is_set():
            try:
                self.work.put(msg, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped
