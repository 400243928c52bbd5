"""UMEIndex over real files and the embedded Qdrant Edge store: ingest, cache, updates, search."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pymupdf
import pytest
from PIL import Image, ImageDraw

from helpers import make_pdf, write_mp4
from ume_retriever import Fusion, Item, UMEIndex
from ume_retriever.inputs.loaders import LoaderConfig


@pytest.fixture()
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    make_pdf(root / "report.pdf", ["first page text", "second page text", "third page text"])
    img = Image.new("RGB", (80, 60), "white")
    ImageDraw.Draw(img).ellipse((10, 10, 50, 50), fill="red")
    img.save(root / "red.png")
    Image.new("RGB", (64, 64), "blue").save(root / "sub" / "blue.jpg")
    (root / "notes.md").write_text("# Notes\nA green triangle above a square.")
    write_mp4(root / "sub" / "clip.mp4", num_frames=12)
    (root / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (root / "empty.png").write_bytes(b"")
    (root / "data.xyz").write_text("?")
    os.symlink(root, root / "sub" / "loop")  # a symlink loop must not hang the walk
    return root


@pytest.fixture()
def index(encoder, tmp_path):
    idx = UMEIndex(encoder, tmp_path / "store")
    yield idx
    idx.close()


def statuses(report):
    return {(Path(e.source).name, e.locator): (e.status, e.reason) for e in report.entries}


def test_ingest_reports_every_input(index, corpus):
    report = index.add([corpus])
    got = statuses(report)
    assert {k for k, v in got.items() if v[0] == "indexed"} == {
        ("report.pdf", "page=1"), ("report.pdf", "page=2"), ("report.pdf", "page=3"), ("red.png", ""),
        ("blue.jpg", ""), ("notes.md", ""), ("clip.mp4", "clip=0.000-1.200"),
    }
    assert "not a readable PDF" in got[("broken.pdf", "")][1]
    assert "empty" in got[("empty.png", "")][1]
    assert "unsupported file type '.xyz'" in got[("data.xyz", "")][1]
    assert len(report.entries) == 10 and index.count() == 7
    hits = index.search("page", k=10, filter={"modality": "pdf_page"}, fusion="disc")
    pages = {h.payload["page"]: h.payload for h in hits}
    assert set(pages) == {1, 2, 3}
    assert pages[2]["text"] == "second page text" and pages[2]["source"] == str(corpus / "report.pdf")
    assert pages[2]["reasoning"] is not None and pages[2]["model"] == index.encoder.name_or_path


def test_stored_vectors_are_the_encoders(index, corpus, encoder):
    index.add([corpus / "red.png", corpus / "notes.md"])
    query = Item(text="red things")
    q = encoder.encode(query, mode="both")
    for fusion in ("rrf", "weighted", "dbsf", "disc", "gen"):
        hits = index.search(query, k=2, fusion=fusion)
        for h in hits:
            name = Path(h.source).name
            ref = encoder.encode(Item(image=corpus / "red.png") if name == "red.png" else
                                 Item(text=(corpus / "notes.md").read_text()), mode="both")
            if fusion != "gen":
                assert h.disc_score == pytest.approx(float(ref.disc @ q.disc), abs=1e-5)
            if fusion != "disc":
                assert h.gen_score == pytest.approx(float(ref.gen @ q.gen), abs=1e-5)
    top = index.search(corpus / "red.png", k=1, fusion="disc")[0]  # an item finds itself
    assert Path(top.source).name == "red.png" and top.disc_score == pytest.approx(1.0, abs=1e-5)
    weighted = index.search(query, k=2, fusion=Fusion("weighted", disc_weight=0.25, gen_weight=0.75))
    for h in weighted:
        assert h.score == pytest.approx(0.25 * h.disc_score + 0.75 * h.gen_score, abs=1e-5)


def test_reingest_skips_the_model_and_updates_replace(index, corpus, encoder):
    first = index.add([corpus])
    calls = []
    encode = encoder.encode
    encoder.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    try:
        again = index.add([corpus])
        assert calls == [] and len(again.unchanged) == 7 and len(again.failed) == 3
        assert {e.id for e in again.unchanged} == {e.id for e in first.indexed}
        # change page 2, drop page 3: one page re-encoded, one point removed, page 1 untouched
        make_pdf(corpus / "report.pdf", ["first page text", "second page CHANGED"])
        changed = index.add([corpus / "report.pdf"])
    finally:
        del encoder.encode
    got = statuses(changed)
    assert got[("report.pdf", "page=1")][0] == "unchanged" and got[("report.pdf", "page=2")][0] == "indexed"
    assert changed.deleted_stale == 2 and len(calls) == 1
    assert index.count({"source": str(corpus / "report.pdf")}) == 2 and index.count() == 6
    texts = sorted(h.payload["text"] for h in index.search("x", k=10, filter={"source": str(corpus / "report.pdf")}))
    assert texts == ["first page text", "second page CHANGED"]
    assert index.delete(corpus / "report.pdf") == 2 and index.count() == 4


def test_items_with_metadata_filters_and_disc_only_index(encoder, tmp_path):
    idx = UMEIndex(encoder, tmp_path / "disc-only", vectors=["disc"])
    calls = []
    encode = encoder.encode
    encoder.encode = lambda *a, **k: calls.append(k.get("mode")) or encode(*a, **k)
    try:
        items = [Item(text=f"note {i}", metadata={"source": f"db://notes/{i}", "team": "a" if i % 2 else "b"})
                 for i in range(6)]
        report = idx.add(items)
        hits = idx.search("note", k=10, filter={"team": "a"})  # rrf asked, only disc exists
    finally:
        del encoder.encode
    assert len(report.indexed) == 6 and set(calls) == {"disc"}
    assert {h.payload["source"] for h in hits} == {"db://notes/1", "db://notes/3", "db://notes/5"}
    assert all(h.gen_score is None and h.disc_score is not None for h in hits)
    with pytest.raises(ValueError, match="only disc"):
        idx.search("note", fusion="gen")
    assert len(idx.add(items).unchanged) == 6
    idx.close()


def test_loader_options(encoder, tmp_path, corpus):
    idx = UMEIndex(encoder, tmp_path / "opts", loader=LoaderConfig(text_chunk_chars=20, text_chunk_overlap=5,
                                                                   video_clip_seconds=0.5, pdf_dpi=72))
    report = idx.add([corpus / "notes.md", corpus / "sub" / "clip.mp4"])
    locs = sorted(e.locator for e in report.indexed)
    assert [l for l in locs if l.startswith("clip")] == ["clip=0.000-0.500", "clip=0.500-1.000", "clip=1.000-1.200"]
    assert len([l for l in locs if l.startswith("chunk")]) >= 2
    idx.close()


def test_search_while_ingesting(encoder, tmp_path):
    idx = UMEIndex(encoder, tmp_path / "busy", batch_size=2)
    idx.add([Item(text=f"seed {i}") for i in range(4)])
    errors, results = [], []
    stop = threading.Event()

    def searcher():
        while not stop.is_set():
            try:
                hits = idx.search("query text", k=5, fusion="disc")
                scores = [h.score for h in hits]
                assert scores == sorted(scores, reverse=True) and all(h.payload.get("source") for h in hits)
                results.append(len(hits))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    report = idx.add([Item(text=f"doc number {i}") for i in range(24)])
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert results and len(report.indexed) == 24 and idx.count() == 28
    idx.close()


CHILD = """
import sys, os, json
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from ume_retriever import UMEEncoder, UMEIndex
enc = UMEEncoder.from_pretrained(sys.argv[1], device="cpu", dtype=torch.float32, max_new_tokens=4)
idx = UMEIndex(enc, sys.argv[2], batch_size=2)
report = idx.add([sys.argv[3]])
points = {pid: p["locator"] + "|" + (p.get("text") or "") for pid, p in idx.store.scroll({"kind": "item"}, ["locator", "text"])}
print(json.dumps({"indexed": len(report.indexed), "unchanged": len(report.unchanged),
                  "failed": [e.reason for e in report.failed], "points": points}), flush=True)
