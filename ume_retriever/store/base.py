"""The store protocol: two named vectors (disc, gen) per point, payload, fused queries.

Two backends implement it: ``EdgeStore`` (Qdrant Edge, embedded, the default) and
``QdrantStore`` (qdrant-client: a server or cluster by URL, or local mode). Both translate
the same ``Filter`` into their engine's types; a fused query is ``fused_query`` for both: the
engine finds each query vector's nearest points, the lists are fused here.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from ..errors import UMEError
from ..fusion import Fusion, RankedList, fuse_lists

DISC = "disc"
GEN = "gen"
VECTOR_NAMES = (DISC, GEN)
# Payload field of a point stored without its gen vector (staged ingestion): "pending" until
# the backfill computes it, "failed" when the backfill could not (the reason in "gen_error").
GEN_STATUS = "gen_status"
GEN_PENDING = "pending"
GEN_FAILED = "failed"
# Payload fields that get a payload index (the fields filters use most).
INDEXED_FIELDS: dict[str, str] = {
    "source": "keyword", "modality": "keyword", "content_hash": "keyword", "file_hash": "keyword",
    "page": "integer", GEN_STATUS: "keyword",
}

# A filter: {"field": value} (equality), {"field": [v1, v2]} (any of), or
# {"field": {"gte": a, "lte": b, "gt": .., "lt": ..}} (numeric range); conditions are ANDed.
FilterSpec = Mapping[str, Any]


class SchemaMismatchError(UMEError):
    """An existing collection does not fit the encoder (vector names, sizes, distance, model)."""


class StoreLockedError(UMEError):
    """The embedded store is open in another process."""


class WriterLeaseError(StoreLockedError):
    """Another writer holds the collection's writer lease (Qdrant server or local mode), or
    this store lost its lease to another writer. Readers are never refused."""


class StoreCorruptError(UMEError):
    """A store's own bookkeeping file (``ume_store.json``) is unreadable: truncated or corrupt."""


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

    def fill_vectors(self, updates: Sequence[StoredPoint]) -> set[str]:
        """Add each update's vectors to the existing point of its id and merge its payload
        fields into the point's (one atomic point write each); ids that no longer exist are
        left alone (never re-created). Returns the ids written."""
        ...

    def optimize(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class NearestRequest:
    """One nearest-neighbour search: ``limit`` points nearest to ``query``, within the search's
    filter and also ``extra`` (a second filter, ANDed)."""

    query: VectorQuery
    limit: int
    extra: FilterSpec | None = None


class SearchEngine(Protocol):
    """The three engine calls ``fused_query`` builds a search from (each backend has them)."""

    def nearest(self, requests: Sequence[NearestRequest], flt: FilterSpec | None) -> list[list[tuple[Any, float]]]:
        """Per request, ``(id, cosine)`` best first; one engine call for all of them. Ids may be
        the engine's own objects (``uuid.UUID``); ``exact_scores`` takes and gives the same ids."""
        ...

    def payloads(self, ids: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """The payloads of these points, by id as a string (a point deleted meanwhile is absent)."""
        ...

    def exact_scores(self, requests: Sequence[tuple[VectorQuery, Sequence[Any]]]) -> list[dict[Any, float]]:
        """Per ``(query, ids)``: the exact cosine of each of those points that has the vector."""
        ...

    def may_lack_gen(self) -> bool:
        """False only when surely no point waits for its gen vector (the pending search is skipped)."""
        ...


def fused_query(
    engine: SearchEngine, vector_size: int, queries: Sequence[VectorQuery], fusion: Fusion, limit: int,
    prefetch_limit: int, flt: FilterSpec | None = None,
) -> list[StoredHit]:
    """A search with several query vectors, fused: the shared ``VectorStore.query``.

    One engine call searches every query vector's ``prefetch_limit`` nearest points (and, when
    the fusion needs gen, which of the disc list's points have no gen vector yet); the lists
    are fused in Python (``fuse_lists``: Qdrant's formulas, plus the rule for pending points);
    a second call fetches the payloads of the ``limit`` hits, and a third, only when needed,
    the exact cosine of a hit to a query vector whose list it is not in."""
    check_query_vectors(queries, vector_size)
    weights = fusion.prefetch_weights([q.using for q in queries])
    kept = [i for i, w in enumerate(weights) if w > 0]
    if not kept:
        raise ValueError("every query vector has weight 0")
    depth = limit if len(kept) == 1 else prefetch_limit
    requests = [NearestRequest(queries[i], depth) for i in kept]
    disc_at = next((i for i in kept if queries[i].using == DISC), None)
    pending_check = (len(kept) > 1 and disc_at is not None and any(queries[i].using == GEN for i in kept)
                     and engine.may_lack_gen())
    if pending_check:  # the disc list's points that have no gen vector (a filtered disc search)
        requests.append(NearestRequest(queries[disc_at], depth, {GEN_STATUS: [GEN_PENDING, GEN_FAILED]}))
    answers = engine.nearest(requests, flt)
    lists = [RankedList(queries[i].using, answers[n]) for n, i in enumerate(kept)]
    without_gen = {pid for pid, _ in answers[-1]} if pending_check else set()
    fused = fuse_lists(lists, fusion, limit, without_gen=without_gen)
    if not fused:
        return []
    ids = [pid for pid, _ in fused]
    known = {i: dict(answers[n]) for n, i in enumerate(kept)}
    missing = []
    for i, q in enumerate(queries):
        have = known.get(i, {})
        lacking = [pid for pid in ids if pid not in have and not (q.using == GEN and pid in without_gen)]
        if lacking:
            missing.append((i, lacking))
    if missing:
        exact = engine.exact_scores([(queries[i], lacking) for i, lacking in missing])
        for (i, _), scores in zip(missing, exact):
            known.setdefault(i, {}).update(scores)
    payloads = engine.payloads(ids)
    hits = []
    for pid, score in fused:
        key = str(pid)
        if key in payloads:
            scores = [known.get(i, {}).get(pid) for i in range(len(queries))]
            hits.append(StoredHit(id=key, score=float(score), payload=payloads[key],
                                  query_scores=[None if s is None else float(s) for s in scores]))
    return hits


def merged_points(updates: Sequence[StoredPoint], records: Iterable[Any]) -> list[StoredPoint]:
    """Full points for ``fill_vectors``: each existing record (``id``, ``vector``, ``payload``)
    with its update's vectors added and payload fields merged (a field set to None is removed)."""
    by_id = {str(u.id): u for u in updates}
    out = []
    for r in records:
        update = by_id.get(str(r.id))
        if update is None:
            continue
        vectors = {**dict(r.vector or {}), **update.vectors}
        payload = {k: v for k, v in {**dict(r.payload or {}), **update.payload}.items() if v is not None}
        out.append(StoredPoint(id=str(r.id), vectors=vectors, payload=payload))
    return out


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


def classify_conditions(flt: FilterSpec) -> Iterator[tuple[str, str, Any]]:
    """``(key, kind, value)`` per condition, kind "range" | "any" | "eq": the one reading of
    our filter format; each backend only builds its engine's objects from it.

    Checked here, before any engine sees it (a bad value raises a ``ValueError`` naming the
    field): equality takes a str, int or bool (a float becomes the range ``[v, v]``: Qdrant
    matches floats by range only); any-of takes a non-empty list of str or of int, not mixed;
    a range takes finite numbers under gte/gt/lte/lt. None, nested lists, dicts other than
    ranges and any other type are refused."""
    if not isinstance(flt, Mapping):
        raise ValueError(f"a filter must be a mapping of field -> condition, got {type(flt).__name__}")
    for key, value in flt.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"filter field names must be non-empty strings, got {key!r}")
        if isinstance(value, Mapping):
            yield key, "range", split_range(value, key)
        elif isinstance(value, (list, tuple, set, frozenset)):
            yield key, "any", _any_of(key, value)
        elif isinstance(value, float) or (isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)):
            number = _finite(key, value)
            yield key, "range", {"gte": number, "lte": number}
        else:
            yield key, "eq", _scalar(key, value)


