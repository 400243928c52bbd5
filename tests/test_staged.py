"""Staged ingestion (gen="later" + backfill), the pending-point fusion rule, adaptive reasoning at
query time and the query cache: each checked against an independent computation."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from helpers import CountingEncoder, cosine, make_pdf, worker_env, write_mp4
from ume_retriever import Fusion, Item, UMEIndex
from ume_retriever.fusion import fuse_reference
from ume_retriever.store import StoredPoint, StoreSchema, VectorQuery
from ume_retriever.store.edge import EdgeStore


@pytest.fixture()
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    make_pdf(root / "report.pdf", ["first page text", "second page text", "third page text"])
    img = Image.new("RGB", (80, 60), "white")
    ImageDraw.Draw(img).ellipse((10, 10, 50, 50), fill="red")
    img.save(root / "red.png")
    (root / "notes.md").write_text("# Notes\nA green triangle above a square.")
    write_mp4(root / "clip.mp4", num_frames=12)
    return root


MEMORY = [Item(text="a note kept in memory", instruction="Represent the note.", metadata={"source": "db://1"}),
          Item(image=Image.new("RGB", (40, 40), "green"), metadata={"source": "db://2"})]


def stored(index: UMEIndex) -> dict[str, dict]:
    """id -> {"payload", "disc", "gen"} straight from the Edge shard."""
    records = index.store._shard.retrieve([pid for pid, _ in index.store.scroll({"kind": "item"}, [])],
                                          with_payload=True, with_vector=True)
    return {str(r.id): {"payload": dict(r.payload), **{k: np.asarray(v) for k, v in (r.vector or {}).items()}}
            for r in records}


def test_gen_later_is_searchable_at_once_and_backfill_equals_ingest_time_gen(encoder, corpus, tmp_path):
    now = UMEIndex(encoder, tmp_path / "now", batch_size=2)
    later = UMEIndex(encoder, tmp_path / "later", batch_size=2)
    ref = now.add([corpus, *MEMORY])
    report = later.add([corpus, *MEMORY], gen="later")
    assert [e.id for e in report.indexed] and sorted(e.id for e in report.indexed) == sorted(e.id for e in ref.indexed)
    # 3 pages + image + text + video clip + the in-memory text item wait; the in-memory image cannot
    assert report.gen_pending == 7 == later.pending_gen()
    assert [e.source for e in report.gen_now] == ["db://2"] and "cannot be read again" in report.gen_now[0].reason
    before = stored(later)
    assert sum("gen" not in p for p in before.values()) == 7
    assert all(p["payload"].get("gen_status") == "pending" for p in before.values() if "gen" not in p)
    # searchable at once: with every pending point ranked in the gen list as in the disc list,
    # a fused search ranks exactly as disc
    fused = later.search("first page text", k=8, fusion="rrf")
    disc = later.search("first page text", k=8, fusion="disc")
    pending_ids = [h.id for h in disc if "gen" not in before[h.id]]
    assert [h.id for h in fused if h.id in pending_ids] == pending_ids
    assert all(h.gen_score is None for h in fused if h.id in pending_ids)

    filled = later.backfill_gen()
    assert int(filled) == 7 and filled.failed == [] and filled.changed == [] and later.pending_gen() == 0
    want, got = stored(now), stored(later)
    assert set(want) == set(got)
    for pid, point in want.items():
        assert cosine(point["gen"], got[pid]["gen"]) >= 0.9999, got[pid]["payload"]["locator"]
        assert np.allclose(point["disc"], got[pid]["disc"], atol=1e-6)
        assert got[pid]["payload"]["reasoning"] == point["payload"]["reasoning"]
        assert "gen_status" not in got[pid]["payload"] and "gen_from" not in got[pid]["payload"]
    assert int(later.backfill_gen()) == 0  # idempotent
    # once backfilled, searches equal the gen="now" index's
    for q in ("first page text", "a red circle", "a green triangle"):
        assert [h.id for h in later.search(q, k=5)] == [h.id for h in now.search(q, k=5)]
    # and the manifests match: adding again runs no model
    assert len(later.add([corpus]).indexed) == 0


def test_backfill_reports_changed_and_failed_and_never_recreates_deleted_points(encoder, corpus, tmp_path):
    index = UMEIndex(encoder, tmp_path / "s", batch_size=2)
    index.add([corpus], gen="later")
    (corpus / "notes.md").write_text("rewritten since")  # changed: left pending, reported
    (corpus / "red.png").unlink()  # gone: reported as changed too (prune removes it)
    broken = corpus / "clip.mp4"
    broken.write_bytes(broken.read_bytes())  # unchanged bytes: still fine
    index.delete(corpus / "report.pdf")  # deleted before the backfill: never re-created
    report = index.backfill_gen()
    assert sorted(Path(e.source).name for e in report.changed) == ["notes.md", "red.png"]
    assert int(report) == 1 and report.remaining == 2  # the clip filled; the two changed still pending
    assert index.count({"source": str(corpus / "report.pdf")}) == 0
    add_again = index.add([corpus], gen="later", prune=True)
    assert [Path(e.source).name for e in add_again.removed] == ["red.png"]
    assert index.pending_gen() == 4  # the rewritten notes.md, and report.pdf (deleted above) again


def test_backfill_marks_an_unreadable_item_failed_and_retry_failed_retries(encoder, tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    make_pdf(root / "a.pdf", ["one", "two"])
    index = UMEIndex(encoder, tmp_path / "s")
    index.add([root], gen="later")
    # the file's bytes are the same, but the loader now renders pages differently: content differs
    original = index.loader
    index.loader = type(original)(**{**original.__dict__, "pdf_max_pixels": original.pdf_max_pixels // 4})
    report = index.backfill_gen()
    assert len(report.changed) == 2 and "reads differently" in report.changed[0].reason
    index.loader = original
    # an item that cannot be made again: marked failed with the reason
    pid = next(pid for pid, p in index.store.scroll({"kind": "item"}, ["locator"]) if p["locator"] == "page=1")
    index.store.fill_vectors([StoredPoint(pid, {}, {"locator": "page=99"})])
    report = index.backfill_gen()
    assert [e.reason for e in report.failed] == ["page 99 does not exist (2 pages)"] and int(report) == 1
    assert index.failed_gen() == 1 and index.pending_gen() == 0
    assert int(index.backfill_gen()) == 0  # failed ones are not retried by default
    index.store.fill_vectors([StoredPoint(pid, {}, {"locator": "page=1"})])
    assert int(index.backfill_gen(retry_failed=True)) == 1 and index.failed_gen() == 0


def test_pending_points_are_fused_as_numpy_says(tmp_path):
    """The store's fused ranking with gen-less points, against fuse_reference's exact lists."""
    rng = np.random.default_rng(3)
    n, dim = 300, 16
    disc, gen = rng.normal(size=(n, dim)), rng.normal(size=(n, dim))
    disc /= np.linalg.norm(disc, axis=1, keepdims=True)
    gen /= np.linalg.norm(gen, axis=1, keepdims=True)
    ids = [str(uuid.UUID(int=i + 1)) for i in range(n)]
    pending = set(rng.choice(n, 120, replace=False).tolist())
    store = EdgeStore(tmp_path / "s", StoreSchema(vector_size=dim, model="m"), hnsw_ef=None)
    store.upsert([StoredPoint(ids[i], {"disc": disc[i]} if i in pending else {"disc": disc[i], "gen": gen[i]},
                              {"gen_status": "pending"} if i in pending else {}) for i in range(n)])
    q = rng.normal(size=(2, dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = np.stack([disc @ q[0], gen @ q[1]])
    queries = [VectorQuery("disc", q[0]), VectorQuery("gen", q[1])]
    for fusion in (Fusion("rrf"), Fusion("rrf", disc_weight=1, gen_weight=3), Fusion("weighted", 0.3, 0.7),
                   Fusion("dbsf")):
        want = fuse_reference(scores, ["disc", "gen"], fusion, prefetch_limit=40, limit=10, without_gen=pending)
        got = store.query(queries, fusion, limit=10, prefetch_limit=40)
        assert [h.id for h in got] == [ids[i] for i, _ in want], fusion
        assert np.allclose([h.score for h in got], [s for _, s in want], atol=1e-5)
        for h in got:
            i = ids.index(h.id)
            assert h.query_scores[0] == pytest.approx(scores[0, i], abs=1e-5)
            assert h.query_scores[1] is None if i in pending else h.query_scores[1] == pytest.approx(scores[1, i],
                                                                                                      abs=1e-5)
    # the rule by hand for one pending point: its RRF gen term is its disc term
    rrf = fuse_reference(scores, ["disc", "gen"], Fusion("rrf"), 300, 300, without_gen=pending)
    disc_rank = {int(i): r for r, i in enumerate(np.argsort(-scores[0], kind="stable"))}
    p = min(pending, key=lambda i: disc_rank[i])
    assert dict(rrf)[p] == pytest.approx(2 / (60 + disc_rank[p]))
    store.close()


def test_kill_9_mid_backfill_loses_nothing_and_redoes_no_finished_point(tiny_ckpt, tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    make_pdf(root / "a.pdf", [f"page {i}" for i in range(6)])
    store = tmp_path / "s"
    script = tmp_path / "child.py"
    script.write_text(BACKFILL_CHILD)

    def child(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
        env = worker_env()
        if fault:
            env["UME_FAULT"] = fault
        return subprocess.run([sys.executable, str(script), str(tiny_ckpt), str(store), str(root), *args], env=env,
                              capture_output=True, text=True, timeout=300)

    assert child("add").returncode == 0
    killed = child("backfill", fault="after_backfill_window:1")  # windows of 2: dies after the first
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = child("backfill")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    filled, encoded, pending, points = resumed.stdout.strip().splitlines()[-1].split()
    assert (int(filled), int(encoded), int(pending), int(points)) == (4, 4, 0, 6)  # only the 4 left were encoded
    assert child("backfill").stdout.strip().splitlines()[-1].split()[:3] == ["0", "0", "0"]


BACKFILL_CHILD = """
import sys
import torch
from ume_retriever import UMEEncoder, UMEIndex
enc = UMEEncoder.from_pretrained(sys.argv[1], device="cpu", dtype=torch.float32, max_new_tokens=4)
calls = []
inner = enc.encode
def counting(inputs, *a, **k):
    calls.append(len(inputs) if isinstance(inputs, list) else 1)
    return inner(inputs, *a, **k)
