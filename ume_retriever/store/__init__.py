"""Vector stores with two named vectors per point: Qdrant Edge (embedded) and qdrant-client."""

from __future__ import annotations

import os
from typing import Any

from .base import (
    DISC, GEN, VECTOR_NAMES, FilterSpec, SchemaMismatchError, StoredHit, StoredPoint, StoreLockedError, StoreSchema,
    VectorQuery, VectorStore,
)

__all__ = [
    "DISC", "GEN", "VECTOR_NAMES", "FilterSpec", "SchemaMismatchError", "StoredHit", "StoredPoint",
    "StoreLockedError", "StoreSchema", "VectorQuery", "VectorStore", "open_store",
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