"""


def _ingest_child(tiny_ckpt, store, corpus, script, fault=None):
    """One ingest in its own process, optionally killed at a fault-injection point (UME_FAULT)."""
    env = {k: v for k, v in os.environ.items() if k != "UME_FAULT"}
    if fault:
        env["UME_FAULT"] = fault
    return subprocess.run([sys.executable, str(script), str(tiny_ckpt), str(store), str(corpus)], env=env,
                          capture_output=True, text=True, timeout=300)


def _child_result(proc):
    import json

    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_kill_9_mid_ingest_then_resume(tiny_ckpt, tmp_path):
    """SIGKILL a real ingest at each fault-injection point (after an item upsert, after the stale
    delete, before the manifest write, inside store creation); every restart converges to exactly
    the items, and so does a CHANGED file killed half-way through its new points."""
    corpus = tmp_path / "many"
    corpus.mkdir()
    make_pdf(corpus / "a.pdf", [f"page {i}" for i in range(5)])
    for i in range(5):
        (corpus / f"t{i}.txt").write_text(f"text file {i}")
    store = tmp_path / "crash-store"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    kills = ["inside_store_creation", "after_item_upsert:1", "after_item_upsert:1", "after_stale_delete:1",
             "before_manifest_write:1"]
    for fault in kills:
        proc = _ingest_child(tiny_ckpt, store, corpus, script, fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-2000:])
    first = _child_result(_ingest_child(tiny_ckpt, store, corpus, script))
    assert first["failed"] == [] and first["indexed"] + first["unchanged"] == 10  # every item accounted for
    pages = sorted(v for v in first["points"].values() if v.startswith("page="))
    assert len(first["points"]) == 10 and pages == [f"page={i + 1}|page {i}" for i in range(5)]
    again = _child_result(_ingest_child(tiny_ckpt, store, corpus, script))
    assert (again["indexed"], again["unchanged"]) == (0, 10)  # manifests complete: nothing to redo

    # A changed file (4 new pages) killed after its first new points are in: the restart ends
    # with the new version only, no point of the old one left.
    make_pdf(corpus / "a.pdf", [f"new page {i}" for i in range(4)])
    killed = _ingest_child(tiny_ckpt, store, corpus, script, "after_item_upsert:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    final = _child_result(_ingest_child(tiny_ckpt, store, corpus, script))
    pages = sorted(v for v in final["points"].values() if v.startswith("page="))
    assert pages == [f"page={i + 1}|new page {i}" for i in range(4)] and len(final["points"]) == 9
    assert _child_result(_ingest_child(tiny_ckpt, store, corpus, script))["indexed"] == 0


def test_encrypted_and_truncated_files_are_reported(index, tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    doc = pymupdf.open()
    doc.new_page().insert_text((20, 40), "secret")
    doc.save(str(root / "locked.pdf"), encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="u", owner_pw="o")
    noise = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "cut.png")
    data = (root / "cut.png").read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    (root / "ok.txt").write_text("fine")
    got = statuses(index.add([root]))
    assert got[("locked.pdf", "")] == ("failed", "PDF is encrypted (password required)")
    assert got[("cut.png", "")][0] == "failed" and "truncated or corrupt" in got[("cut.png", "")][1]
    assert got[("ok.txt", "")][0] == "indexed" and index.count() == 1


def test_pass_at_k_query_fuses_k_gen_samples(index, corpus, encoder):
    index.add([corpus / "red.png", corpus / "notes.md", corpus / "report.pdf"])
    hits = index.search("a red circle", k=4, gen_samples=3, seed=5)
    samples = encoder.encode("a red circle", mode="both", num_samples=3, seed=5).samples
    assert len(hits) == 4
    for h in hits:
        ref = encoder.encode(Item(image=Path(h.source)) if h.source.endswith(".png") else
                             Item(text=h.payload["text"]) if h.source.endswith(".md") else None, mode="gen") \
            if not h.source.endswith(".pdf") else None
        if ref is not None:
            expected = np.mean([float(ref.gen @ s.vector) for s in samples])
            assert h.gen_score == pytest.approx(expected, abs=1e-5)


def test_delete_by_item_source_and_by_relative_path_of_a_removed_file(index, tmp_path, monkeypatch):
    index.add([Item(text="kept", metadata={"source": "notes-1"}), Item(text="gone", metadata={"source": "db://x/2"})])
    folder = tmp_path / "rel"
    folder.mkdir()
    (folder / "a.txt").write_text("a file")
    index.add([folder / "a.txt"])
    assert index.count() == 3
    assert index.delete("db://x/2") == 1 and index.delete("notes-1") == 1
    monkeypatch.chdir(folder)
    (folder / "a.txt").unlink()
    assert index.delete("a.txt") == 1 and index.count() == 0


def test_a_file_named_twice_is_indexed_once(index, corpus):
    report = index.add([corpus / "red.png", corpus, corpus / "red.png", str(corpus / "report.pdf")])
    indexed = [(Path(e.source).name, e.locator) for e in report.entries if e.status == "indexed"]
    assert len(indexed) == len(set(indexed)) == 7
    assert index.count() == 7


def test_a_failing_ingest_stops_its_loader_thread(encoder, tmp_path):
    """When encoding raises, add() raises and its loader thread (blocked on a full queue) ends."""
    import threading

    root = tmp_path / "many"
    root.mkdir()
    for i in range(60):  # far more items than the queue holds
        (root / f"n{i:02d}.md").write_text(f"note number {i}")
    idx = UMEIndex(encoder, tmp_path / "fails", batch_size=2, flush_batches=1)
    before = set(threading.enumerate())

    def broken(*args, **kwargs):
        raise RuntimeError("the model fell over")

    idx._flush = broken
    with pytest.raises(RuntimeError, match="fell over"):
        idx.add([root])
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []
    idx.close()