def _scalar(key: str, value: Any) -> str | int | bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str):
        return value
    if value is None:
        raise ValueError(f"filter field {key!r}: None is not a filter value (filters match a str, int, bool, "
                         "a list of str or int, or a range)")
    raise ValueError(f"filter field {key!r}: a {type(value).__name__} ({value!r:.60}) is not a filter value "
                     "(filters match a str, int, bool, a list of str or int, or a range)")


def _any_of(key: str, values: Any) -> list[str] | list[int]:
    items = list(values)
    if not items:
        raise ValueError(f"filter field {key!r}: an empty any-of list matches nothing (give at least one value)")
    kinds = set()
    out: list[Any] = []
    for v in items:
        if isinstance(v, str):
            kinds.add("str")
            out.append(v)
        elif isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)):
            kinds.add("int")
            out.append(int(v))
        else:
            what = "None" if v is None else f"a {type(v).__name__} ({v!r:.60})"
            raise ValueError(f"filter field {key!r}: an any-of list holds only str or only int values, not {what}")
    if len(kinds) > 1:
        raise ValueError(f"filter field {key!r}: an any-of list mixes str and int values ({items!r:.80}); "
                         "use one type")
    return out


def _finite(key: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        what = "None" if value is None else f"a {type(value).__name__} ({value!r:.60})"
        raise ValueError(f"filter field {key!r}: a range bound must be a number, not {what}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"filter field {key!r}: {number} is not a usable bound or value (finite numbers only)")
    return number


def split_range(value: Mapping[str, Any], key: str = "?") -> dict[str, float]:
    allowed = {"gte", "gt", "lte", "lt"}
    unknown = set(value) - allowed
    if unknown:
        raise ValueError(f"filter field {key!r}: a dict is a range, whose keys must be among {sorted(allowed)}; "
                         f"got {sorted(map(str, unknown))}")
    if not value:
        raise ValueError(f"filter field {key!r}: an empty range (give gte, gt, lte or lt)")
    return {k: _finite(key, v) for k, v in value.items()}


class NonFiniteVectorError(ValueError):
    """Points (or a query) carry a vector with NaN or inf values, or of the wrong size.

    ``point_ids`` names the refused points (empty for a query): nothing of that upsert was
    written, so a caller can drop those points and write the others."""

    def __init__(self, message: str, point_ids: Sequence[str] = ()):
        super().__init__(message)
        self.point_ids = list(point_ids)


def _vector_problem(vector: Any, size: int) -> str | None:
    try:
        with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf: reported below
            arr = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        return f"is not a vector of numbers ({exc})"
    if arr.ndim != 1 or arr.shape[0] != size:
        return f"has shape {arr.shape}, the collection's vectors have {size} values"
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        return f"has {bad} non-finite value(s) (NaN or inf, or beyond float32)"
    return None


def check_query_vectors(queries: Sequence[VectorQuery], size: int) -> None:
    """Raise ``NonFiniteVectorError`` for an unknown vector name or a vector the engine would
    answer with nothing (NaN/inf) or an engine error (wrong size)."""
    for i, q in enumerate(queries):
        if q.using not in VECTOR_NAMES:
            raise ValueError(f"query vector {i} uses {q.using!r}; the vectors are {', '.join(VECTOR_NAMES)}")
        problem = _vector_problem(q.vector, size)
        if problem:
            raise NonFiniteVectorError(f"query vector {i} ({q.using}) {problem}: nothing searched")


def check_points(points: Sequence[StoredPoint], size: int) -> None:
    """Raise ``NonFiniteVectorError`` naming every point whose vectors cannot be stored
    (before anything is written)."""
    bad: list[tuple[str, str]] = []
    for p in points:
        for name, vector in p.vectors.items():
            if name not in VECTOR_NAMES:
                problem: str | None = f"is named {name!r} (the vectors are {', '.join(VECTOR_NAMES)})"
            else:
                problem = _vector_problem(vector, size)
            if problem:
                bad.append((str(p.id), f"vector {name!r} {problem}"))
                break
    if bad:
        first_id, first = bad[0]
        more = f" (and {len(bad) - 1} more point(s))" if len(bad) > 1 else ""
        raise NonFiniteVectorError(f"point {first_id}: {first}{more}; nothing of this upsert was written",
                                   [pid for pid, _ in bad])
