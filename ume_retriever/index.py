"""``UMEIndex``: files and items in, disc + gen vectors side by side in a store, fused search out.

Ingest is idempotent and crash-safe: a point's id is a UUID of (source, locator, content
hash, vector set, encoder settings), so re-adding never duplicates; unchanged content is found
by id (and, for files, by a per-file manifest written last, which also records the loader and
encoder settings: a change of either re-indexes the file) without running the model; a changed
file's old points are deleted once its new ones are in. A run killed at any moment and started
again ends with exactly one point per item.

Failures never stop an ingest: one bad file is one failed entry (with its reason) and the rest
goes on. A file that fails after it was indexed keeps its last good version searchable; its
manifest records the failure (``ume info`` lists such stale sources). A file that was being
decoded when the process died (a decoder crash) is quarantined by the ingest journal.
"""

from __future__ import annotations

import contextlib
import logging
import math
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

from .backfill import BackfillReport, backfill_gen
from .errors import InputError
from .faults import fault_point
from .fusion import Fusion
from .ingest_journal import IngestJournal, journal_path
from .ingest_points import (  # noqa: F401 - IngestEntry and the limits are part of this module's API
    MAX_PAYLOAD_TEXT_CHARS, MAX_UPSERT_BYTES, NAMESPACE, NO_ITEMS, NOT_REREADABLE, IngestEntry, PointBuilder, Status,
    encoder_settings, in_memory_item, point_id, settings_id, upsert_batches,
)
from .inputs import decode_guard
from .inputs.item import Item, as_item
from .inputs.loaders import (
    FileLoadError, LoadedItem, LoaderConfig, LoadFailure, Skipped, file_hash, load_file, printable_path,
    walk,
)
from .model.checkpoint import max_image_pixels
from .model.protocol import EncoderLike
from .query_vectors import DEFAULT_QUERY_CACHE_SIZE, QueryEncoder
from .store import (
    DISC, GEN, GEN_FAILED, GEN_PENDING, GEN_STATUS, FilterSpec, StoredPoint, StoreSchema, VectorQuery, VectorStore,
    open_store,
)

logger = logging.getLogger(__name__)

GenWhen = Literal["now", "later"]
# An ingest that writes at least this many points builds the store's HNSW indexes at its end.
OPTIMIZE_AFTER_POINTS = 1_000


@dataclass
class IngestReport:
    """Every input of an ``add``: indexed, unchanged, or failed with a reason."""

    entries: list[IngestEntry] = field(default_factory=list)
    deleted_stale: int = 0
    seconds: float = 0.0
    optimized: bool = False  # the store's vector indexes were (re)built at the end
    gen_pending: int = 0  # points stored with gen="later": searchable, their gen vector waits for backfill
    # gen="later" items that got their gen vector at once: in-memory items with images or video
    # (or text too long for the payload) cannot be read again by a later backfill
    gen_now: list[IngestEntry] = field(default_factory=list)

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

    @property
    def skipped(self) -> list[IngestEntry]:
        """Paths deliberately not indexed (links out of the folder, FIFOs, ...), with why."""
        return self._with("skipped")

    @property
    def removed(self) -> list[IngestEntry]:
        """Sources whose files are gone, deleted from the index by ``prune``."""
        return self._with("removed")

    def summary(self) -> str:
        lines = [f"indexed {len(self.indexed)}, unchanged {len(self.unchanged)}, failed {len(self.failed)}, "
                 f"skipped {len(self.skipped)}, removed {len(self.removed)}, stale points removed "
                 f"{self.deleted_stale} in {self.seconds:.1f}s"]
        if self.gen_pending or self.gen_now:
            lines[0] += f"; gen pending {self.gen_pending} (run backfill_gen / ume backfill)"
        if self.gen_now:
            lines.append(f"  gen computed now for {len(self.gen_now)} in-memory item(s): {self.gen_now[0].reason}")
        for e in self.failed + self.skipped + self.removed:
            lines.append(f"  {e.status}: {e.source}{' ' + e.locator if e.locator else ''}: {e.reason}")
        return "\n".join(lines)


