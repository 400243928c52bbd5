"""Vector stores with two named vectors per point: Qdrant Edge (embedded) and qdrant-client."""

from __future__ import annotations

import os
from typing import Any

from .base import (
    DISC, GEN, GEN_FAILED, GEN_PENDING, GEN_STATUS, VECTOR_NAMES, FilterSpec, NonFiniteVectorError, SchemaMismatchError, StoreCorruptError, StoredHit,
    StoredPoint, StoreLockedError, StoreSchema, VectorQuery, VectorStore, WriterLeaseError,
)

__all__ = [
    "DISC", "GEN", "GEN_FAILED", "GEN_PENDING", "GEN_STATUS", "VECTOR_NAMES", "FilterSpec", "NonFiniteVectorError", "SchemaMismatchError", "StoreCorruptError",
    "StoredHit", "StoredPoint", "StoreLockedError", "StoreSchema", "VectorQuery", "VectorStore", "WriterLeaseError",
    "open_store", "recorded_schema",
]


def open_store(
    schema: StoreSchema,
    path: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    api_key: str | None = None,
    collection: str = "ume",
    **options: Any,
) -> VectorStore:
    """The embedded Qdrant Edge store at ``path`` (default ``./ume-index``), or, with ``url``,
    a Qdrant server/cluster through qdrant-client (``options``: shard_number,
    replication_factor, write_consistency_factor, on_disk, quantization_config, hnsw_config).
    ``path=":memory:"`` gives qdrant-client's in-memory local mode."""
    if url is not None:
        from .qdrant import QdrantStore

        return QdrantStore(schema, url=url, api_key=api_key, collection=collection, **options)
    if path is not None and os.fspath(path) == ":memory:":
        from .qdrant import QdrantStore

        return QdrantStore(schema, location=":memory:", collection=collection, **options)
    from .edge import EdgeStore

    return EdgeStore(path or "ume-index", schema, collection=collection, **options)


def recorded_schema(
    path: str | os.PathLike | None = None, *, url: str | None = None, api_key: str | None = None,
    collection: str = "ume",
) -> StoreSchema | None:
    """The schema (model, vector size) an existing collection was built with, None if there is
    none: lets the command line search, delete and describe an index without being told the model."""
    if url is not None:
        from qdrant_client import QdrantClient

        client = QdrantClient(url=url, api_key=api_key)
        try:
            if not client.collection_exists(collection):
                return None
            meta = dict(getattr(client.get_collection(collection).config, "metadata", None) or {})
        finally:
            client.close()
    else:
        from pathlib import Path

        from .edge import SCHEMA_FILE, read_schema_file

        file = Path(path or "ume-index") / collection / SCHEMA_FILE
        if not file.is_file():
            return None
        meta = read_schema_file(file)  # StoreCorruptError (file, recovery) if truncated or corrupt
    if not meta.get("model") or not meta.get("vectors"):
        return None
    size = next(iter(meta["vectors"].values()))
    return StoreSchema(vector_size=int(size), model=meta["model"], revision=meta.get("revision"),
                       distance=meta.get("distance", "cosine"))
