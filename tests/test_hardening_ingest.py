"""Ingest hardening (issue 14): no bad file or option stops an ingest, loses data or is skipped
silently. Each test is named after its case; real files, real decoders, the real Qdrant Edge store."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pymupdf
import pytest
import torch

from helpers import write_mp4
from ume_retriever import Item, UMEIndex
from ume_retriever.inputs.loaders import MIN_CLIP_SECONDS, FileLoadError, LoaderConfig, clip_bounds


def _pdf(path: Path, texts: list[str]) -> Path:
    doc = pymupdf.open()
    for text in texts:
        doc.new_page(width=200, height=260).insert_text((20, 40), text, fontsize=12)
    doc.save(str(path))
    return path


def _by_name(report) -> dict[str, tuple[str, str | None]]:
    return {os.fsencode(e.source).rsplit(b"/", 1)[-1].decode("utf-8", "replace") + (f"#{e.locator}" if e.locator else ""):
            (e.status, e.reason) for e in report.entries}


@pytest.fixture()
def index(encoder, tmp_path):
    idx = UMEIndex(encoder, tmp_path / "store", vectors=("disc",))
    yield idx
    idx.close()


def _stored(idx, **flt) -> dict[str, dict]:
    return {pid: p for pid, p in idx.store.scroll({"kind": "item", **flt}, ["source", "locator", "text",
                                                                           "text_truncated"])}


def test_a_file_with_a_non_utf8_name_is_a_failed_entry_and_every_other_file_is_indexed(index, tmp_path):
    folder = tmp_path / "names"
    folder.mkdir()
    (folder / "a.txt").write_text("first file")
    fd = os.open(os.fsencode(folder) + b"/b-\xff\xfe.txt", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"a file whose name is not UTF-8")
    os.close(fd)
    (folder / "z.txt").write_text("last file")
    report = index.add(folder)
    names = _by_name(report)
    assert names["a.txt"][0] == names["z.txt"][0] == "indexed"
    bad = [e for e in report.failed]
    assert len(bad) == 1 and "not valid UTF-8" in bad[0].reason and "\ufffd" in bad[0].source
    assert index.count() == 2


class _StoreFailingFor:
    """The real Edge store, except that reading one source's manifest raises (a store error)."""

    def __init__(self, store, source_name: str):
        self._store, self._name = store, source_name

    def scroll(self, flt, fields):
        if flt and str(flt.get("source", "")).endswith(self._name) and flt.get("kind") == "manifest":
            raise RuntimeError("connection reset by the store")
        return self._store.scroll(flt, fields)

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_an_unexpected_error_while_loading_one_file_fails_that_file_only(encoder, tmp_path):
    from ume_retriever.store import StoreSchema, open_store

    folder = tmp_path / "three"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (folder / name).write_text(f"the file {name}")
    schema = StoreSchema(vector_size=encoder.embedding_dim, model=encoder.name_or_path)
    store = _StoreFailingFor(open_store(schema, tmp_path / "store"), "b.txt")
    idx = UMEIndex(encoder, store, vectors=("disc",))
    report = idx.add(folder)
    names = _by_name(report)
    assert names["a.txt"][0] == names["c.txt"][0] == "indexed"
    assert names["b.txt"] == ("failed", "unexpected RuntimeError while loading: connection reset by the store")
    idx.close()


def test_chunk_chars_100_adapts_the_overlap_and_impossible_settings_are_refused(index, tmp_path, tiny_ckpt):
    config = LoaderConfig(text_chunk_chars=100)
    assert config.text_chunk_overlap == 20 and LoaderConfig().text_chunk_overlap == 200
    assert LoaderConfig(text_chunk_chars=5000).text_chunk_overlap == 200
    text = tmp_path / "long.txt"
    text.write_text(" ".join(f"word{i}" for i in range(120)))
    index.loader = config
    report = index.add(text)
    assert not report.failed and len(report.indexed) > 5
    for bad, field in ((dict(text_chunk_chars=100, text_chunk_overlap=100), "text_chunk_overlap"),
                       (dict(text_chunk_chars=0), "text_chunk_chars"), (dict(text_chunk_chars=-5), "text_chunk_chars"),
                       (dict(text_chunk_overlap=-1), "text_chunk_overlap"), (dict(pdf_dpi=0), "pdf_dpi"),
                       (dict(pdf_max_pixels=10), "pdf_max_pixels")):
        with pytest.raises(ValueError, match=field):
            LoaderConfig(**bad)
    # the command refuses it in one line, before any model is loaded
    proc = subprocess.run([Path(sys.executable).with_name("ume"), "index", str(text), "--store", str(tmp_path / "s"),
                           "--model", "/nonexistent-model", "--chunk-chars", "0"], capture_output=True, text=True)
    assert proc.returncode == 1 and "text_chunk_chars must be > 0" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("seconds", [-1.0, 0.0, 0.01, MIN_CLIP_SECONDS / 2, float("nan"), float("inf")])