@dataclass
class Hit:
    """One search result. ``disc_score``/``gen_score`` are the cosines of each vector (None where
    the query did not compute that vector); with several gen samples, their mean. ``reasoning``
    is the stored item's reasoning, ``query_reasoning`` the query's."""

    id: str
    score: float
    disc_score: float | None
    gen_score: float | None  # None also for a point whose gen vector is pending (staged ingestion)
    payload: dict[str, Any]
    reasoned: bool = False  # the query reasoned (a gen vector of the query was used)
    query_reasoning: str | None = None  # the query's reasoning (first sample), when it reasoned

    @property
    def reasoning(self) -> str | None:
        return self.payload.get("reasoning")

    @property
    def source(self) -> str | None:
        return self.payload.get("source")

    @property
    def page(self) -> int | None:
        return self.payload.get("page")


def manifest_id(source: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{source}|manifest"))


class UMEIndex:
    """Disc and gen vectors of files and items, in a Qdrant store, searched with fusion.

    ``store``: a ``VectorStore``, or a folder for the embedded Qdrant Edge store (default
    ``./ume-index``); ``url`` (+ ``api_key``) instead: a Qdrant server or cluster.
    ``vectors``: which vectors to compute and store ("disc", "gen" or both).
    ``query_cache_size``: query encodings kept (LRU; 0 turns the cache off).
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
        query_cache_size: int = DEFAULT_QUERY_CACHE_SIZE,
    ):
        if not set(vectors) <= {DISC, GEN} or not vectors:
            raise ValueError(f"vectors must be 'disc', 'gen' or both, got {vectors!r}")
        self.encoder = encoder
        self.vectors = tuple(v for v in (DISC, GEN) if v in vectors)
        self.schema = StoreSchema(vector_size=encoder.embedding_dim, model=encoder.name_or_path,
                                  revision=getattr(encoder, "revision", None))
        if url is not None and store is not None:
            raise ValueError("give a store path/object or a url, not both")
        self._api_key = api_key  # encoder actors of a Ray ingest write to the same server with it
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
        self.encoder_settings = encoder_settings(encoder)
        self.settings_id = settings_id(self.encoder_settings)
        self.journal = IngestJournal(journal_path(str(getattr(self.store, "location", ":memory:")), collection))
        # Held around deletions and gen backfill writes: a backfill never re-creates a point an
        # ingest of this process just deleted as stale.
        self.write_lock = threading.RLock()
        self.queries = QueryEncoder(encoder, query_cache_size)  # query vectors, LRU-cached
        self._gen_later = False  # set per add()

    @property
    def encoder(self) -> EncoderLike:
        return self._encoder

    @encoder.setter
    def encoder(self, encoder: EncoderLike) -> None:
        """Another encoder (same schema): cached query vectors of the old one are dropped."""
        self._encoder = encoder
        if hasattr(self, "queries"):
            self.queries.encoder = encoder
            self.queries.clear()

    @property
    def mode(self) -> str:
        return "both" if len(self.vectors) == 2 else self.vectors[0]

    # -- ingest -------------------------------------------------------------------------------

    def add(
        self,
        inputs: Iterable[Any] | str | os.PathLike,
        *,
        show_progress: bool = False,
        prune: bool = False,
        retry_quarantined: bool = False,
        optimize: bool | None = None,
        gen: GenWhen = "now",
        ray: str | None = None,
        encoders: int = 1,
        gpus_per_encoder: float | None = None,
        threads_per_encoder: int | None = None,
    ) -> IngestReport:
        """Index files, folders and items; return what happened to each.

        ``gen="later"``: store the disc vectors only (one forward pass per item), searchable at
        once; each point's gen vector waits for ``backfill_gen`` (its payload says
        ``gen_status: "pending"``). Fused searches rank a pending point in the gen list as it
        ranks in the disc list (``fusion.fuse_lists``). Files are read again by the backfill;
        in-memory items are too when they are text only (their text is in the payload), and
        get their gen vector at once otherwise (listed in ``report.gen_now``).

        ``prune``: also delete the points of files under the given folders that no longer
        exist (reported as ``removed``). ``retry_quarantined``: try again files an earlier
        ingest died on while decoding them (otherwise reported as failed until they change).
        ``optimize``: build the store's vector indexes at the end (None: when this call wrote
        ``OPTIMIZE_AFTER_POINTS`` points or more).

        ``ray``: run the ingest on Ray Data ("local", "auto" or a cluster address; see
        ``ume_retriever.ray_ingest``), with ``encoders`` encoder actors of
        ``gpus_per_encoder`` GPUs (None: 1 where the cluster has GPUs, else 0) and, on CPU,
        ``threads_per_encoder`` torch threads each. Same ids, points, manifests and report as
        in process; the encoder is loaded again in each actor from ``encoder.recipe``.
        """
        started = time.perf_counter()
        if gen not in ("now", "later"):
            raise ValueError(f"gen must be 'now' or 'later', got {gen!r}")
        if gen == "later" and self.vectors != (DISC, GEN):
            raise ValueError(f"gen='later' needs an index of both vectors; this one stores only {self.mode}")
        self._gen_later = gen == "later"
        report = IngestReport()
        if isinstance(inputs, (str, os.PathLike, Item)):
            inputs = [inputs]
        inputs = list(inputs)
        self.journal.recover()
        self._retry_quarantined = retry_quarantined
        if ray is not None:
            from .ray_ingest import RayOptions, ray_add

            ray_add(self, inputs, report, RayOptions(ray, encoders, gpus_per_encoder, threads_per_encoder),
                    show_progress)
        else:
            if encoders != 1 or gpus_per_encoder is not None or threads_per_encoder is not None:
                raise ValueError("encoders, gpus_per_encoder and threads_per_encoder are options of add(ray=...)")
            with decode_guard.watching(self.journal):
                self._ingest(inputs, report, show_progress)
        if prune:
            self._prune(inputs, report)
        written = len(report.indexed)
        if optimize or (optimize is None and written >= OPTIMIZE_AFTER_POINTS):
            self.store.optimize()
            report.optimized = True
        report.seconds = time.perf_counter() - started
        logger.info("ingest: %s", report.summary())
        return report

    def _ingest(self, inputs: list[Any], report: IngestReport, show_progress: bool) -> None:
        """The loader thread and the encode/upsert loop of one ``add``."""
        # Bounded (rendered pages wait here), but deep enough for the loader to run a flush ahead.
        work: queue.Queue = queue.Queue(maxsize=2 * self.batch_size * self.flush_batches)
        stop = threading.Event()  # set when this call ends, however it ends: the loader quits
        loader = threading.Thread(target=self._produce, args=(inputs, _Feed(work, stop)), daemon=True)
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
            self.journal.settle([src for src, _ in loaded_sources])
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
                        self._record_failure(payload.source, payload.reason)
                    elif kind == "skipped":
                        report.entries.append(IngestEntry(payload.source, "", "skipped", payload.reason))
                    elif kind == "unchanged":
                        report.entries.extend(payload)
                        bar.update(len(payload))
                    elif kind == "item":
                        loaded: LoadedItem = payload
                        pid = point_id(loaded.source, loaded.locator, loaded.content_hash, self.vectors,
                                       self.settings_id)
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

    def update(self, inputs: Iterable[Any] | str | os.PathLike, **kwargs: Any) -> IngestReport:
        """Same as ``add``: changed content replaces its old points, unchanged content is skipped."""
        return self.add(inputs, **kwargs)

    def delete(self, source: str | os.PathLike) -> int:
        """Remove every point of a source (a file path or an item's ``metadata['source']``)."""
        keys = source_keys(source)
        with self.write_lock:
            n = self.store.count({"source": keys, "kind": "item"})
            self.store.delete_where({"source": keys})
        return n

    def count(self, flt: FilterSpec | None = None) -> int:
        return self.store.count({**(flt or {}), "kind": "item"})

    # -- staged ingestion ---------------------------------------------------------------------

    def pending_gen(self) -> int:
        """Points stored with ``gen="later"`` whose gen vector is not computed yet."""
        return self.store.count({"kind": "item", GEN_STATUS: GEN_PENDING})

    def failed_gen(self) -> int:
        """Points whose gen backfill failed (``gen_error`` says why; ``retry_failed`` retries)."""
        return self.store.count({"kind": "item", GEN_STATUS: GEN_FAILED})

    def backfill_gen(
        self, limit: int | None = None, show_progress: bool = False, *, retry_failed: bool = False,
        batch_size: int | None = None, stop: threading.Event | None = None, ray: str | None = None,
        encoders: int = 1, gpus_per_encoder: float | None = None, threads_per_encoder: int | None = None,
    ) -> BackfillReport:
        """Compute pending gen vectors (newest ingest first; see ``ume_retriever.backfill``).
        Resumable, kill -9 safe, idempotent, safe while searches run. ``int(report)`` is the
        number filled; ``stop`` (an event) ends it between windows. ``ray`` (and the actor
        options, as in ``add``): run it on Ray Data (``ume_retriever.ray_backfill``)."""
        if ray is not None:
            from .ray_backfill import ray_backfill
            from .ray_ingest import RayOptions

            if stop is not None:
                raise ValueError("stop= is not supported with ray=: the backfill runs to its end (or its limit)")
            return ray_backfill(self, limit=limit, show_progress=show_progress, retry_failed=retry_failed,
                                batch_size=batch_size,
                                options=RayOptions(ray, encoders, gpus_per_encoder, threads_per_encoder))
        if encoders != 1 or gpus_per_encoder is not None or threads_per_encoder is not None:
            raise ValueError("encoders, gpus_per_encoder and threads_per_encoder are options of backfill_gen(ray=...)")
        return backfill_gen(self, limit=limit, show_progress=show_progress, retry_failed=retry_failed,
                            batch_size=batch_size, stop=stop)

    def _produce(self, inputs: list[Any], out: "_Feed") -> None:
        """Loader thread: items (lazily), per-file 'unchanged' shortcuts and failures, in order."""
        seen: set[str] = set()  # a file named twice (or inside a folder also named) is indexed once
        try:
            for value in inputs:
                if isinstance(value, (str, os.PathLike)):
                    for path in walk([value], follow_symlinks=self.loader.follow_symlinks):
                        if isinstance(path, LoadFailure):
                            out.put(("failure", path))
                        elif isinstance(path, Skipped):
                            out.put(("skipped", path))
                        elif str(path) not in seen:
                            seen.add(str(path))
                            self._produce_file_safely(path, out)
                else:
                    try:
                        item = as_item(value)
                    except InputError as exc:
                        out.put(("failure", LoadFailure(f"<input {type(value).__name__}>", exc.reason)))
                        continue
                    out.put(("item", in_memory_item(item)))
        except _Stopped:
            return  # the consumer has gone
        except Exception as exc:  # noqa: BLE001 - never leave the consumer waiting
            logger.exception("loader thread failed")
            with contextlib.suppress(_Stopped):
                out.put(("failure", LoadFailure("<loader>", f"{type(exc).__name__}: {exc}")))
        with contextlib.suppress(_Stopped):
            out.put(None)

    def _produce_file_safely(self, path: Path, out: "_Feed") -> None:
        """One file; whatever goes wrong while loading it is that file's failed entry."""
        try:
            self._produce_file(path, out)
        except _Stopped:
            raise
        except Exception as exc:  # noqa: BLE001 - MemoryError, a store error, a library's: this file only
            logger.warning("loading %s failed", printable_path(path), exc_info=True)
            out.put(("failure", LoadFailure(printable_path(path), f"unexpected {type(exc).__name__} while loading: {exc}")))

    def _produce_file(self, path: Path, out: "_Feed") -> None:
        checked = self.check_file(path)
        if not isinstance(checked, str):
            out.put(checked)
            return
        fhash = checked
        source = str(path)
        self.journal.set_file_hash(source, fhash)
        count = 0
        try:
            for loaded in load_file(path, self.loader, fhash):
                count += 1
                out.put(("item", loaded))
        except FileLoadError as exc:
            out.put(("failure", LoadFailure(source, str(exc))))
            return
        if count == 0:
            out.put(("failure", LoadFailure(source, NO_ITEMS)))
            return
        out.put(("done", (source, fhash)))

    def check_file(self, path: Path) -> str | tuple[str, Any]:
        """Before any loading: the file's hash when it must be (re)loaded, else the message that
        settles it: ``("failure", LoadFailure)`` (unreadable, quarantined) or ``("unchanged",
        entries)`` (its manifest says it is indexed as it is now)."""
        source = str(path)
        try:
            fhash = file_hash(path)
        except OSError as exc:
            return "failure", LoadFailure(source, f"cannot read file ({exc.strerror or exc})")
        quarantined = self.journal.quarantine_reason(source, fhash)
        if quarantined is not None:
            if not self._retry_quarantined:
                return "failure", LoadFailure(source, f"quarantined: {quarantined}; it is not opened again "
                                                      "until it changes, or retry it with add(..., "
                                                      "retry_quarantined=True) / ume index --retry-quarantined")
            self.journal.release(source)
        unchanged = self._unchanged_file(source, fhash)
        if unchanged is not None:
            return "unchanged", unchanged
        return fhash

    @property
    def manifest_settings(self) -> dict[str, Any]:
        """What a file's manifest must match, besides its content, for the file to be unchanged."""
        return {"vectors": list(self.vectors), "loader": self.loader.fingerprint(), "encoder": self.settings_id}

    def _unchanged_file(self, source: str, fhash: str) -> list[IngestEntry] | None:
        """Entries for a file whose manifest says it is fully indexed as it is now, with these
        settings, else None."""
        found = self.store.scroll({"source": source, "kind": "manifest"},
                                  ["kind", "source", "file_hash", "settings", "items", "last_error", "last_error_at"])
        for _, manifest in found:
            if manifest.get("file_hash") == fhash and manifest.get("settings") == self.manifest_settings:
                items = manifest.get("items", [])
                if self.store.count({"source": source, "kind": "item"}) == len(items):
                    if manifest.get("last_error"):  # restored to its indexed version: no longer stale
                        clean = {k: v for k, v in manifest.items() if k not in ("last_error", "last_error_at")}
                        self.store.upsert([StoredPoint(id=manifest_id(source), vectors={}, payload=clean)])
                    return [IngestEntry(source, loc, "unchanged", id=pid) for pid, loc in items]
        return None

    def _record_failure(self, source: str, reason: str) -> None:
        """A file that failed now but was indexed before keeps its last good version, marked in
        its manifest (``last_error``) so that ``ume info`` can list it as stale."""
        try:
            fields = ["kind", "source", "file_hash", "settings", "items"]
            for _, manifest in self.store.scroll({"source": source, "kind": "manifest"}, fields):
                manifest.update(last_error=reason, last_error_at=datetime.now(timezone.utc).isoformat())
                self.store.upsert([StoredPoint(id=manifest_id(source), vectors={}, payload=manifest)])
                return
        except Exception:  # noqa: BLE001 - the failure itself is already reported
            logger.warning("could not mark %s as stale", source, exc_info=True)

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
        points = []
        for built in self.point_builder().build(self.encoder, todo, self.batch_size):
            report.entries.append(built.entry)
            if built.point is None:
                failed.add(built.entry.source)
                continue
            points.append(built.point)
            report.gen_pending += built.deferred
            if built.gen_now:
                report.gen_now.append(IngestEntry(built.entry.source, built.entry.locator, "indexed",
                                                  NOT_REREADABLE, id=built.entry.id))
        self._upsert(points)
        fault_point("after_item_upsert")

    def point_builder(self) -> PointBuilder:
        """How this index turns loaded items into points (for the current ``add``)."""
        return PointBuilder(self.vectors, self.schema.model, self.schema.revision, gen_later=self._gen_later)

    def _upsert(self, points: list[StoredPoint]) -> None:
        """Upsert in requests of at most ``MAX_UPSERT_BYTES`` (as JSON, roughly) each."""
        for batch in upsert_batches(points):
            self.store.upsert(batch)

    def _finish_sources(self, done: list[tuple[str, str, dict[str, str]]]) -> int:
        """For fully loaded files: delete points that are not current, then write their
        manifests (last, in one upsert: a crash before it only means a slow path next time)."""
        if not done:
            return 0
        stale = []
        for source, _, ids in done:
            stale += [pid for pid, _ in self.store.scroll({"source": source, "kind": "item"}, []) if pid not in ids]
        with self.write_lock:
            self.store.delete_ids(stale)
        fault_point("after_stale_delete")
        fault_point("before_manifest_write")
        self._upsert([
            StoredPoint(id=manifest_id(source), vectors={}, payload={
                "kind": "manifest", "source": source, "file_hash": fhash, "settings": self.manifest_settings,
                "items": sorted([pid, loc] for pid, loc in ids.items())})
            for source, fhash, ids in done
        ])
        return len(stale)

    def _prune(self, inputs: list[Any], report: IngestReport) -> None:
        """Delete the points of files under the folders in ``inputs`` that no longer exist."""
        folders = [str(Path(v).expanduser().absolute()) for v in inputs
                   if isinstance(v, (str, os.PathLike)) and Path(v).expanduser().is_dir()]
        if not folders:
            return
        gone: set[str] = set()
        for kind in ("manifest", "item"):  # items too: a file deleted before its manifest was written
            for _, payload in self.store.scroll({"kind": kind}, ["source"]):
                source = payload.get("source")
                if (isinstance(source, str) and source not in gone and _surely_gone(source)
                        and any(source.startswith(folder + os.sep) for folder in folders)):
                    gone.add(source)
        for source in sorted(gone):
            items = self.store.count({"source": source, "kind": "item"})
            with self.write_lock:
                self.store.delete_where({"source": source})
            report.entries.append(IngestEntry(source, "", "removed", f"file no longer exists ({items} items deleted)"))

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

        ``fusion``: "rrf" (default), "weighted", "dbsf", "disc", "gen", "adaptive:margin=M" or
        a ``Fusion``. ``adaptive`` reasons only when the disc ranking is uncertain (see
        ``Fusion``); each hit's ``reasoned`` says whether the query reasoned.
        ``gen_samples=k`` samples k reasoning chains and fuses their k gen prefetches with the
        disc one (pass@k at query time). Each prefetch fetches ``k * prefetch_factor`` points.
        Query vectors are cached (``query_cache_size``): a repeated query runs no model.
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
        sampling = {"num_samples": gen_samples, "temperature": temperature, "seed": seed} if gen_samples > 1 else {}
        prefetch = k * (prefetch_factor or self.prefetch_factor)
        if fusion.adaptive:
            first = self.queries.encode(item, disc=True, gen=False)
            ranked = self.store.query([VectorQuery(DISC, first.disc)], Fusion("disc"), limit=max(k, 2),
                                      prefetch_limit=prefetch, flt=filter)
            gap = ranked[0].score - ranked[1].score if len(ranked) >= 2 else math.inf
            if gap >= fusion.margin:  # the disc ranking is clear: no reasoning
                return [Hit(id=h.id, score=h.score, disc_score=h.query_scores[0], gen_score=None, payload=h.payload)
                        for h in ranked[:k]]
            fusion = fusion.when_reasoning()
        vectors = self.queries.encode(item, disc=fusion.needs_disc, gen=fusion.needs_gen, sampling=sampling)
        queries = [VectorQuery(DISC, vectors.disc)] if vectors.disc is not None else []
        queries += [VectorQuery(GEN, v) for v in vectors.gens]
        stored = self.store.query(queries, fusion, limit=k, prefetch_limit=prefetch, flt=filter)
        hits = []
        gen_rows = [i for i, q in enumerate(queries) if q.using == GEN]
        for h in stored:
            disc_score = h.query_scores[0] if vectors.disc is not None else None
            gen_scores = [h.query_scores[i] for i in gen_rows if h.query_scores[i] is not None]
            gen_score = float(np.mean(gen_scores)) if gen_scores else None
            hits.append(Hit(id=h.id, score=h.score, disc_score=disc_score, gen_score=gen_score, payload=h.payload,
                            reasoned=bool(gen_rows), query_reasoning=vectors.reasoning))
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


def _surely_gone(path: str) -> bool:
    """True only when the file does not exist; an unreadable folder or a failing mount is not
    "gone" (its points must not be pruned)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


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
