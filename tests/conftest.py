"""Shared fixtures: a tiny UME-R1 checkpoint built offline, an encoder over it, real media files."""

from __future__ import annotations

import os

# Tests never touch a hub: set before transformers is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one torch thread each
    import torch

    torch.set_num_threads(1)

from helpers import write_mp4


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from ume_retriever.model.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ume", seed=0)


@pytest.fixture(scope="session")
def encoder(tiny_ckpt):
    import torch

    from ume_retriever import UMEEncoder

    torch.manual_seed(0)
    return UMEEncoder.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, batch_size=4, max_new_tokens=12)


@pytest.fixture(scope="session")
def mp4_path(tmp_path_factory) -> Path:
    """A real 20-frame mp4 whose frame i has brightness 10*i (so sampling can be checked)."""
    return write_mp4(tmp_path_factory.mktemp("video") / "ramp.mp4", num_frames=20)


def pytest_collection_modifyitems(config, items):
    """Start the slow tests (marked ``slow``) first. xdist hands out at most two tests at a
    time (``--maxschedchunk 2`` in pyproject), so the slow ones spread over both workers and
    overlap with the many short ones instead of finishing the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
