"""Independent reference computations and test utilities (no code from ume_retriever's encoder)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"

# Runs that a test compares number for number use this many torch threads, every one of them:
# float reductions are ordered by the thread count, so two runs agree bit for bit only when
# their counts agree (a pytest-xdist worker has 1 thread, a bare subprocess has one per core).
COMPARED_RUN_THREADS = 1

# Written out by hand from shared/UME-R1.md, independently of ume_retriever.model.prompt.
GEN_PROMPT_TEXT = (
    "Represent the above input text, images, videos, or any combination of the three as embeddings. "
    "First output the thinking process in <think> </think> tags and then summarize the entire input "
    "in a word or sentence. Finally, use the <gen_emb> tag to represent the entire input."
)
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_SLOT = "<|vision_start|><|video_pad|><|vision_end|>"


def hand_prompt(text: str, instruction: str = "", num_images: int = 0, num_videos: int = 0) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + IMAGE_SLOT * num_images + VIDEO_SLOT * num_videos
        + f"{instruction}{text}\n<disc_emb>\n{GEN_PROMPT_TEXT}<|im_end|>\n<|im_start|>assistant\n"
    )


def processor_inputs(encoder, text, instruction="", images=None, video=None):
    """The processor run directly on a hand-built prompt (one input, no padding)."""
    images = list(images or [])
    if not images and video is None:
        images = [Image.new("RGB", (28, 28), (255, 255, 255))]
    prompt = hand_prompt(text, instruction, len(images), int(video is not None))
    return encoder.processor(
        text=[prompt], images=images or None, videos=[video] if video is not None else None, return_tensors="pt"
    )


def last_layer(encoder, inputs) -> torch.Tensor:
    """A plain full forward pass of the whole model; the last layer's hidden states (L, H)."""
    with torch.no_grad():
        out = encoder.model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1][0]


def normalise(v: torch.Tensor) -> np.ndarray:
    v = v.double()
    return (v / v.norm()).numpy()


def reference_disc(encoder, text, instruction="", images=None, video=None) -> np.ndarray:
    inputs = processor_inputs(encoder, text, instruction, images, video)
    disc_id = encoder.processor.tokenizer.convert_tokens_to_ids("<disc_emb>")
    pos = (inputs["input_ids"][0] == disc_id).nonzero()[-1, 0]
    return normalise(last_layer(encoder, inputs)[pos])


def reference_state_after(encoder, completion_ids: list[int], text, instruction="", images=None, video=None) -> np.ndarray:
    """Teacher-forced: prompt + completion_ids in one pass, the state at the last token."""
    inputs = dict(processor_inputs(encoder, text, instruction, images, video))
    extra = torch.tensor([completion_ids], dtype=inputs["input_ids"].dtype)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    return normalise(last_layer(encoder, inputs)[-1])


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class ScriptedDecoding(LogitsProcessor):
    """Forces each row to emit a fixed token script, chosen by the row's prompt length.

    Makes a random model produce ``<gen_emb>`` at known steps, so the gen read-out can be
    checked against a teacher-forced pass. After its script a row emits ``end_id``.
    """

    def __init__(self, scripts_by_prompt_len: dict[int, list[int]], pad_id: int, end_id: int):
        self.scripts = scripts_by_prompt_len
        self.pad_id = pad_id
        self.end_id = end_id
        self.row_scripts: list[list[int]] | None = None
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.row_scripts is None:
            lengths = (input_ids != self.pad_id).sum(dim=1).tolist()
            self.row_scripts = [self.scripts[n] for n in lengths]
        forced = torch.full_like(scores, float("-inf"))
        for row, script in enumerate(self.row_scripts):
            token = script[self.step] if self.step < len(script) else self.end_id
            forced[row, token] = 0.0
        self.step += 1
        return forced


def write_mp4(path: Path, num_frames: int = 20, size: tuple[int, int] = (64, 48), fps: int = 10) -> Path:
    """A real H.264 mp4 (PyAV) whose frame i is a flat grey of level 10*i."""
    import av

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"}  # near-lossless: levels survive
        for i in range(num_frames):
            arr = np.full((size[1], size[0], 3), 10 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def recipe_dry_run(command: str, recipe: str, tiny_ckpt, shapes, monkeypatch, capsys) -> dict[str, str]:
    """`ume-train COMMAND --config examples/train/RECIPE --dry-run` on the test data, on CPU;
    the printed plan as {key: value} (asserts that it exited 0)."""
    from ume_train.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # recipes name their launcher files relative to the repo
    code = main([command, "--config", f"examples/train/{recipe}", "--dry-run", "--model_name_or_path", str(tiny_ckpt),
                 "--train_files", str(shapes.train), "--media_root", str(shapes.root), "--use_cpu", "true",
                 "--bf16", "false"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return dict(line.split(None, 1) for line in out.out.strip().splitlines())


def worker_env() -> dict[str, str]:
    """The environment of a compared run in a subprocess: the project importable, offline,
    ``COMPARED_RUN_THREADS`` torch threads (torch and torchrun read OMP_NUM_THREADS)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(COMPARED_RUN_THREADS), "MKL_NUM_THREADS": str(COMPARED_RUN_THREADS)}


def run_worker(script: str, *args: str, nproc: int = 1, cwd: Path | None = None, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``tests/workers/SCRIPT ARGS`` as a compared run: a plain ``python`` process, or ``nproc``
    processes under torchrun (gloo on CPU), always with ``worker_env()``."""
    if nproc == 1:
        launch = [sys.executable, str(WORKERS / script)]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                  "--master_port", str(free_port()), str(WORKERS / script)]
    proc = subprocess.run([*launch, *map(str, args)], env=worker_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@contextmanager
def compared_run_threads() -> Iterator[None]:
    """Run the body of an in-process compared run with ``COMPARED_RUN_THREADS`` torch threads
    (and put the worker's own count back after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(COMPARED_RUN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingEncoder:
    """A real encoder, counting how often it is asked to encode (to see cache hits)."""

    def __init__(self, encoder):
        self.inner, self.calls = encoder, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.inner.encode(*args, **kwargs)


def run_in_threads(fn, threads: int) -> list:
    """``fn(i)`` in ``threads`` threads started together; each result, or the exception it raised."""
    import threading

    barrier = threading.Barrier(threads)
    got: list = [None] * threads

    def run(i: int) -> None:
        barrier.wait()
        try:
            got[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - returned to the test, which asserts on it
            got[i] = exc

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return got


def make_pdf(path: Path, texts: list[str]) -> Path:
    """A real PDF (pymupdf) with one small page per text."""
    import pymupdf

    doc = pymupdf.open()
    for text in texts:
        page = doc.new_page(width=200, height=260)
        page.insert_text((20, 40), text, fontsize=12)
    doc.save(str(path))
    return path