def test_negative_or_tiny_video_clip_seconds_are_refused_at_construction(seconds):
    with pytest.raises(ValueError, match="video_clip_seconds must be at least"):
        LoaderConfig(video_clip_seconds=seconds)


def _zero_frame_mp4(path: Path) -> Path:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # headers written, no frame ever
    return path


def test_a_video_with_nan_fps_or_zero_duration_is_a_failed_entry_and_keeps_its_old_points(index, tmp_path):
    for duration in (float("nan"), 0.0, -1.0, float("inf")):
        with pytest.raises(FileLoadError, match="video duration"):
            clip_bounds(duration, None)
    assert clip_bounds(2.0, 0.5) == [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5), (1.5, 2.0)]
    video = write_mp4(tmp_path / "v.mp4", num_frames=10)
    assert [e.status for e in index.add(video).entries] == ["indexed"]
    before = _stored(index)
    _zero_frame_mp4(video)  # the same file, now a video of zero frames
    report = index.add(video)
    assert [e.status for e in report.entries] == ["failed"]
    assert report.failed[0].reason in ("no video stream", "video has zero frames (zero duration)")
    assert _stored(index) == before  # not deleted as stale: the last good version stays searchable


CRASHING_CHILD = """
import sys, os
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from ume_retriever import UMEEncoder, UMEIndex
enc = UMEEncoder.from_pretrained(sys.argv[1], device="cpu", dtype=torch.float32, max_new_tokens=4)
idx = UMEIndex(enc, sys.argv[2], vectors=("disc",))
report = idx.add([sys.argv[3]], retry_quarantined=sys.argv[4] == "retry")
print("REPORT", [(os.path.basename(e.source), e.status, e.reason) for e in report.entries], flush=True)
"""


