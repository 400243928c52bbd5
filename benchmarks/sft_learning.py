"""Proof that SFT learns: a random tiny UME-R1 model trained on the synthetic shape scenes,
evaluated on a held-out pool of 120 scenes (96 seen combinations + 24 never seen), Hit@1 for
disc and for gen (gen through real greedy generation), against training wall time.

    python benchmarks/sft_learning.py --minutes 10        # the learning curve, plot and JSON
    python benchmarks/sft_learning.py --minutes 2 --eval-every 1

The model is ``ume_retriever.model.tiny.synthetic_task_spec()`` (why it is shaped so: see its
docstring). Training time excludes the evaluations (they are timed and reported separately). The number
learning rate follows a cosine over the training-time budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ume_retriever.model.tiny import build_tiny_checkpoint, synthetic_task_spec  # noqa: E402
from ume_train import SFTConfig, SFTTrainer  # noqa: E402
from ume_train.callbacks import TimeBudget  # noqa: E402
from ume_retriever.inputs.records import read_records  # noqa: E402
from ume_train.data.synthetic import make_dataset  # noqa: E402
from ume_train.evaluation import retrieval_hit_at_1  # noqa: E402

logger = logging.getLogger("sft_learning")


def recent_embedding_reward(trainer) -> float | None:
    """GRPO: the mean embedding reward (both sides) of the latest 5 logged steps; None for SFT."""
    history = [h for h in trainer.state.log_history if "query_reward_embedding" in h][-5:]
    if not history:
        return None
    return sum((h["query_reward_embedding"] + h["target_reward_embedding"]) / 2 for h in history) / len(history)


class TimedEvaluation(TimeBudget):
    """``TimeBudget`` (cosine over training TIME, stop on budget) plus an evaluation every
    ``every_s`` seconds of training time and at the end (evaluations are not counted)."""

    def __init__(self, trainer_ref: list, records, every_s: float, budget_s: float, peak_lr: float,
                 modes: tuple[str, ...] = ("disc", "gen"), warmup: float = 0.03, stop_s: float | None = None):
        super().__init__(budget_s / 60, peak_lr, warmup=warmup, stop_after=stop_s / 60 if stop_s else None)
        self.trainer_ref, self.records, self.every_s, self.modes = trainer_ref, records, every_s, modes
        self.eval_s = 0.0
        self.curve: list[dict] = []
        self._next = every_s

    def on_step_end(self, args, state, control, **kw):
        super().on_step_end(args, state, control, **kw)
        if self.train_s >= self._next or self.done or state.global_step >= state.max_steps:
            self.evaluate(state.global_step)
            self._next += self.every_s

    def evaluate(self, step: int) -> None:
        trainer = self.trainer_ref[0]
        t0 = time.perf_counter()
        model = trainer.inner_model
        model.eval()
        metrics = retrieval_hit_at_1(trainer.encoder, self.records, modes=self.modes)
        reward = recent_embedding_reward(trainer)
        if reward is not None:
            metrics["embedding_reward"] = reward
        model.train()
        self.eval_s += time.perf_counter() - t0
        row = {"minutes": round(self.train_s / 60, 2), "step": step, **{k: round(v, 3) for k, v in metrics.items()}}
        self.curve.append(row)
        logger.info("%s", row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training wall-time budget")
    ap.add_argument("--eval-every", type=float, default=1.0, help="minutes of training between evaluations")
    ap.add_argument("--batch", type=int, default=32, help="pairs per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--image-size", type=int, default=28, help="28: one visual token per image (see the spec)")
    ap.add_argument("--train-per-scene", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-ce-weight", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/results/sft_learning")
    ap.add_argument("--keep", help="save the final checkpoint here")
    ap.add_argument("--stop-after", type=float,
                    help="stop after this many training minutes, mid-schedule (an early checkpoint for GRPO)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "ume_train.sft", "ume_train.data.synthetic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = synthetic_task_spec(args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ckpt = build_tiny_checkpoint(tmp / "init", seed=args.seed, spec=spec)
        data = make_dataset(tmp / "data", image_size=args.image_size, train_per_scene=args.train_per_scene,
                            seed=args.seed)
        train = read_records(data.train).records
        evals = read_records(data.eval, require_reasoning=False).records
        setup_s = time.perf_counter() - t0

        def config(out: str) -> SFTConfig:
            return SFTConfig(
                output_dir=str(tmp / out), model_name_or_path=str(ckpt), per_device_train_batch_size=args.batch,
                max_steps=10**6, learning_rate=args.lr, lr_scheduler_type="constant",  # the callback drives the lr
                freeze_vision_tower=False,  # random backbone: the vision tower must learn too
                cache_tokenized=True, use_cpu=True, save_strategy="no", logging_steps=50, report_to="none",
                seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
                target_ce_weight=args.target_ce_weight,
            )

        trainer_ref: list = []
        timer = TimedEvaluation(trainer_ref, evals, args.eval_every * 60, args.minutes * 60, args.lr,
                                stop_s=args.stop_after * 60 if args.stop_after else None)
        trainer = SFTTrainer(args=config("run"), train_dataset=train, callbacks=[timer])
        dataset = trainer.train_dataset
        t0 = time.perf_counter()
        for i in range(len(dataset)):  # tokenise once, before the clock starts
            dataset[i]
        setup_s += time.perf_counter() - t0
        trainer_ref.append(trainer)
        timer.evaluate(0)
        trainer.train()
        if args.keep:
            trainer.save_model(args.keep)
    result = {
        "setup": {**vars(args), "spec": asdict(spec), "steps": trainer.state.global_step,
                  "train_pairs": len(train), "eval_pool": len(evals), "threads": torch.get_num_threads(),
                  "setup_s": setup_s, "eval_s": timer.eval_s},
        "curve": timer.curve,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(timer.curve, out.with_suffix(".png"), len(evals))
    print(f"\n{'min':>5} {'step':>5} {'disc':>6} {'gen':>6} {'disc seen':>9} {'disc unseen':>11} {'gen seen':>8} {'gen unseen':>10} {'format':>6}")
    for r in timer.curve:
        print(f"{r['minutes']:5.1f} {r['step']:5d} {r['disc_hit1']:6.3f} {r['gen_hit1']:6.3f} {r['disc_hit1_seen']:9.3f} "
              f"{r['disc_hit1_unseen']:11.3f} {r['gen_hit1_seen']:8.3f} {r['gen_hit1_unseen']:10.3f} {r['gen_well_formed']:6.3f}")
    print(f"\npool {len(evals)} candidates (chance {1 / len(evals):.3f}); {trainer.state.global_step} steps; "
          f"evaluations took {timer.eval_s:.0f} s (not counted); wrote {out.with_suffix('.json')} and .png")


def plot(curve: list[dict], path: Path, pool: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    minutes = [r["minutes"] for r in curve]
    for key, style in (("disc_hit1_seen", "b-"), ("disc_hit1_unseen", "b--"), ("gen_hit1_seen", "r-"), ("gen_hit1_unseen", "r--")):
        ax.plot(minutes, [r[key] for r in curve], style, marker="o", label=key.replace("_hit1_", " Hit@1 "))
    ax.axhline(1 / pool, color="gray", lw=0.8, label=f"chance (1/{pool})")
    ax.set_xlabel("training minutes (2-core CPU)")
    ax.set_ylabel("Hit@1")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("UME-R1 SFT on synthetic shape scenes (random tiny Qwen2-VL)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
