"""The store protocol: two named vectors (disc, gen) per point, payload, fused queries.

Two backends implement it: ``EdgeStore`` (Qdrant Edge, embedded, the default) and
``QdrantStore`` (qdrant-client: a server or cluster by URL, or local mode). Both translate
the same ``Filter`` and ``Fusion`` into their engine's types and run fusion in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from ..errors import UMEError
from ..fusion import Fusion

DISC = "disc"
GEN = "gen"
VECTOR_NAMES = (DISC, GEN)
# Payload fields that get a payload index (the fields filters use most).
INDEXED_FIELDS: dict[str, str] = {
    "source": "keyword", "modality": "keyword", "content_hash": "keyword", "file_hash": "keyword",
    "page": "integer",
}

# A filter: {"field": value} (equality), {"field": [v1, v2]} (any of), or
# {"field": {"gte": a, "lte": b, "gt": .., "lt": ..}} (numeric range); conditions are ANDed.
FilterSpec = Mapping[str, Any]


class SchemaMismatchError(UMEError):
    """An existing collection does not fit the encoder (vector names, sizes, distance, model)."""


class StoreLockedError(UMEError):
    """The embedded store is open in another process."""


@dataclass(frozen=True)
class StoreSchema:
    """What a collection must look like for an encoder."""

    vector_size: int
    model: str
    revision: str | None = None
    distance: str = "cosine"

    def as_dict(self) -> dict[str, Any]:
        return {"vectors": {n: self.vector_size for n in VECTOR_NAMES}, "distance": self.distance,
                "model": self.model, "revision": self.revision}

    def check(self, found: Mapping[str, Any], where: str) -> None:
        """Raise ``SchemaMismatchError`` naming every difference between ``found`` and this schema."""
        want = self.as_dict()
        diffs = []
        if found.get("vectors") != want["vectors"]:
            diffs.append(f"vectors {found.get('vectors')} (need {want['vectors']})")
        if str(found.get("distance", "")).lower() != want["distance"]:
            diffs.append(f"distance {found.get('distance')} (need {want['distance']})")
        if found.get("model") not in (None, want["model"]):
            diffs.append(f"model {found.get('model')!r} (encoder is {want['model']!r})")
        elif found.get("model") == want["model"] and found.get("revision") != want["revision"]:
            diffs.append(f"model revision {found.get('revision')!r} (encoder is {want['revision']!r})")
        if diffs:
            raise SchemaMismatchError(
                f"{where} was built for another setup: " + "; ".join(diffs)
                + ". Vectors from different models or sizes cannot be mixed: use another collection"
                " name or store path, or delete this one and re-index."
            )


@dataclass
class StoredPoint:
    id: str
    vectors: dict[str, Sequence[float]]  # a subset of VECTOR_NAMES
    payload: dict[str, Any]


@dataclass(frozen=True)
class VectorQuery:
    using: str  # DISC or GEN
    vector: Sequence[float]


@dataclass
class StoredHit:
    """A result: its fused score, payload, and the cosine to each query vector (in the order
    of the ``queries`` given; None where the point lacks that named vector)."""

    id: str
    score: float
    payload: dict[str, Any]
    query_scores: list[float | None] = field(default_factory=list)


class VectorStore(Protocol):
    """What ``UMEIndex`` needs from a store. Implementations are thread-safe."""

    schema: StoreSchema
    location: str

    def upsert(self, points: Sequence[StoredPoint]) -> None: ...

    def delete_ids(self, ids: Sequence[str]) -> None: ...

    def delete_where(self, flt: FilterSpec) -> None: ...

    def existing_ids(self, ids: Sequence[str]) -> set[str]: ...

    def scroll(self, flt: FilterSpec | None, fields: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]: ...

    def count(self, flt: FilterSpec | None = None) -> int: ...

    def query(
        self, queries: Sequence[VectorQuery], fusion: Fusion, limit: int, prefetch_limit: int,
        flt: FilterSpec | None = None,
    ) -> list[StoredHit]: ...

    def optimize(self) -> None: ...

    def close(self) -> None: ...


def weighted_queries(queries: Sequence[VectorQuery], fusion: Fusion) -> list[tuple[VectorQuery, float]]:
    """The query vectors with their fusion weights, zero-weight ones dropped."""
    weights = fusion.prefetch_weights([q.using for q in queries])
    kept = [(q, w) for q, w in zip(queries, weights) if w > 0]
    if not kept:
        raise ValueError("every query vector has weight 0")
    return kept


def paged_payloads(fetch_page: Callable[[Any], tuple[Sequence[Any], Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(id, payload)`` of every record of a paged scroll. ``fetch_page(offset)`` returns one
    page of engine records (with ``id`` and ``payload``) and the next offset, None at the end."""
    offset = None
    while True:
        records, offset = fetch_page(offset)
        for r in records:
            yield str(r.id), dict(r.payload or {})
        if offset is None:
            return


def attach_query_scores(hits: Sequence[StoredHit], per_query: Iterable[Iterable[Any]]) -> None:
    """Append to each hit its score for each query, from one list of engine points (``id``,
    ``score``) per query; a hit that a query's list lacks gets None."""
    for points in per_query:
        by_id = {str(p.id): float(p.score) for p in points}
        for h in hits:
            h.query_scores.append(by_id.get(h.id))


def classify_conditions(flt: FilterSpec) -> Iterator[tuple[str, str, Any]]:
    """``(key, kind, value)`` per condition, kind "range" | "any" | "eq": the one reading of
    our filter format; each backend only builds its engine's objects from it."""
    for key, value in flt.items():
        if isinstance(value, Mapping):
            yield key, "range", split_range(value)
        elif isinstance(value, (list, tuple, set)):
            yield key, "any", list(value)
        else:
            yield key, "eq", value


def split_range(value: Mapping[str, Any]) -> dict[str, float]:
    allowed = {"gte", "gt", "lte", "lt"}
    unknown = set(value) - allowed
    if unknown:
        raise ValueError(f"range filter keys must be among {sorted(allowed)}, got {sorted(unknown)}")
    return {k: float(v) for k, v in value.items()}