def test_a_file_that_crashed_the_decoder_twice_is_quarantined_on_the_next_run(tiny_ckpt, tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    write_mp4(folder / "crash.mp4", num_frames=10)
    (folder / "note.txt").write_text("a note")
    script = tmp_path / "child.py"
    script.write_text(CRASHING_CHILD)

    def run(mode: str, fault: str | None):
        env = {k: v for k, v in os.environ.items() if k != "UME_FAULT"}
        if fault:
            env["UME_FAULT"] = fault
        return subprocess.run([sys.executable, str(script), str(tiny_ckpt), str(tmp_path / "store"), str(folder), mode],
                              env=env, capture_output=True, text=True, timeout=300)

    crashed = run("plain", "inside_video_decode:1:abort")  # the decoder aborts the process (SIGABRT)
    assert crashed.returncode == -signal.SIGABRT, crashed.stderr[-2000:]
    journal = json.loads((tmp_path / "store" / "ume" / "ingest_journal.json").read_text())
    assert list(journal["decoding"]) == [str(folder / "crash.mp4")]
    # one death may be a kill -9 or another thread's crash: the file is tried once more
    crashed = run("plain", "inside_video_decode:1:abort")
    assert crashed.returncode == -signal.SIGABRT, crashed.stderr[-2000:]
    again = run("plain", "inside_video_decode:1:abort")  # it would crash again: it must not be opened
    assert again.returncode == 0, again.stderr[-2000:]
    entries = {name: (status, reason) for name, status, reason in eval(again.stdout.split("REPORT", 1)[1])}
    assert entries["note.txt"][0] == "indexed"
    assert entries["crash.mp4"][0] == "failed" and "quarantined" in entries["crash.mp4"][1]
    assert "retry_quarantined=True" in entries["crash.mp4"][1] and "2 ingests died while decoding it" in entries["crash.mp4"][1]
    retried = run("retry", None)  # the caller asks to retry (here the decoder no longer crashes)
    entries = {name: status for name, status, _ in eval(retried.stdout.split("REPORT", 1)[1])}
    assert entries["crash.mp4"] == "indexed" and entries["note.txt"] == "unchanged"


def test_a_giant_resolution_video_is_decoded_within_the_cap(tmp_path):
    from ume_retriever.inputs.media import load_video

    video = write_mp4(tmp_path / "big.mp4", num_frames=3, size=(1920, 1088))
    cap = 96 * 64
    tracemalloc.start()
    frames = load_video(video, num_frames=2, max_decode_pixels=cap)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert all(f.width * f.height <= cap for f in frames) and len(frames) == 2
    assert abs(frames[0].width / frames[0].height - 1920 / 1088) < 0.05  # aspect kept
    assert peak < 1920 * 1088 * 3 / 2  # never a full-size RGB frame in Python memory (one is 6.3 MB)


@pytest.mark.parametrize("data", [b"\x00" * 64, b"PK\x03\x04\x14\x00\x00\x00binary zip bytes", b"text then \x00 a NUL"])
def test_a_binary_or_nul_text_file_is_refused_as_not_text(index, tmp_path, data):
    path = tmp_path / "data.txt"
    path.write_bytes(data)
    report = index.add(path)
    assert [e.status for e in report.entries] == ["failed"] and report.failed[0].reason.startswith("not text")
    assert index.count() == 0


def test_a_symlink_out_of_the_folder_is_skipped_unless_followed_and_special_files_are_never_opened(encoder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside the indexed folder")
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "inside.txt").write_text("inside")
    os.symlink(outside / "secret.txt", folder / "link-out.txt")
    os.symlink(folder / "inside.txt", folder / "sub" / "link-in.txt")  # inside the folder: followed
    os.mkfifo(folder / "pipe.txt")
    idx = UMEIndex(encoder, tmp_path / "store", vectors=("disc",))
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(folder=idx.add(folder), direct=idx.add(folder / "pipe.txt")))
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the ingest hung on a FIFO"
    names = _by_name(result["folder"])
    assert names["inside.txt"][0] == names["link-in.txt"][0] == "indexed"
    assert names["link-out.txt"][0] == "skipped" and "not followed" in names["link-out.txt"][1]
    assert names["pipe.txt"] == ("skipped", "a FIFO (named pipe), not a regular file: never opened")
    assert _by_name(result["direct"])["pipe.txt"][0] == "skipped"
    assert not any("outside" in (p.get("text") or "") for p in _stored(idx).values())
    idx.close()
    followed = UMEIndex(encoder, tmp_path / "store2", vectors=("disc",), loader=LoaderConfig(follow_symlinks=True))
    assert _by_name(followed.add(folder))["link-out.txt"][0] == "indexed"
    followed.close()


def test_a_huge_text_is_capped_in_the_payload_and_upserts_are_cut_by_bytes(encoder, tmp_path, monkeypatch):
    import ume_retriever.index as index_module
    import ume_retriever.ingest_points as ingest_points

    big = tmp_path / "big.txt"
    big.write_text("lorem ipsum " * 2_000)  # 24,000 characters, over MAX_PAYLOAD_TEXT_CHARS; chunking off
    idx = UMEIndex(encoder, tmp_path / "store", vectors=("disc",))
    sizes: list[int] = []
    upsert = idx.store.upsert

    def measured(points):  # the request size as JSON, computed independently of the index's estimate
        sizes.append(len(json.dumps([{"id": p.id, "vector": {k: np.asarray(v).tolist() for k, v in p.vectors.items()},
                                      "payload": p.payload} for p in points], default=str)))
        upsert(points)

    idx.store.upsert = measured
    monkeypatch.setattr(ingest_points, "MAX_UPSERT_BYTES", 6_000)  # read by upsert_batches
    report = idx.add([big] + [tmp_path / f"t{i}.txt" for i in range(6) if (tmp_path / f"t{i}.txt").write_text(
        f"small text {i} " * 20)])
    assert not report.failed and len(report.indexed) == 7
    (payload,) = [p for p in _stored(idx).values() if p["source"] == str(big)]
    assert len(payload["text"]) == index_module.MAX_PAYLOAD_TEXT_CHARS and payload["text_truncated"] is True
    assert len(sizes) > 2 and max(sizes) <= 6_000 + len(payload["text"]) * 2  # one point may be alone above the cap
    assert sum(1 for s in sizes if s > 6_000) <= 1
    idx.close()