enc.encode = counting
idx = UMEIndex(enc, sys.argv[2], batch_size=2, flush_batches=1)
if sys.argv[4] == "add":
    idx.add([sys.argv[3]], gen="later")
else:
    report = idx.backfill_gen()
    print(int(report), sum(calls), idx.pending_gen(), idx.count(), flush=True)
"""


def test_adaptive_extremes_rank_as_disc_and_as_rrf(encoder, corpus, tmp_path):
    counting = CountingEncoder(encoder)
    index = UMEIndex(counting, tmp_path / "s", query_cache_size=0)
    index.add([corpus])
    for q in ("first page text", "a red circle"):
        disc = index.search(q, k=5, fusion="disc")
        calls = counting.calls
        never = index.search(q, k=5, fusion="adaptive:margin=0")
        assert counting.calls == calls + 1  # the disc encode only
        assert [h.id for h in never] == [h.id for h in disc] and not any(h.reasoned for h in never)
        assert [h.score for h in never] == pytest.approx([h.score for h in disc])
        rrf = index.search(q, k=5, fusion="rrf")
        always = index.search(q, k=5, fusion="adaptive:margin=2,then=rrf")
        assert [h.id for h in always] == [h.id for h in rrf] and all(h.reasoned for h in always)
        assert [h.score for h in always] == pytest.approx([h.score for h in rrf])
        weighted = index.search(q, k=5, fusion="weighted:disc=0.3,gen=0.7")
        assert [h.id for h in index.search(q, k=5, fusion="adaptive:margin=2,then=weighted,disc=0.3,gen=0.7")] \
            == [h.id for h in weighted]
    # an intermediate margin: reasons exactly when the disc top-1/top-2 gap is below it
    disc = index.search("second page text", k=5, fusion="disc")
    gap = disc[0].score - disc[1].score
    assert not index.search("second page text", k=5, fusion=Fusion("adaptive", margin=gap * 0.999))[0].reasoned
    assert index.search("second page text", k=5, fusion=Fusion("adaptive", margin=gap * 1.001))[0].reasoned


def test_query_cache_runs_no_model_for_a_repeated_query(encoder, corpus, tmp_path):
    counting = CountingEncoder(encoder)
    index = UMEIndex(counting, tmp_path / "s", query_cache_size=2)
    index.add([corpus])
    first = index.search("a red circle", k=4)
    calls = counting.calls
    again = index.search("a red circle", k=4)
    assert counting.calls == calls and [(h.id, h.score) for h in again] == [(h.id, h.score) for h in first]
    index.search("a red circle", k=4, fusion="disc")  # disc part cached too
    index.search("a red circle", k=4, fusion="adaptive:margin=2")  # both parts cached
    assert counting.calls == calls
    index.search("a red circle", k=4, instruction="Find the picture.")  # another instruction: a miss
    assert counting.calls == calls + 1
    index.search("a red circle", k=4, gen_samples=2)  # sampled without a seed: never cached
    index.search("a red circle", k=4, gen_samples=2)
    assert counting.calls == calls + 3
    index.search("a red circle", k=4, gen_samples=2, seed=5)
    index.search("a red circle", k=4, gen_samples=2, seed=5)
    assert counting.calls == calls + 4
    for q in ("q one", "q two", "q three"):  # size 2: the oldest falls out
        index.search(q, k=2)
    calls = counting.calls
    index.search("q three", k=2)
    assert counting.calls == calls
    index.search("q one", k=2)
    assert counting.calls == calls + 1
    off = UMEIndex(counting, tmp_path / "s2", query_cache_size=0)
    off.add([Item(text="x")])
    calls = counting.calls
    off.search("x", k=1)
    off.search("x", k=1)
    assert counting.calls == calls + 2


def test_retriever_backfills_in_the_background_and_stops_on_close(encoder, corpus, tmp_path):
    from ume_retriever import UMERetriever

    index = UMEIndex(encoder, tmp_path / "s", batch_size=1, flush_batches=1)
    retriever = UMERetriever(index)
    retriever.add([corpus], gen="later")
    assert index.pending_gen() == 6
    retriever.start_backfill(poll_seconds=0.05)
    hits = retriever.retrieve("first page text", k=3)  # searches run while it backfills
    assert len(hits) == 3
    deadline = time.monotonic() + 120
    while index.pending_gen() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert index.pending_gen() == 0
    (corpus / "more.md").write_text("added while the backfill thread waits")
    retriever.add([corpus / "more.md"], gen="later")
    deadline = time.monotonic() + 60
    while index.pending_gen() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert index.pending_gen() == 0  # the running thread picked up the new pending point
    thread = retriever._backfill_thread
    retriever.close()
    assert thread is not None and not thread.is_alive()


def test_close_stops_a_backfill_in_progress(encoder, tmp_path):
    from ume_retriever import UMERetriever

    root = tmp_path / "c"
    root.mkdir()
    make_pdf(root / "a.pdf", [f"page {i}" for i in range(12)])
    index = UMEIndex(encoder, tmp_path / "s", batch_size=1, flush_batches=1)
    retriever = UMERetriever(index)
    retriever.add([root], gen="later")
    retriever.start_backfill()
    while index.pending_gen() == 12:
        time.sleep(0.01)
    started = time.monotonic()
    thread = retriever._backfill_thread
    retriever.close()  # stops between windows of one item: well before the 11 others are done
    assert not thread.is_alive() and time.monotonic() - started < 30
    reopened = UMEIndex(encoder, tmp_path / "s")
    assert 0 < reopened.pending_gen() < 12
    reopened.close()


def test_gen_later_needs_both_vectors(encoder, tmp_path):
    index = UMEIndex(encoder, tmp_path / "s", vectors=("disc",))
    with pytest.raises(ValueError, match="gen='later' needs an index of both vectors"):
        index.add([Item(text="x")], gen="later")
    with pytest.raises(ValueError, match="gen must be 'now' or 'later'"):
        index.add([Item(text="x")], gen="soon")
