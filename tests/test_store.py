"""One conformance suite for every store backend, checked against the numpy fusion reference."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from ume_retriever.fusion import Fusion, fuse_reference
from ume_retriever.store import (
    SchemaMismatchError, StoredPoint, StoreLockedError, StoreSchema, VectorQuery, open_store,
)
from ume_retriever.store.edge import EdgeStore
from ume_retriever.store.qdrant import QdrantStore

DIM = 16
N = 240
SCHEMA = StoreSchema(vector_size=DIM, model="tiny-test", revision=None)
BACKENDS = ["edge", "local-memory", "local-path", "server"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    """Clustered vectors (as real embeddings are), distinct disc and gen spaces."""
    rng = np.random.default_rng(42)
    centres = rng.normal(size=(6, DIM))
    disc = _unit(centres[rng.integers(0, 6, N)] + 0.6 * rng.normal(size=(N, DIM)))
    gen = _unit(centres[rng.integers(0, 6, N)][:, ::-1] + 0.6 * rng.normal(size=(N, DIM)))
    ids = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"pt-{i}")) for i in range(N)]
    payloads = [{"source": f"doc{i % 5}.pdf", "page": i % 17, "modality": "pdf_page" if i % 3 else "image"}
                for i in range(N)]
    queries = _unit(rng.normal(size=(4, DIM)))
    return ids, disc, gen, payloads, queries


def make_store(kind: str, tmp_path, schema: StoreSchema = SCHEMA):
    if kind == "edge":
        return EdgeStore(tmp_path / "edge", schema)
    if kind == "local-memory":
        return QdrantStore(schema, location=":memory:")
    if kind == "local-path":
        return QdrantStore(schema, path=str(tmp_path / "local"))
    url = os.environ.get("QDRANT_URL")
    if not url:
        pytest.skip("QDRANT_URL is not set: no Qdrant server here, server backend not tested")
    return QdrantStore(schema, url=url, api_key=os.environ.get("QDRANT_API_KEY"),
                       collection=f"ume-test-{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path, data):
    s = make_store(request.param, tmp_path)
    ids, disc, gen, payloads, _ = data
    s.upsert([StoredPoint(id=ids[i], vectors={"disc": disc[i], "gen": gen[i]}, payload=payloads[i]) for i in range(N)])
    yield s
    s.close()


def assert_same_ranking(hits, ids, scores, uses, fusion, prefetch_limit, limit):
    """Hits equal the reference ranking; tied scores (common with RRF) may come in any order."""
    full = dict(fuse_reference(scores, uses, fusion, prefetch_limit, limit=len(ids)))
    expected = fuse_reference(scores, uses, fusion, prefetch_limit, limit)
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], rtol=1e-4, atol=1e-5)
    for h in hits:
        assert ids.index(h.id) in full
        assert abs(full[ids.index(h.id)] - h.score) <= 1e-4 * abs(h.score) + 1e-5


FUSIONS = [
    Fusion("rrf"), Fusion("rrf", k=2), Fusion("rrf", disc_weight=3.0, gen_weight=1.0), Fusion("dbsf"),
    Fusion("weighted", disc_weight=0.3, gen_weight=0.7), Fusion("disc"), Fusion("gen"),
]


@pytest.mark.parametrize("fusion", FUSIONS, ids=lambda f: f"{f.method}-k{f.k}-{f.disc_weight}-{f.gen_weight}")
def test_fusion_matches_numpy_reference(store, data, fusion):
    ids, disc, gen, _, queries = data
    q_disc, q_gen = queries[0], queries[1]
    queries_ = ([VectorQuery("disc", q_disc)] if fusion.needs_disc else []) + \
               ([VectorQuery("gen", q_gen)] if fusion.needs_gen else [])
    scores = np.stack([disc @ q_disc if q.using == "disc" else gen @ q_gen for q in queries_])
    hits = store.query(queries_, fusion, limit=10, prefetch_limit=40)
    assert_same_ranking(hits, ids, scores, [q.using for q in queries_], fusion, 40, 10)
    for h in hits:  # each hit carries its exact cosine to every query vector
        i = ids.index(h.id)
        expected_scores = [float((disc if q.using == "disc" else gen)[i] @ q.vector) for q in queries_]
        np.testing.assert_allclose(h.query_scores, expected_scores, atol=1e-5)


@pytest.mark.parametrize("method", ["rrf", "weighted", "dbsf", "gen"])
def test_several_gen_samples_fuse_with_disc(store, data, method):
    ids, disc, gen, _, queries = data
    fusion = Fusion(method)
    uses = (["disc"] if fusion.needs_disc else []) + ["gen", "gen", "gen"]
    vecs = ([queries[0]] if fusion.needs_disc else []) + [queries[1], queries[2], queries[3]]
    qs = [VectorQuery(u, v) for u, v in zip(uses, vecs)]
    scores = np.stack([(disc if u == "disc" else gen) @ v for u, v in zip(uses, vecs)])
    hits = store.query(qs, fusion, limit=8, prefetch_limit=30)
    assert_same_ranking(hits, ids, scores, uses, fusion, 30, 8)


@pytest.mark.parametrize("flt", [
    {"source": "doc2.pdf"}, {"modality": ["image"]}, {"page": {"gte": 3, "lte": 5}},
    {"source": ["doc1.pdf", "doc3.pdf"], "page": {"lt": 4}},
])
def test_filters(store, data, flt):
    ids, disc, gen, payloads, queries = data

    def keep(p):
        for key, value in flt.items():
            v = p[key]
            if isinstance(value, dict):
                if not all({"gte": v >= b, "lte": v <= b, "gt": v > b, "lt": v < b}[op] for op, b in value.items()):
                    return False
            elif isinstance(value, list):
                if v not in value:
                    return False
            elif v != value:
                return False
        return True

    mask = np.array([keep(p) for p in payloads])
    fusion = Fusion("rrf")
    scores = np.stack([np.where(mask, disc @ queries[0], -np.inf), np.where(mask, gen @ queries[1], -np.inf)])
    hits = store.query([VectorQuery("disc", queries[0]), VectorQuery("gen", queries[1])], fusion, 10, 25, flt)
    assert hits and all(keep(h.payload) for h in hits)
    assert_same_ranking(hits, ids, scores, ["disc", "gen"], fusion, 25, 10)
    assert store.count(flt) == int(mask.sum())


def test_ids_scroll_count_delete(store, data):
    ids, *_ = data
    assert store.count() == N
    assert store.existing_ids([ids[0], ids[5], str(uuid.uuid4())]) == {ids[0], ids[5]}
    scrolled = dict(store.scroll({"source": "doc1.pdf"}, ["page"]))
    assert set(scrolled) == {ids[i] for i in range(N) if i % 5 == 1}
    assert all(set(p) == {"page"} for p in scrolled.values())
    store.delete_ids([ids[0], ids[1]])
    assert store.count() == N - 2 and not store.existing_ids([ids[0]])
    store.delete_where({"source": "doc2.pdf"})
    assert store.count({"source": "doc2.pdf"}) == 0 and store.count() == N - 2 - N // 5


def test_points_without_gen_vector(tmp_path, data):
    ids, disc, gen, payloads, queries = data
    for kind in ("edge", "local-memory"):
        s = make_store(kind, tmp_path / kind)
        s.upsert([StoredPoint(id=ids[i], vectors={"disc": disc[i]}, payload=payloads[i]) for i in range(20)])
        s.upsert([StoredPoint(id=ids[i], vectors={"disc": disc[i], "gen": gen[i]}, payload=payloads[i])
                  for i in range(20, 40)])
        gen_hits = s.query([VectorQuery("gen", queries[1])], Fusion("gen"), 40, 40)
        assert {h.id for h in gen_hits} == set(ids[20:40])
        fused = s.query([VectorQuery("disc", queries[0]), VectorQuery("gen", queries[1])], Fusion("weighted"), 40, 40)
        assert {h.id for h in fused} == set(ids[:40])
        s.close()


def test_edge_store_persists_and_checks_schema(tmp_path, data):
    ids, disc, gen, payloads, _ = data
    s = EdgeStore(tmp_path, SCHEMA)
    s.upsert([StoredPoint(id=ids[i], vectors={"disc": disc[i], "gen": gen[i]}, payload=payloads[i]) for i in range(30)])
    s.close()
    again = EdgeStore(tmp_path, SCHEMA)
    assert again.count() == 30
    again.close()
    with pytest.raises(SchemaMismatchError, match=r"vectors \{'disc': 16, 'gen': 16\} \(need \{'disc': 32"):
        EdgeStore(tmp_path, StoreSchema(vector_size=32, model="tiny-test"))
    with pytest.raises(SchemaMismatchError, match=r"model 'tiny-test' \(encoder is 'other/model'\)"):
        EdgeStore(tmp_path, StoreSchema(vector_size=DIM, model="other/model"))
    assert EdgeStore(tmp_path, SCHEMA).count() == 30  # the failed opens released the lock


def test_local_mode_checks_schema(tmp_path):
    s = QdrantStore(SCHEMA, path=str(tmp_path / "q"))
    s.close()
    with pytest.raises(SchemaMismatchError, match="need"):
        QdrantStore(StoreSchema(vector_size=8, model="tiny-test"), path=str(tmp_path / "q"))


def test_second_process_gets_a_clear_lock_error(tmp_path):
    s = open_store(SCHEMA, tmp_path / "locked")
    code = (
        "import sys; from ume_retriever.store import open_store, StoreSchema, StoreLockedError\n"
        f"try:\n    open_store(StoreSchema(vector_size={DIM}, model='tiny-test'), {str(tmp_path / 'locked')!r})\n"
        "except StoreLockedError as e:\n    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    s.close()
    assert proc.returncode == 3, proc.stderr
    assert f"pid {os.getpid()}" in proc.stdout and ".lock" in proc.stdout and "another process" in proc.stdout
    open_store(SCHEMA, tmp_path / "locked").close()  # free again once closed