def test_prune_deletes_the_points_of_files_that_no_longer_exist(index, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    for name in ("keep.txt", "gone.txt"):
        (folder / name).write_text(f"the file {name}")
    _pdf(folder / "gone.pdf", ["a page", "another page"])
    index.add(folder)
    assert index.count() == 4
    (folder / "gone.txt").unlink()
    (folder / "gone.pdf").rename(tmp_path / "moved-away.pdf")
    assert index.add(folder).removed == [] and index.count() == 4  # without prune: kept
    report = index.add(folder, prune=True)
    removed = sorted((Path(e.source).name, e.reason) for e in report.removed)
    assert removed == [("gone.pdf", "file no longer exists (2 items deleted)"),
                       ("gone.txt", "file no longer exists (1 items deleted)")]
    assert {Path(p["source"]).name for p in _stored(index).values()} == {"keep.txt"}
    assert index.store.count({"kind": "manifest"}) == 1


def test_changed_loader_or_encoder_settings_reindex_the_file(encoder, tmp_path):
    from ume_retriever import UMEEncoder

    note = tmp_path / "note.txt"
    note.write_text(" ".join(f"word{i}" for i in range(60)))
    idx = UMEIndex(encoder, tmp_path / "store", vectors=("disc", "gen"))
    assert [e.status for e in idx.add(note).entries] == ["indexed"]
    assert [e.status for e in idx.add(note).entries] == ["unchanged"]
    idx.loader = LoaderConfig(text_chunk_chars=100, pdf_max_pixels=idx.loader.pdf_max_pixels)
    report = idx.add(note)  # the same file, cut into chunks now
    assert {e.status for e in report.entries} == {"indexed"} and len(report.entries) > 2
    assert report.deleted_stale == 1 and idx.count() == len(report.entries)
    chunks = set(_stored(idx))
    idx.close()
    longer = UMEEncoder(encoder.model, encoder.processor, name_or_path=encoder.name_or_path,
                        max_new_tokens=encoder.max_new_tokens + 5)  # other gen vectors
    idx = UMEIndex(longer, tmp_path / "store", vectors=("disc", "gen"), loader=LoaderConfig(text_chunk_chars=100))
    again = idx.add(note)
    assert {e.status for e in again.entries} == {"indexed"} and again.deleted_stale == len(chunks)
    assert set(_stored(idx)).isdisjoint(chunks) and idx.count() == len(chunks)
    idx.close()


def test_a_changed_file_that_now_fails_keeps_its_last_good_version_marked_stale(index, tmp_path, capsys):
    from ume_retriever.cli import main

    note = tmp_path / "note.txt"
    note.write_text("the good version of the note")
    index.add(note)
    note.write_bytes(b"\x00\x01binary now")
    report = index.add(note)
    assert report.failed[0].reason.startswith("not text")
    hits = index.search("note", k=3, fusion="disc")
    assert [h.payload["text"] for h in hits] == ["the good version of the note"]
    (manifest,) = [p for _, p in index.store.scroll({"kind": "manifest"}, ["last_error"])]
    assert manifest["last_error"].startswith("not text")
    location = index.store.location
    index.close()
    assert main(["info", "--store", str(Path(location).parent), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert list(info["stale_sources"]) == [str(note)] and info["stale_sources"][str(note)].startswith("not text")
    note.write_text("the good version of the note")  # restored: unchanged, and no longer stale
    restored = UMEIndex(index.encoder, Path(location).parent, vectors=("disc",))
    assert [e.status for e in restored.add(note).entries] == ["unchanged"]
    restored.close()
    assert main(["info", "--store", str(Path(location).parent), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stale_sources"] == {}


def test_nan_vectors_fail_the_item_and_a_nan_query_raises(encoder, tmp_path):
    from ume_retriever import UMEEncoder

    broken_model = copy.deepcopy(encoder.model)
    with torch.no_grad():
        broken_model.model.language_model.norm.weight.fill_(float("nan"))  # as an fp16 overflow leaves it
    broken = UMEEncoder(broken_model, encoder.processor, name_or_path=encoder.name_or_path, max_new_tokens=4)
    idx = UMEIndex(broken, tmp_path / "store", vectors=("disc",))
    good = UMEIndex(encoder, tmp_path / "store2", vectors=("disc",))
    items = [Item(text="a red circle"), Item(text="a blue square")]
    report = idx.add(items)
    assert [e.status for e in report.entries] == ["failed", "failed"]
    assert all(e.reason == "the model gave a non-finite (NaN/inf) disc vector" for e in report.entries)
    assert idx.count() == 0
    good.add(items)
    good.encoder = broken
    with pytest.raises(ValueError, match="non-finite \\(NaN/inf\\) disc vector for the query"):
        good.search("a red circle", fusion="disc")
    idx.close()
    good.close()


def test_a_large_ingest_leaves_the_store_searchable_at_hnsw_speed(encoder, tmp_path, monkeypatch):
    """A call that writes OPTIMIZE_AFTER_POINTS points or more builds the store's vector indexes
    (Qdrant Edge's optimize, on the real store); a small one does not. The speed itself is
    measured in benchmarks/hnsw_after_ingest.py (docs/performance.md)."""
    import ume_retriever.index as index_module

    monkeypatch.setattr(index_module, "OPTIMIZE_AFTER_POINTS", 5)
    idx = UMEIndex(encoder, tmp_path / "store", vectors=("disc",))
    calls: list[int] = []
    optimize = idx.store.optimize
    idx.store.optimize = lambda: (calls.append(idx.count()), optimize())
    small = idx.add([Item(text=f"text {i}") for i in range(3)])
    large = idx.add([Item(text=f"more text {i}") for i in range(6)])
    assert (small.optimized, large.optimized) == (False, True) and calls == [9]  # after the points were in
    assert idx.add([Item(text="one more")], optimize=True).optimized is True and calls == [9, 10]
    assert idx.add([Item(text=f"even more {i}") for i in range(6)], optimize=False).optimized is False and calls == [9, 10]
    idx.close()


@pytest.mark.parametrize("size", [(14400, 300), (300, 14400), (5000, 5000), (201, 199)])
def test_a_pdf_page_is_rendered_within_the_pixel_cap_whatever_its_shape(tmp_path, size):
    from ume_retriever.inputs.loaders import render_pdf_page

    doc = pymupdf.open()
    doc.new_page(width=size[0], height=size[1])
    doc.save(str(tmp_path / "p.pdf"))
    cap = 112 * 112
    image = render_pdf_page(tmp_path / "p.pdf", 1, 144, cap)
    assert image.width * image.height <= cap  # pymupdf's outward rounding included
    assert image.width * image.height >= 0.9 * cap  # and not far below it


def test_two_ingests_at_once_each_journal_their_decodes_and_none_outlives_its_ingest(tmp_path):
    from ume_retriever.ingest_journal import IngestJournal
    from ume_retriever.inputs import decode_guard

    a, b = IngestJournal(tmp_path / "a.json"), IngestJournal(tmp_path / "b.json")
    first, second = decode_guard.watching(a), decode_guard.watching(b)
    first.__enter__()
    second.__enter__()
    with decode_guard.decoding(tmp_path / "x.mp4"):
        seen = (dict(a.decoding), dict(b.decoding))
    first.__exit__(None, None, None)  # the first ingest ends while the second still runs
    with decode_guard.decoding(tmp_path / "y.pdf"):
        during = (dict(a.decoding), dict(b.decoding))
    second.__exit__(None, None, None)
    assert [list(j) for j in seen] == [[str(tmp_path / "x.mp4")]] * 2
    assert during == ({}, {str(tmp_path / "y.pdf"): during[1][str(tmp_path / "y.pdf")]})
    assert decode_guard._watchers == [] and a.decoding == b.decoding == {}
