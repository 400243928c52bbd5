"""``QdrantStore``: qdrant-client, for a Qdrant server or cluster (``url=``), or local mode.

Local mode (``location=":memory:"`` or ``path=``) is qdrant-client's pure-Python engine: every
query feature works, but it is brute force, ignores payload indexes and sharding, and commits
point by point on disk. Use it for tests and small data; use the embedded ``EdgeStore`` or a
server for real collections.

Writers take a lease kept in the collection's metadata (key ``ume_writer_lease``: owner id and
expiry); see ``QdrantStore`` for what it guarantees and what it cannot.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
import weakref
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Iterator, Sequence

import numpy as np

from ..fusion import Fusion
from .base import (
    INDEXED_FIELDS, VECTOR_NAMES, FilterSpec, NearestRequest, StoredHit, StoredPoint, StoreLockedError, StoreSchema,
    VectorQuery, WriterLeaseError, check_points, classify_conditions, fused_query, merged_points,
    paged_payloads,
)

logger = logging.getLogger(__name__)
LEASE_KEY = "ume_writer_lease"  # in the collection's metadata
DEFAULT_LEASE_SECONDS = 120.0


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class QdrantStore:
    """A collection with named vectors ``disc`` and ``gen`` (cosine) through qdrant-client.

    **Writer lease.** Every write (upsert, delete) first checks the collection's writer lease
    (``ume_writer_lease`` in the collection metadata: ``owner``, ``expires_at``). Free or
    expired: this store takes it; ours: renewed once less than half of ``lease_seconds``
    remains; another live owner: ``WriterLeaseError`` naming it and when its lease expires.
    ``close()`` releases it. Reads never look at it. Limits, honestly: Qdrant has no
    compare-and-swap, so taking it is check-then-set followed by a read-back; two writers
    starting within one round trip can both pass, and the loser finds out at its next write
    (each write re-reads the lease). Expiry uses each machine's clock (keep clocks in sync
    well within ``lease_seconds``), and a writer that pauses longer than ``lease_seconds``
    between writes may lose the lease to another (its next write then fails, it never
    overwrites silently). A crashed writer's lease blocks others until it expires.
    ``client=`` shares one qdrant-client between stores (it is then not closed by ``close``).
    """

    def __init__(
        self,
        schema: StoreSchema,
        *,
        url: str | None = None,
        api_key: str | None = None,
        location: str | None = None,
        path: str | None = None,
        collection: str = "ume",
        shard_number: int | None = None,
        replication_factor: int | None = None,
        write_consistency_factor: int | None = None,
        on_disk: bool | None = None,
        quantization_config: Any = None,
        hnsw_config: Any = None,
        timeout: int | None = None,
        hnsw_ef: int | None = 64,
        client: Any = None,
        writer_id: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ):
        from qdrant_client import QdrantClient, models

        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.writer_id = writer_id or f"{socket.gethostname()}:pid{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_seconds = float(lease_seconds)
        self._lease_expires: float | None = None  # set while this store holds the writer lease
        # A script that exits without close() must not leave its lease to block its own next run.
        atexit.register(_release_at_exit, weakref.ref(self))

        self._m = models
        # Local mode is brute force (exact) and warns about search params: servers only.
        self._search_params = models.SearchParams(hnsw_ef=hnsw_ef) if hnsw_ef and url is not None else None
        self.schema = schema
        self._is_server = url is not None
        self.collection = collection
        self.location = url or path or location or ":memory:"
        self._owns_client = client is None
        if client is not None:
            from qdrant_client.local.qdrant_local import QdrantLocal

            self.client = client
            local = getattr(client, "_client", None)  # qdrant-client's engine behind the facade
            self._is_server = not isinstance(local, QdrantLocal)
            self.location = getattr(local, "location", None) or url or "the given client"
            if self._is_server and hnsw_ef:
                self._search_params = models.SearchParams(hnsw_ef=hnsw_ef)
        try:
            if client is None:
                self.client = QdrantClient(url=url, api_key=api_key, location=location if not (url or path) else None,
                                           path=path, timeout=timeout)
        except RuntimeError as exc:
            if "already accessed" in str(exc):
                raise StoreLockedError(
                    f"the local Qdrant folder {path} is open in another process ({exc}); close it there "
                    "or open a different path"
                ) from None
            raise
        self._mutex = threading.RLock()
        if self.client.collection_exists(collection):
            self._check_existing()
        else:
            self._create(shard_number, replication_factor, write_consistency_factor, on_disk, quantization_config,
                         hnsw_config)

    def _create(self, shard_number, replication_factor, write_consistency_factor, on_disk, quantization_config,
                hnsw_config) -> None:
        m = self._m
        params = m.VectorParams(size=self.schema.vector_size, distance=m.Distance.COSINE, on_disk=on_disk)
        self.client.create_collection(
            self.collection,
            vectors_config={n: params for n in VECTOR_NAMES},
            shard_number=shard_number,
            replication_factor=replication_factor,
            write_consistency_factor=write_consistency_factor,
            quantization_config=quantization_config,
            hnsw_config=hnsw_config,
            metadata=self.schema.as_dict(),
        )
        self._index_fields()

    def _index_fields(self) -> None:
        """Create the payload indexes of ``INDEXED_FIELDS`` that the collection lacks (servers only:
        local mode ignores payload indexes, and warns)."""
        if not self._is_server:
            return
        m = self._m
        kinds = {"keyword": m.PayloadSchemaType.KEYWORD, "integer": m.PayloadSchemaType.INTEGER}
        present = set(getattr(self.client.get_collection(self.collection), "payload_schema", None) or {})
        for name, kind in INDEXED_FIELDS.items():
            if name not in present:
                self.client.create_payload_index(self.collection, name, field_schema=kinds[kind])

    def _check_existing(self) -> None:
        info = self.client.get_collection(self.collection)
        vectors = info.config.params.vectors
        found: dict[str, Any] = dict(getattr(info.config, "metadata", None) or {})
        if isinstance(vectors, dict):
            found["vectors"] = {name: v.size for name, v in vectors.items()}
            distances = {str(getattr(v.distance, "value", v.distance)).lower() for v in vectors.values()}
            found["distance"] = distances.pop() if len(distances) == 1 else sorted(distances)
        else:  # a single unnamed vector
            found["vectors"] = {"": getattr(vectors, "size", None)}
            found["distance"] = str(getattr(getattr(vectors, "distance", None), "value", "")).lower()
        self.schema.check(found, f"the collection {self.collection!r} at {self.location}")
        self._index_fields()  # a collection made by an older version may lack a newer index

    # -- translation --------------------------------------------------------------------------

    def _filter(self, *specs: FilterSpec | None) -> Any:
        """The engine filter matching every one of ``specs`` (None when there is no condition)."""
        specs = tuple(spec for spec in specs if spec)
        if not specs:
            return None
        m = self._m
        build = {
            "range": lambda k, v: m.FieldCondition(key=k, range=m.Range(**v)),
            "any": lambda k, v: m.FieldCondition(key=k, match=m.MatchAny(any=v)),
            "eq": lambda k, v: m.FieldCondition(key=k, match=m.MatchValue(value=v)),
        }
        return m.Filter(must=[build[kind](key, value) for spec in specs for key, kind, value in classify_conditions(spec)])

    # -- writer lease -------------------------------------------------------------------------

    def _read_lease(self) -> dict[str, Any] | None:
        meta = getattr(self.client.get_collection(self.collection).config, "metadata", None) or {}
        lease = meta.get(LEASE_KEY)
        return lease if isinstance(lease, dict) and lease.get("owner") else None

    def _write_lease(self, owner: str, expires_at: float) -> None:
        value = {"owner": owner, "expires_at": expires_at, "expires_at_utc": _utc(expires_at) if owner else ""}
        self.client.update_collection(self.collection, metadata={LEASE_KEY: value})

    def _holder_error(self, lease: dict[str, Any], now: float, lost: bool) -> WriterLeaseError:
        expires = float(lease.get("expires_at", 0))
        start = (f"this store (writer {self.writer_id}) lost its writer lease on the collection {self.collection!r} at "
                 f"{self.location} to writer {lease['owner']}" if lost else
                 f"the collection {self.collection!r} at {self.location} is being written by writer {lease['owner']}")
        return WriterLeaseError(
            f"{start} (its lease expires at {_utc(expires)}, in {max(0.0, expires - now):.0f} s, unless renewed); "
            "nothing was written. Readers are not blocked; write after that writer closes, or after the expiry "
            "if it crashed"
        )

    def _hold_lease(self) -> None:
        """Take, renew or verify the writer lease before a write (under ``self._mutex``)."""
        now = time.time()
        lease = self._read_lease()
        if lease is not None and lease["owner"] != self.writer_id and float(lease.get("expires_at", 0)) > now:
            lost, self._lease_expires = self._lease_expires is not None, None
            raise self._holder_error(lease, now, lost)
        if lease is not None and lease["owner"] == self.writer_id and \
                float(lease.get("expires_at", 0)) - now > self.lease_seconds / 2:
            self._lease_expires = float(lease["expires_at"])
            return
        expires = now + self.lease_seconds
        self._write_lease(self.writer_id, expires)  # check-then-set: no compare-and-swap in Qdrant
        after = self._read_lease()
        if after is None or after["owner"] != self.writer_id:  # another writer took it in between
            self._lease_expires = None
            raise self._holder_error(after or {"owner": "unknown", "expires_at": expires}, time.time(), False)
        self._lease_expires = expires

    def _release_lease_now(self) -> None:
        with self._mutex:
            self._release_lease()

    def _release_lease(self) -> None:
        if self._lease_expires is None:
            return
        self._lease_expires = None
        try:
            lease = self._read_lease()
            if lease is not None and lease["owner"] == self.writer_id:
                self._write_lease("", 0.0)
        except Exception as exc:  # noqa: BLE001 - closing anyway; the lease then lapses at its expiry
            logger.warning("could not release the writer lease of %s: %s", self.collection, exc)

    # -- protocol -----------------------------------------------------------------------------

    def upsert(self, points: Sequence[StoredPoint]) -> None:
        if not points:
            return
        check_points(points, self.schema.vector_size)
        m = self._m
        batch = [m.PointStruct(id=p.id, vector={k: np.asarray(v, dtype=np.float32).tolist() for k, v in p.vectors.items()},
                               payload=p.payload) for p in points]
        with self._mutex:
            self._hold_lease()
            self.client.upsert(self.collection, batch, wait=True)

    def fill_vectors(self, updates: Sequence[StoredPoint]) -> set[str]:
        """As the protocol says; against a server, a point deleted by another writer between
        this read and this write would come back (one round trip; one writer holds the lease)."""
        if not updates:
            return set()
        check_points(updates, self.schema.vector_size)
        m = self._m
        with self._mutex:
            self._hold_lease()
            records = self.client.retrieve(self.collection, [u.id for u in updates], with_payload=True,
                                           with_vectors=True)
            points = merged_points(updates, records)
            if points:
                self.client.upsert(self.collection, [
                    m.PointStruct(id=p.id, vector={k: np.asarray(v, dtype=np.float32).tolist()
                                                   for k, v in p.vectors.items()}, payload=p.payload)
                    for p in points], wait=True)
        return {p.id for p in points}

    def delete_ids(self, ids: Sequence[str]) -> None:
        if ids:
            with self._mutex:
                self._hold_lease()
                self.client.delete(self.collection, points_selector=self._m.PointIdsList(points=list(ids)), wait=True)

    def delete_where(self, flt: FilterSpec) -> None:
        selector = self._m.FilterSelector(filter=self._filter(flt))
        with self._mutex:
            self._hold_lease()
            self.client.delete(self.collection, points_selector=selector, wait=True)

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        with self._mutex:
            records = self.client.retrieve(self.collection, list(ids), with_payload=False, with_vectors=False)
        return {str(r.id) for r in records}

    def scroll(self, flt: FilterSpec | None, fields: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        def page(offset: Any) -> tuple[Sequence[Any], Any]:
            with self._mutex:
                return self.client.scroll(self.collection, scroll_filter=self._filter(flt), limit=512, offset=offset,
                                          with_payload=list(fields) or False, with_vectors=False)

        return paged_payloads(page)

    def count(self, flt: FilterSpec | None = None) -> int:
        with self._mutex:
            return int(self.client.count(self.collection, count_filter=self._filter(flt), exact=True).count)

    def query(
        self, queries: Sequence[VectorQuery], fusion: Fusion, limit: int, prefetch_limit: int,
        flt: FilterSpec | None = None,
    ) -> list[StoredHit]:
        return fused_query(self, self.schema.vector_size, queries, fusion, limit, prefetch_limit, flt)

    # -- the engine calls of fused_query ---------------------------------------------------------

    def _reading(self) -> Any:
        """Reads from a server run concurrently (qdrant-client's HTTP client is thread-safe and
        waits without the GIL); local mode's engine is serialised by the store's mutex."""
        return contextlib.nullcontext() if self._is_server else self._mutex

    def nearest(self, requests: Sequence[NearestRequest], flt: FilterSpec | None) -> list[list[tuple[str, float]]]:
        m = self._m
        base = self._filter(flt)
        batch = [m.QueryRequest(query=np.asarray(r.query.vector, dtype=np.float32).tolist(), using=r.query.using,
                                limit=r.limit, filter=self._filter(flt, r.extra) if r.extra else base,
                                params=self._search_params, with_payload=False, with_vector=False)
                 for r in requests]
        with self._reading():
            answers = self.client.query_batch_points(self.collection, batch)
        return [[(str(p.id), float(p.score)) for p in a.points] for a in answers]

    def may_lack_gen(self) -> bool:
        return True  # other writers may add pending points at any time: always look

    def payloads(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with self._reading():
            records = self.client.retrieve(self.collection, list(ids), with_payload=True, with_vectors=False)
        return {str(r.id): dict(r.payload or {}) for r in records}

    def exact_scores(self, requests: Sequence[tuple[VectorQuery, Sequence[str]]]) -> list[dict[str, float]]:
        m = self._m
        batch = [m.QueryRequest(query=np.asarray(q.vector, dtype=np.float32).tolist(), using=q.using,
                                filter=m.Filter(must=[m.HasIdCondition(has_id=list(ids))]), limit=len(ids),
                                params=m.SearchParams(exact=True) if self._is_server else None, with_payload=False)
                 for q, ids in requests]
        with self._reading():
            answers = self.client.query_batch_points(self.collection, batch)
        return [{str(p.id): float(p.score) for p in a.points} for a in answers]

    def optimize(self) -> None:
        """Nothing to do: a server builds its indexes itself; local mode has none."""

    def close(self) -> None:
        with self._mutex:
            self._release_lease()
            if self._owns_client:
                self.client.close()

    def __enter__(self) -> "QdrantStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _release_at_exit(ref: "weakref.ref[QdrantStore]") -> None:
    store = ref()
    if store is not None and store._lease_expires is not None:
        store._release_lease_now()
