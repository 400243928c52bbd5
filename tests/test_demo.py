"""The demo corpus, the cached demo model, examples/demo.py and the example notebook, run for real.

The demo model's quality (every demo query right) is shown by running the demo (README); here
the demo and the notebook run with the tiny random checkpoint, so the test checks that they run
end to end and report what they found truthfully, not that a random model finds things.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ume_train.demo.corpus import QUERIES, write_demo_corpus

ROOT = Path(__file__).resolve().parents[1]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_corpus_is_stable_and_complete(tmp_path):
    corpus = write_demo_corpus(tmp_path / "a")
    first = digest(corpus)
    assert digest(write_demo_corpus(tmp_path / "a")) == first  # a re-run finds the index up to date
    fresh = digest(write_demo_corpus(tmp_path / "b"))
    assert {k: v for k, v in fresh.items() if not k.endswith(".mp4")} == \
        {k: v for k, v in first.items() if not k.endswith(".mp4")}  # fixed by the seed (x264 aside)
    import decord
    import pymupdf

    with pymupdf.open(corpus / "report.pdf") as doc:
        assert doc.page_count == 3 and "figure 2" in doc.load_page(1).get_text()
    assert len(decord.VideoReader(str(corpus / "videos" / "yellow_circle.mp4"))) == 8
    for q in QUERIES:
        assert (corpus / q.expected[0]).is_file()
        if q.image:
            assert (tmp_path / "a" / q.image).is_file()


def test_demo_model_trains_saves_and_is_cached(tmp_path):
    import torch

    from ume_retriever import UMEEncoder
    from ume_train.demo.model import demo_model, train_demo_model

    out = train_demo_model(tmp_path / "m", minutes=0.05, train_per_scene=1, batch_size=8, warmup=0.5)
    meta = json.loads((out / "ume_demo_model.json").read_text())
    assert meta["steps"] >= 1 and meta["modalities"] == ["image", "video", "pdf"]
    assert meta["warmup"] == 0.5  # the schedule it was trained with is recorded
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m-")]  # no temporary folder left
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert demo_model(out) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp  # cached
    enc = UMEEncoder.from_pretrained(out, device="cpu", dtype=torch.float32)
    assert enc.encode("a red circle in the top left").disc.shape == (64,)


@pytest.mark.slow
def test_demo_script_runs_and_reports_truthfully(tmp_path, tiny_ckpt):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--model", str(tiny_ckpt),
                          "--workdir", str(tmp_path / "w"), "--max-new-tokens", "12"], capture_output=True, text=True, env=env, timeout=600)
    out = run.stdout
    assert (tmp_path / "w" / "results.png").is_file(), run.stderr[-2000:]
    found = int(re.search(r"(\d+)/6 queries found", out).group(1))
    assert run.returncode == (0 if found == 6 else 1)
    assert out.count("OK ") + out.count("MISS") >= len(QUERIES)
    assert out.count("OK ") == found
    assert "Loading weights" not in run.stderr + out  # only the demo's own progress lines
    from PIL import Image

    assert Image.open(tmp_path / "w" / "results.png").size[1] > 500  # one row per query


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, tiny_ckpt):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "examples" / "multimodal_document_search.ipynb", as_version=4)
    os.environ["UME_MODEL"] = str(tiny_ckpt)
    os.environ["UME_NOTEBOOK_DIR"] = str(tmp_path / "nb")
    os.environ["UME_MAX_NEW_TOKENS"] = "12"  # the random model never stops on its own
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        del os.environ["UME_MODEL"], os.environ["UME_NOTEBOOK_DIR"], os.environ["UME_MAX_NEW_TOKENS"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert "indexed 11, unchanged 0, failed 0" in text
    assert len(images) >= 5  # text query, image query, disc/gen/fused
    assert "ImageNode" in text and "image query ->" in text
    assert re.search(r"\d/6 at rank 1", text)


def test_demo_model_keeps_the_tokenizer_it_was_measured_with():
    """The demo trains from the synthetic-task spec without the reasoning task's words: the
    same sizes, and the tokenizer of the recipe its figures were measured with."""
    import dataclasses

    from ume_retriever.model.tiny import REASONING_TASK_WORDS, synthetic_task_spec
    from ume_train.demo.model import demo_spec

    spec, task = demo_spec(), synthetic_task_spec(28)
    assert task.tokenizer_words == REASONING_TASK_WORDS and spec.tokenizer_words == ""
    assert dataclasses.replace(spec, tokenizer_words=task.tokenizer_words) == task

