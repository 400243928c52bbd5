"""A small UME-R1 model that actually works on the synthetic shape scenes, trained in minutes on a CPU.

The demo (``examples/demo.py``) and the notebook need a model whose search results are right
without a GPU or a download: a random ``synthetic_task_spec()`` Qwen2-VL trained from scratch
with the UME-R1 SFT loss on shape scenes as images, mp4 videos and PDF pages (all through
``SFTTrainer``, the same path as a real run). It is cached: the first call trains (minutes),
later calls return the folder.

    from ume_train.demo.model import demo_model
    path = demo_model()              # ~/.cache/ume/demo-model-v2 (or $UME_CACHE/demo-model-v2)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

VERSION = "v2"  # bump when the recipe changes: a cached model of another recipe is not reused
MODALITIES = ("image", "video", "pdf")


def default_cache() -> Path:
    base = os.environ.get("UME_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ume")
    return Path(base).expanduser() / f"demo-model-{VERSION}"


def demo_model(path: str | os.PathLike | None = None, *, minutes: float = 8.0, retrain: bool = False,
               seed: int = 0) -> Path:
    """The demo checkpoint at ``path`` (default: the cache), trained first if it is not there."""
    path = Path(path) if path is not None else default_cache()
    if (path / "ume_demo_model.json").is_file() and not retrain:
        return path
    train_demo_model(path, minutes=minutes, seed=seed)
    return path


def demo_spec():
    """The random model the demo trains from: the synthetic-task spec at 28 px, with the
    tokenizer the demo recipe was measured with (docs/performance.md), i.e. without the
    reasoning task's words, which the demo's scenes and queries do not use."""
    from ume_retriever.model.tiny import synthetic_task_spec

    return dataclasses.replace(synthetic_task_spec(28), tokenizer_words="")


def train_demo_model(out: str | os.PathLike, *, minutes: float = 8.0, seed: int = 0, lr: float = 2e-3,
                     batch_size: int = 32, train_per_scene: int = 8, warmup: float = 0.2) -> Path:
    """Train from scratch for ``minutes`` of CPU time (linear warmup over the ``warmup``
    fraction, then cosine) and save to ``out``.

    ``warmup`` 0.2, not the paper's 0.03: a random vision tower learns the shape reliably only
    under a long warmup (docs/reasoning.md), and on the demo's evaluation task (docs/evaluation.md)
    it is ahead on every vector and fusion.

    Written to a temporary folder next to ``out`` and renamed at the end: an interrupted run
    never leaves a half model where the cache looks for one.
    """
    import torch
    from transformers import PrinterCallback

    from ume_retriever.inputs.records import read_records
    from ume_retriever.model.tiny import build_tiny_checkpoint

    from ..callbacks import TimeBudget
    from ..config import SFTConfig
    from ..data.synthetic import make_dataset
    from ..sft import SFTTrainer

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        work = Path(tmp)
        init = build_tiny_checkpoint(work / "init", seed=seed, spec=demo_spec())
        data = make_dataset(work / "data", modalities=MODALITIES, image_size=28, train_per_scene=train_per_scene,
                            seed=seed)
        records = read_records(data.train).records
        config = SFTConfig(
            output_dir=str(work / "run"), model_name_or_path=str(init), per_device_train_batch_size=batch_size,
            max_steps=10**6, learning_rate=lr, lr_scheduler_type="constant",  # TimeBudget drives the rate
            freeze_vision_tower=False,  # a random backbone: the vision tower must learn too
            cache_tokenized=True, use_cpu=True, save_strategy="no", logging_steps=50, report_to="none",
            seed=seed, dataloader_num_workers=0, disable_tqdm=True,
        )
        budget = TimeBudget(minutes, lr, warmup=warmup)
        trainer = SFTTrainer(args=config, train_dataset=records, callbacks=[budget, _Progress(budget)])
        trainer.remove_callback(PrinterCallback)  # one readable line per log instead of raw dicts
        logger.info("training the demo model for %.1f minutes on %d pairs (%s)", minutes, len(records),
                    ", ".join(MODALITIES))
        trainer.train()
        final = work / "model"
        trainer.save_model(str(final))
        (final / "ume_demo_model.json").write_text(json.dumps({
            "version": VERSION, "seed": seed, "minutes": minutes, "warmup": warmup, "steps": trainer.state.global_step,
            "train_pairs": len(records), "modalities": list(MODALITIES), "torch_threads": torch.get_num_threads(),
            "wall_s": round(time.perf_counter() - started, 1)}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)
    logger.info("demo model saved to %s (%d steps)", out, trainer.state.global_step)
    return out


class _Progress(TrainerCallback):
    """A readable progress line per trainer log (the demo's output is for people)."""

    def __init__(self, budget):
        self.budget = budget

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            logger.info("demo model: step %d, %.1f of %.1f min, loss %.3f", state.global_step,
                        self.budget.train_s / 60, self.budget.budget_s / 60, logs["loss"])
