"""``EdgeStore``: Qdrant Edge (qdrant-edge-py), Qdrant's engine in-process, persistent on disk.

Layout of a store folder: ``<path>/<collection>/`` holds the shard, ``ume_store.json`` the
schema it was built for, ``.lock`` the inter-process lock (one process at a time).

``ume_store.json`` is written last when a store is created, and atomically (a temp file in
the same folder, fsync, rename, fsync of the folder): a crash leaves either no schema file
(the creation never finished: the folder holds no data worth keeping) or a complete one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..faults import fault_point
from ..fusion import Fusion
from .base import (
    GEN_FAILED, GEN_PENDING, GEN_STATUS, INDEXED_FIELDS, VECTOR_NAMES, FilterSpec, NearestRequest,
    SchemaMismatchError, StoreCorruptError, StoredHit, StoredPoint, StoreLockedError, StoreSchema, VectorQuery,
    check_points, classify_conditions, fused_query, merged_points, paged_payloads,
)

logger = logging.getLogger(__name__)
SCHEMA_FILE = "ume_store.json"
LOCK_FILE = ".lock"
_TEMP_PREFIX = f".{SCHEMA_FILE}.tmp-"


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash at any point leaves the old file (or none)
    or the new one, never a part: temp file in the same folder, fsync, rename, fsync folder.

    Test-only fault hook: ``UME_FAULT=inside_store_creation`` kills the process (SIGKILL)
    with half the bytes in the temp file (see ``ume_retriever/faults.py``)."""
    data = text.encode()
    tmp = path.with_name(f"{_TEMP_PREFIX}{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data[: len(data) // 2])
        os.fsync(fd)
        fault_point("inside_store_creation")
        os.write(fd, data[len(data) // 2:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def read_schema_file(path: Path, expected: StoreSchema | None = None) -> dict[str, Any]:
    """The recorded schema of a store, or ``StoreCorruptError`` naming the file, what is
    wrong and how to recover (with ``expected``: the content this encoder would write)."""
    try:
        found = json.loads(path.read_text())
        problem = None if isinstance(found, dict) and isinstance(found.get("vectors"), dict) and found["vectors"] \
            else "it is valid JSON but not a ume schema (no \"vectors\" mapping)"
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        found, problem = None, f"it is truncated or corrupt ({exc})"
    if problem is None:
        return found
    hint = (f" If the store was built for this model, write this content back: "
            f"{json.dumps(expected.as_dict())}." if expected is not None else "")
    raise StoreCorruptError(
        f"the store's schema file {path} is unreadable: {problem}. The points in {path.parent} may be intact:"
        f"{hint} Otherwise delete the folder {path.parent} and index again."
    )


def _no_bool(key: str, value: Any) -> Any:
    # qdrant-edge-py 0.9 turns MatchValue(True) into MatchValue(1), which matches no boolean
    # payload (measured): refuse rather than answer "nothing".
    if isinstance(value, bool):
        raise ValueError(f"filter field {key!r}: the embedded store (qdrant-edge-py) cannot match booleans (it reads "
                         f"{value} as {int(value)}); store the flag as a string or an integer, or use a Qdrant server")
    return value


class EdgeStore:
    """The embedded default store: one folder, no server."""

    def __init__(self, path: str | os.PathLike, schema: StoreSchema, collection: str = "ume", hnsw_ef: int | None = 64):
        """``hnsw_ef``: HNSW search breadth per query vector (None: the engine's default, 100). 64 is
        the smallest that kept recall@10 >= 0.99 against exact numpy, disc-only and fused RRF
        (prefetch 40), on clustered 1536-d data at 20k and 100k points after ``optimize()``:
        100k 0.9915 disc / 0.9975 fused (32: 0.967 / 0.990; 100 and up: >= 0.999), 20k 1.000
        from 32 up; fused p50 at 100k 4.3 ms against 7.5 ms at 512. Measured with
        ``python benchmarks/store_overhead.py`` (200 queries per size)."""
        import qdrant_edge as qe

        self._qe = qe
        self._search_params = qe.SearchParams(hnsw_ef=hnsw_ef) if hnsw_ef else None
        self.schema = schema
        self.root = Path(path) / collection
        self.location = str(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._acquire_lock()
        self._mutex = threading.RLock()
        self._gen_gaps: bool | None = None  # any point without its gen vector? None: count at the next query
        try:
            self._shard = self._open()
        except BaseException:
            self._release_lock()
            raise

    # -- opening ------------------------------------------------------------------------------

    def _acquire_lock(self) -> int:
        lock_path = self.root / LOCK_FILE
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(
                f"the store {self.root} is open in another process (pid {holder} holds the lock "
                f"{lock_path}); close it there, or open a different path"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open(self) -> Any:
        qe = self._qe
        schema_path = self.root / SCHEMA_FILE
        shard_path = str(self.root / "shard")
        for leftover in self.root.glob(f"{_TEMP_PREFIX}*"):  # a writer killed mid-write (we hold the lock)
            leftover.unlink(missing_ok=True)
        if schema_path.exists():
            found = read_schema_file(schema_path, self.schema)
            self.schema.check(found, f"the store {self.root}")
            shard = qe.EdgeShard.load(shard_path)
            self._index_fields(shard)  # a store made by an older version may lack a newer index
            return shard
        if (self.root / "shard").exists():
            self._remove_unfinished_shard(shard_path)
        params = qe.EdgeVectorParams(size=self.schema.vector_size, distance=qe.Distance.Cosine)
        shard = qe.EdgeShard.create(shard_path, qe.EdgeConfig(vectors={n: params for n in VECTOR_NAMES}))
        self._index_fields(shard)
        # Written last: a folder without it was never completely created.
        write_atomically(schema_path, json.dumps(self.schema.as_dict(), indent=2))
        return shard

    def _index_fields(self, shard: Any) -> None:
        """Create the payload indexes of ``INDEXED_FIELDS`` (creating an existing one is a no-op)."""
        qe = self._qe
        kinds = {"keyword": qe.PayloadSchemaType.Keyword, "integer": qe.PayloadSchemaType.Integer}
        for name, kind in INDEXED_FIELDS.items():
            shard.update(qe.UpdateOperation.create_field_index(name, kinds[kind]))
        shard.flush()

    def _remove_unfinished_shard(self, shard_path: str) -> None:
        """A shard without the schema file: a creation that crashed before its last step (the
        shard is then empty: removed and created again), or not a ume store (refused)."""
        try:
            shard = self._qe.EdgeShard.load(shard_path)
            try:
                points = int(shard.count(self._qe.CountRequest(filter=None, exact=True)))
            finally:
                shard.close()
        except Exception as exc:  # noqa: BLE001 - an unloadable shard: refused below with the reason
            points, reason = -1, f"it does not load ({type(exc).__name__}: {exc})"
        else:
            reason = f"it holds {points} point(s)"
        if points != 0:
            raise SchemaMismatchError(
                f"{self.root} holds a shard without {SCHEMA_FILE} ({reason}): not a ume store, or one whose "
                f"schema file was removed; if ume created it, delete {self.root} and index again"
            )
        logger.warning("%s: an empty shard without %s (a store creation was interrupted): creating the store again",
                       self.root, SCHEMA_FILE)
        shutil.rmtree(shard_path)

    # -- translation --------------------------------------------------------------------------

    def _filter(self, *specs: FilterSpec | None) -> Any:
        """The engine filter matching every one of ``specs`` (None when there is no condition)."""
        specs = tuple(spec for spec in specs if spec)
        if not specs:
            return None
        qe = self._qe
        build = {
            "range": lambda k, v: qe.FieldCondition(key=k, range=qe.RangeFloat(**v)),
            "any": lambda k, v: qe.FieldCondition(key=k, match=qe.MatchAny(v)),
            "eq": lambda k, v: qe.FieldCondition(key=k, match=qe.MatchValue(_no_bool(k, v))),
        }
        return qe.Filter(must=[build[kind](key, value) for spec in specs for key, kind, value in classify_conditions(spec)])

    # -- protocol -----------------------------------------------------------------------------

    def upsert(self, points: Sequence[StoredPoint]) -> None:
        if not points:
            return
        check_points(points, self.schema.vector_size)
        qe = self._qe
        batch = [qe.Point(id=p.id, vector={k: np.asarray(v, dtype=np.float32).tolist() for k, v in p.vectors.items()},
                          payload=p.payload) for p in points]
        with self._mutex:
            self._shard.update(qe.UpdateOperation.upsert_points(batch))
            if any(GEN_STATUS in p.payload for p in points):
                self._gen_gaps = True
            elif self._gen_gaps:
                self._gen_gaps = None  # an upsert may replace a pending point

    def fill_vectors(self, updates: Sequence[StoredPoint]) -> set[str]:
        if not updates:
            return set()
        check_points(updates, self.schema.vector_size)
        qe = self._qe
        with self._mutex:  # read and write under one lock: a point deleted meanwhile stays deleted
            records = self._shard.retrieve([u.id for u in updates], with_payload=True, with_vector=True)
            points = merged_points(updates, records)
            self._gen_gaps = None
            if points:
                self._shard.update(qe.UpdateOperation.upsert_points([
                    qe.Point(id=p.id, vector={k: np.asarray(v, dtype=np.float32).tolist() for k, v in p.vectors.items()},
                             payload=p.payload) for p in points]))
        return {p.id for p in points}

    def delete_ids(self, ids: Sequence[str]) -> None:
        if ids:
            with self._mutex:
                self._shard.update(self._qe.UpdateOperation.delete_points(list(ids)))
                self._gen_gaps = None if self._gen_gaps else self._gen_gaps

    def delete_where(self, flt: FilterSpec) -> None:
        with self._mutex:
            self._shard.update(self._qe.UpdateOperation.delete_points_by_filter(self._filter(flt)))
            self._gen_gaps = None if self._gen_gaps else self._gen_gaps

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        with self._mutex:
            records = self._shard.retrieve(list(ids), with_payload=False, with_vector=False)
        return {str(r.id) for r in records}

    def scroll(self, flt: FilterSpec | None, fields: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        def page(offset: Any) -> tuple[Sequence[Any], Any]:
            with self._mutex:
                return self._shard.scroll(self._qe.ScrollRequest(
                    offset=offset, limit=512, filter=self._filter(flt), with_payload=list(fields) or False,
                    with_vector=False))

        return paged_payloads(page)

    def count(self, flt: FilterSpec | None = None) -> int:
        with self._mutex:
            return int(self._shard.count(self._qe.CountRequest(filter=self._filter(flt), exact=True)))

    def query(
        self, queries: Sequence[VectorQuery], fusion: Fusion, limit: int, prefetch_limit: int,
        flt: FilterSpec | None = None,
    ) -> list[StoredHit]:
        return fused_query(self, self.schema.vector_size, queries, fusion, limit, prefetch_limit, flt)

    # -- the engine calls of fused_query ---------------------------------------------------------

    def nearest(self, requests: Sequence[NearestRequest], flt: FilterSpec | None) -> list[list[tuple[str, float]]]:
        qe = self._qe
        base = self._filter(flt)
        batch = [qe.QueryRequest(
            query=qe.Query.Nearest(np.asarray(r.query.vector, dtype=np.float32).tolist(), using=r.query.using),
            limit=r.limit, filter=self._filter(flt, r.extra) if r.extra else base, params=self._search_params,
            with_payload=False, with_vector=False) for r in requests]
        with self._mutex:
            answers = self._shard.query_batch(qe.QueryBatchRequest(batch))
        # ids as the engine gives them (uuid.UUID): only the final hits are made strings
        return [[(p.id, p.score) for p in points] for points in answers]

    def may_lack_gen(self) -> bool:
        """This process is the store's only writer (the lock), so whether any point lacks its gen
        vector is known after each write; counted again only after a write that may change it."""
        if self._gen_gaps is None:
            self._gen_gaps = self.count({GEN_STATUS: [GEN_PENDING, GEN_FAILED]}) > 0
        return self._gen_gaps

    def payloads(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with self._mutex:
            records = self._shard.retrieve([str(i) for i in ids], with_payload=True, with_vector=False)
        return {str(r.id): dict(r.payload or {}) for r in records}

    def exact_scores(self, requests: Sequence[tuple[VectorQuery, Sequence[str]]]) -> list[dict[str, float]]:
        qe = self._qe
        batch = [qe.QueryRequest(
            query=qe.Query.Nearest(np.asarray(q.vector, dtype=np.float32).tolist(), using=q.using), limit=len(ids),
            filter=qe.Filter(must=[qe.HasIdCondition(set(ids))]), params=qe.SearchParams(exact=True),
            with_payload=False, with_vector=False) for q, ids in requests]
        with self._mutex:
            answers = self._shard.query_batch(qe.QueryBatchRequest(batch))
        return [{p.id: p.score for p in points} for points in answers]

    def optimize(self) -> None:
        """Build the HNSW indexes (do it once after a large ingest, not per batch)."""
        with self._mutex:
            self._shard.optimize()

    def close(self) -> None:
        with self._mutex:
            if getattr(self, "_shard", None) is not None:
                self._shard.close()
                self._shard = None
            self._release_lock()

    def __enter__(self) -> "EdgeStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
