"""Scale-out indexing on Ray Data: a local Ray instance per ingest, two encoder actors, and the
store compared with what the in-process ``add`` writes for the same corpus."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_pdf, worker_env, write_mp4
from ume_retriever import Item, UMEEncoder, UMEIndex

# One Ray instance at a time on these two cores: with the service tests, on one xdist worker.
pytestmark = [pytest.mark.xdist_group("serve"), pytest.mark.slow]

MEMORY = [Item(text="a note kept in memory", metadata={"source": "db://1"}),
          Item(image=Image.new("RGB", (40, 40), "green"), metadata={"source": "db://2"})]
VOLATILE = {"ingested_at"}  # the only payload field that differs between two ingests


def make_corpus(folder: Path, broken: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_pdf(folder / "report.pdf", ["alpha page about rivers", "second page on mountains", "third page: deserts"])
    for name, colour in (("red.png", (220, 20, 20)), ("blue.png", (20, 20, 220)), ("grey.jpg", (128, 128, 128))):
        Image.new("RGB", (64, 48), colour).save(folder / name)
    (folder / "notes").mkdir(exist_ok=True)
    (folder / "notes" / "cats.txt").write_text("cats sleep most of the day")
    (folder / "notes" / "dogs.md").write_text("# dogs\n\ndogs like long walks")
    write_mp4(folder / "clip.mp4", num_frames=12)
    if broken:
        (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
        (folder / "empty.txt").write_bytes(b"")
    return folder


def stored(index: UMEIndex) -> dict[str, dict]:
    """Every point (items and manifests): id -> payload (less ``ingested_at``) and vectors."""
    ids = [pid for pid, _ in index.store.scroll(None, [])]
    if hasattr(index.store, "_shard"):  # Qdrant Edge
        records = index.store._shard.retrieve(ids, with_payload=True, with_vector=True)
    else:  # a Qdrant server
        records = index.store.client.retrieve(index.store.collection, ids, with_payload=True, with_vectors=True)
    return {str(r.id): {"payload": {k: v for k, v in dict(r.payload).items() if k not in VOLATILE},
                        **{k: np.asarray(v) for k, v in (r.vector or {}).items()}} for r in records}


def assert_same_store(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert sorted(got) == sorted(want)
    for pid, point in want.items():
        assert got[pid]["payload"] == point["payload"], pid
        assert sorted(k for k in got[pid] if k != "payload") == sorted(k for k in point if k != "payload"), pid
        for name in ("disc", "gen"):
            if name in point:
                np.testing.assert_allclose(got[pid][name], point[name], atol=1e-5, err_msg=f"{pid} {name}")


def entries(report) -> list[tuple]:
    return sorted((e.source, e.locator, e.status, e.reason or "") for e in report.entries)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("ray") / "docs")


@pytest.fixture(scope="module")
def reference(encoder, corpus, tmp_path_factory):
    """What the in-process ``add`` stores and reports for the corpus."""
    with UMEIndex(encoder, tmp_path_factory.mktemp("ray-ref") / "store", flush_batches=1) as index:
        report = index.add([corpus, *MEMORY])
        return stored(index), report


def test_two_encoder_actors_store_exactly_what_in_process_add_stores(encoder, corpus, reference, tmp_path):
    want, want_report = reference
    assert len(want_report.indexed) == 3 + 3 + 2 + 1 + 2 and len(want_report.failed) == 2
    with UMEIndex(encoder, tmp_path / "store", flush_batches=1) as index:
        report = index.add([corpus, *MEMORY], ray="local", encoders=2)
        assert entries(report) == entries(want_report)  # failures with the same reasons
        assert_same_store(stored(index), want)
        again = index.add([corpus, *MEMORY], ray="local", encoders=2)
    assert not again.indexed and len(again.unchanged) == len(want_report.indexed)
    assert sorted(e.source for e in again.failed) == sorted(e.source for e in want_report.failed)


def test_a_killed_encoder_actor_and_a_crashing_decoder_lose_nothing_else(encoder, corpus, reference, tmp_path,
                                                                        monkeypatch):
    want, _ = reference
    once = tmp_path / "once"
    once.mkdir()
    # an encoder actor dies at its second batch (once: Ray restarts it and retries the batch);
    # the video decoder aborts its load task every time (Ray retries it, then gives up on it)
    monkeypatch.setenv("UME_FAULT", "ray_encoder_batch:2:kill-once,inside_video_decode:1:abort")
    monkeypatch.setenv("UME_FAULT_ONCE_DIR", str(once))
    with UMEIndex(encoder, tmp_path / "store", flush_batches=1) as index:
        report = index.add([corpus, *MEMORY], ray="local", encoders=2)
        got = stored(index)
    assert (once / "ray_encoder_batch").exists()  # the actor was killed
    video = str(corpus / "clip.mp4")
    failed = {e.source: e.reason for e in report.failed}
    assert set(failed) == {video, str(corpus / "broken.pdf"), str(corpus / "empty.txt")}
    assert failed[video].startswith("lost in the Ray pipeline")
    assert_same_store(got, {pid: p for pid, p in want.items() if p["payload"].get("source") != video})
    assert len(report.indexed) == len({e.id for e in report.indexed})  # nothing twice


def test_ume_index_on_ray_killed_with_sigkill_then_run_again_ends_as_an_uninterrupted_run(tiny_ckpt, tmp_path):
    corpus = make_corpus(tmp_path / "docs", broken=False)
    store = tmp_path / "store"
    command = [sys.executable, "-m", "ume_retriever.cli", "index", str(corpus), "--store", str(store),
               "--model", str(tiny_ckpt), "--device", "cpu", "--batch-size", "2", "--max-new-tokens", "12",
               "--ray", "local", "--encoders", "2", "--json"]
    env = {**worker_env(), "UME_FAULT": "after_item_upsert:1"}  # the driver dies after its first write
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    encoder = UMEEncoder.from_pretrained(tiny_ckpt, device="cpu", batch_size=2, max_new_tokens=12)
    with UMEIndex(encoder, store) as index:
        partial = stored(index)
    kinds = [p["payload"]["kind"] for p in partial.values()]
    assert kinds.count("item") > 0 and kinds.count("manifest") < 9  # killed between its points and manifests

    rerun = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out = json.loads(rerun.stdout)
    statuses = [e["status"] for e in out["entries"]]
    assert statuses.count("indexed") + statuses.count("unchanged") == 9 and statuses.count("unchanged") >= 1
    assert out["points"] == 9
    with UMEIndex(encoder, tmp_path / "uninterrupted") as ref:
        ref.add(corpus)
        want = stored(ref)
    with UMEIndex(encoder, store) as index:
        assert_same_store(stored(index), want)


def test_gen_later_on_ray_then_backfill_on_ray_gives_the_gen_now_vectors(encoder, corpus, reference, tmp_path):
    want, _ = reference
    with UMEIndex(encoder, tmp_path / "store", flush_batches=1) as index:
        report = index.add([corpus, *MEMORY], gen="later", ray="local", encoders=2)
        # every item but the in-memory image waits for its gen vector (that one cannot be read again)
        assert report.gen_pending == len(report.indexed) - 1 == index.pending_gen()
        assert [e.source for e in report.gen_now] == ["db://2"]
        filled = index.backfill_gen(ray="local", encoders=2)
        assert (filled.filled, filled.remaining, filled.failed, filled.changed) == (report.gen_pending, 0, [], [])
        got = stored(index)
    assert sorted(got) == sorted(want)
    for pid, point in want.items():
        if point["payload"]["kind"] != "item":
            continue
        for name in ("disc", "gen"):
            np.testing.assert_allclose(got[pid][name], point[name], atol=1e-5, err_msg=f"{pid} {name}")
        assert got[pid]["payload"]["reasoning"] == point["payload"]["reasoning"]
        assert got[pid]["payload"].get("gen_status") is None


def test_encoder_actors_write_straight_to_a_qdrant_server(encoder, corpus, reference):
    url = os.environ.get("QDRANT_URL")
    if not url:
        pytest.skip("QDRANT_URL is not set: no Qdrant server here, the Ray server sink is not tested")
    want, want_report = reference
    collection = f"ume_ray_{os.getpid()}_{threading.get_ident()}"
    with UMEIndex(encoder, url=url, api_key=os.environ.get("QDRANT_API_KEY"), collection=collection,
                  flush_batches=1) as index:
        try:
            report = index.add([corpus, *MEMORY], ray="local", encoders=2)
            assert entries(report) == entries(want_report)
            assert_same_store(stored(index), want)
        finally:
            index.store.client.delete_collection(collection)


def test_add_on_ray_refuses_what_it_cannot_do(encoder, tmp_path):
    built = UMEEncoder(encoder.model, encoder.processor, name_or_path=encoder.name_or_path, batch_size=4,
                       max_new_tokens=12)
    with UMEIndex(built, tmp_path / "store") as index:
        with pytest.raises(ValueError, match="UMEEncoder.from_pretrained"):
            index.add(["a"], ray="local")
    with UMEIndex(encoder, tmp_path / "store2") as index:
        with pytest.raises(ValueError, match="encoders must be an integer >= 1"):
            index.add(["a"], ray="local", encoders=0)
        with pytest.raises(ValueError, match="options of add\\(ray=...\\)"):
            index.add(["a"], encoders=2)
        with pytest.raises(ValueError, match="stop= is not supported with ray="):
            index.backfill_gen(ray="local", stop=threading.Event())
