"""Does reasoning pay on inputs the model never saw? A random tiny UME-R1 model trained with SFT
(then optionally GRPO) on ``ume_train.data.reasoning_task``, evaluated per held-out split as
curves over training minutes: disc / gen / RRF / oracle Hit@1 and the generated answers'
accuracy per side and attribute; at the end also gen with the gold reasoning scripted in, and
the adaptive router's calibration curve (how much reasoning buys how much Hit@1).

    python benchmarks/reasoning_generalisation.py --minutes 10                 # the recipe's defaults
    python benchmarks/reasoning_generalisation.py --vocabulary other --minutes 10
    python benchmarks/reasoning_generalisation.py --image-pixels 28 --vision-depth 1 --vision-width 64   # the old budget

Training time excludes the evaluations (timed and reported apart). The learning rate is a
cosine over the training-time budget (``ume_train.callbacks.TimeBudget``).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ume_retriever.inputs.records import read_records  # noqa: E402
from ume_retriever.model.tiny import build_tiny_checkpoint, synthetic_task_spec  # noqa: E402
from ume_train import SFTConfig, SFTTrainer  # noqa: E402
from sft_learning import TimedEvaluation, recent_embedding_reward  # noqa: E402
from ume_train.data.reasoning_task import SPLITS, VOCABULARIES, make_reasoning_task  # noqa: E402
from ume_train.reasoning_eval import adaptive_curve, split_report  # noqa: E402

logger = logging.getLogger("reasoning_generalisation")
METHODS = ("disc", "gen", "rrf", "oracle")


class SplitCurve(TimedEvaluation):
    """``sft_learning``'s timed evaluation (cosine over training time, an evaluation every
    ``every_s`` seconds and at the end), evaluating with the split report."""

    def __init__(self, trainer_ref: list, records, vocab, every_s: float, budget_s: float, peak_lr: float,
                 offset_s: float = 0.0, stage: str = "sft", warmup: float = 0.03):
        super().__init__(trainer_ref, records, every_s, budget_s, peak_lr, warmup=warmup)
        self.vocab, self.offset_s, self.stage = vocab, offset_s, stage

    def evaluate(self, step: int, gold: bool = False) -> dict:
        trainer = self.trainer_ref[0]
        t0 = time.perf_counter()
        model = trainer.inner_model
        model.eval()
        report = split_report(trainer.encoder, self.records, self.vocab, gold=gold)
        model.train()
        self.eval_s += time.perf_counter() - t0
        row = {"stage": self.stage, "minutes": round((self.offset_s + self.train_s) / 60, 2), "step": step,
               **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in report.items() if k != "per_query"}}
        reward = recent_embedding_reward(trainer)
        if reward is not None:
            row["embedding_reward"] = round(reward, 3)
        self.curve.append(row)
        logger.info("%s min %.1f step %d: all disc %.3f gen %.3f rrf %.3f | unseen gen %.3f | inference disc %.3f "
                    "gen %.3f | image answer seen %.2f unseen %.2f", self.stage, row["minutes"], step,
                    row["all_disc"], row["all_gen"], row["all_rrf"], row["unseen_gen"], row["inference_disc"],
                    row["inference_gen"], row["image_answer_seen_all"], row["image_answer_unseen_all"])
        return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabulary", choices=sorted(VOCABULARIES), default="base")
    ap.add_argument("--minutes", type=float, default=10.0, help="SFT training-time budget")
    ap.add_argument("--eval-every", type=float, default=2.5, help="minutes of training between evaluations")
    ap.add_argument("--batch", type=int, default=32, help="pairs per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vision-lr", type=float, default=None, help="the vision module's peak lr (default: --lr)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--warmup", type=float, default=0.2,
                    help="share of the SFT minutes the lr warms up over (0.03, the paper's, lets the shape be "
                         "learnt late or never on 2 seeds in 3: docs/reasoning.md)")
    defaults = synthetic_task_spec()
    ap.add_argument("--image-pixels", type=int, default=defaults.image_side,
                    help="side of the square the model sees (28: 1 visual token, 56: 4)")
    ap.add_argument("--patch-size", type=int, default=defaults.patch_size, help="a token covers (2*patch)^2 pixels")
    ap.add_argument("--vision-depth", type=int, default=defaults.vision_depth)
    ap.add_argument("--vision-width", type=int, default=defaults.vision_embed_dim)
    ap.add_argument("--text-layers", type=int, default=defaults.num_hidden_layers, help="language model layers")
    ap.add_argument("--text-width", type=int, default=defaults.hidden_size, help="language model width")
    ap.add_argument("--render-size", type=int, default=112, help="pixels the pictures are drawn at")
    ap.add_argument("--train-per-scene", type=int, default=64, help="renders (and queries) per seen combination")
    ap.add_argument("--queries-per-render", type=int, default=1, help="training queries drawn per render")
    ap.add_argument("--inference-share", type=float, default=0.5)
    ap.add_argument("--heldout-fraction", type=float, default=0.2)
    ap.add_argument("--train-hops", type=int, choices=(2, 3), default=2,
                    help="3: training also names positions by three-hop routes free of held-out chains")
    ap.add_argument("--inference-hops", type=int, choices=(1, 2), default=2,
                    help="2: the inference split riddles positions through two-hop chains held out of training")
    for name in ("gen-nce", "disc-nce", "query-ce", "target-ce"):
        ap.add_argument(f"--{name}-weight", type=float, default=1.0)
    ap.add_argument("--grpo-minutes", type=float, default=0.0, help="GRPO after SFT for this many minutes (0: none)")
    ap.add_argument("--sft-checkpoint", help="skip SFT: GRPO from this checkpoint (trained on this task and seed)")
    ap.add_argument("--grpo-lr", type=float, default=1e-4)
    ap.add_argument("--grpo-batch", type=int, default=8, help="pairs per GRPO step")
    ap.add_argument("--grpo-generations", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/results/reasoning_generalisation")
    ap.add_argument("--keep", help="save the final checkpoint here")
    args = ap.parse_args()
    if args.sft_checkpoint and not args.grpo_minutes:
        ap.error("--sft-checkpoint skips SFT: give --grpo-minutes too")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "ume_train.sft", "ume_train.data.reasoning_task", "ume_retriever.model.encoder"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = synthetic_task_spec(args.image_pixels, vision_depth=args.vision_depth, vision_width=args.vision_width,
                               patch_size=args.patch_size, text_layers=args.text_layers, text_width=args.text_width)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ckpt = build_tiny_checkpoint(tmp / "init", seed=args.seed, spec=spec)
        task = make_reasoning_task(tmp / "data", vocabulary=args.vocabulary, image_size=args.render_size,
                                   train_per_scene=args.train_per_scene, queries_per_render=args.queries_per_render,
                                   inference_share=args.inference_share,
                                   heldout_fraction=args.heldout_fraction, inference_hops=args.inference_hops,
                                   train_hops=args.train_hops,
                                   seed=args.seed)
        train = read_records(task.train).records
        evals = read_records(task.eval).records
        setup_s = time.perf_counter() - t0
        curve, eval_s, steps, offset_s = [], 0.0, {}, 0.0
        if args.sft_checkpoint:  # GRPO only, from an SFT checkpoint of the same task and seed
            start = args.sft_checkpoint
        else:
            trainer, timer, final, tokenise_s = sft_stage(args, tmp, ckpt, train, evals, task.vocabulary)
            setup_s += tokenise_s
            curve, eval_s, steps["sft"], offset_s = timer.curve, timer.eval_s, trainer.state.global_step, timer.train_s
            start = str(tmp / "sft")
            trainer.save_model(start)
        if args.grpo_minutes > 0:
            trainer, timer = grpo_stage(args, tmp, start, train, evals, task.vocabulary, offset_s=offset_s)
            timer.curve.pop()  # the last evaluation again, with the gold reasoning scripted in
            final = timer.evaluate(trainer.state.global_step, gold=True)
            curve, eval_s, steps["grpo"] = curve + timer.curve, eval_s + timer.eval_s, trainer.state.global_step
        if args.keep:
            trainer.save_model(args.keep)
    calibration = adaptive_curve(final["per_query"])
    result = {
        "setup": {**vars(args), "spec": asdict(spec), "visual_tokens_per_image": spec.visual_tokens_per_image,
                  "steps": steps, "train_pairs": len(train), "eval_queries": len(evals),
                  "pool": len({r.extra["scene"] for r in evals}), "heldout_combinations": len(task.heldout),
                  "threads": torch.get_num_threads(), "setup_s": round(setup_s, 1), "eval_s": round(eval_s, 1)},
        "curve": curve,
        "adaptive": calibration,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(curve, calibration, out.with_suffix(".png"), title=f"{args.vocabulary} vocabulary, "
         f"{spec.visual_tokens_per_image} visual token(s) from {spec.image_side} px, patch {spec.patch_size}, "
         f"vision {spec.vision_depth}x{spec.vision_embed_dim}, {args.train_per_scene} renders per combination")
    print_table(curve[-1], result["setup"], calibration)
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def sft_stage(args, tmp: Path, ckpt: Path, train, evals, vocab):
    """SFT from the random checkpoint for ``args.minutes``, with the split curve (the last point
    with the gold reasoning scripted in). Returns (trainer, curve callback, final report, tokenise_s)."""
    config = SFTConfig(
        output_dir=str(tmp / "run"), model_name_or_path=str(ckpt), per_device_train_batch_size=args.batch,
        max_steps=10**6, learning_rate=args.lr, vision_lr=args.vision_lr,
        lr_scheduler_type="constant", weight_decay=args.weight_decay,  # the callback drives the lr
        freeze_vision_tower=False,  # random backbone: the vision tower must learn too
        cache_tokenized=True, use_cpu=True, save_strategy="no", logging_steps=50, report_to="none",
        seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
        gen_nce_weight=args.gen_nce_weight, disc_nce_weight=args.disc_nce_weight,
        query_ce_weight=args.query_ce_weight, target_ce_weight=args.target_ce_weight,
    )
    trainer_ref: list = []
    timer = SplitCurve(trainer_ref, evals, vocab, args.eval_every * 60, args.minutes * 60, args.lr, warmup=args.warmup)
    trainer = SFTTrainer(args=config, train_dataset=train, callbacks=[timer])
    t0 = time.perf_counter()
    for i in range(len(trainer.train_dataset)):  # tokenise once, before the clock starts
        trainer.train_dataset[i]
    tokenise_s = time.perf_counter() - t0
    trainer_ref.append(trainer)
    timer.evaluate(0)
    trainer.train()
    timer.curve.pop()  # the last evaluation again, with the gold reasoning scripted in
    final = timer.evaluate(trainer.state.global_step, gold=True)
    return trainer, timer, final, tokenise_s


def grpo_stage(args, tmp: Path, start: str, train, evals, vocab, offset_s: float):
    """GRPO from the checkpoint ``start`` for ``args.grpo_minutes``, with the split curve."""
    from ume_train import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=str(tmp / "grpo"), model_name_or_path=start, use_cpu=True,
        per_device_train_batch_size=args.grpo_batch, num_generations=args.grpo_generations,
        max_completion_length=96, learning_rate=args.grpo_lr, lr_scheduler_type="constant", max_steps=10**6,
        logging_steps=10, save_strategy="no", report_to="none", seed=args.seed, disable_tqdm=True,
    )
    trainer_ref: list = []
    timer = SplitCurve(trainer_ref, evals, vocab, args.eval_every * 60, args.grpo_minutes * 60, args.grpo_lr,
                       offset_s=offset_s, stage="grpo")
    trainer = GRPOTrainer(args=config, train_dataset=train, callbacks=[timer])
    trainer_ref.append(trainer)
    timer.evaluate(0)
    trainer.train()
    return trainer, timer


def print_table(row: dict, setup: dict, calibration: dict) -> None:
    print(f"\n{setup['vocabulary']} vocabulary, steps {setup['steps']}, {setup['minutes']} min, pool {setup['pool']} "
          f"(chance {1 / setup['pool']:.3f}), {setup['visual_tokens_per_image']} visual token(s) per image")
    print(f"{'split':<17} {'n':>4} " + " ".join(f"{m:>6}" for m in (*METHODS, "g-gold", "g-gimg"))
          + f" {'q-ans':>6}")
    for split in ("all", *SPLITS, "inference_seen", "inference_unseen"):
        if f"{split}_n" not in row:
            continue
        cells = [row.get(f"{split}_{m}", float("nan")) for m in (*METHODS, "gen_gold", "gen_gold_images")]
        print(f"{split:<17} {row[f'{split}_n']:>4} " + " ".join(f"{c:6.3f}" for c in cells)
              + f" {row[f'{split}_query_answer_all']:6.3f}")
    for side in ("seen", "unseen"):
        print(f"image answers, {side} combinations: all {row[f'image_answer_{side}_all']:.3f}, "
              + ", ".join(f"{a} {row[f'image_answer_{side}_{a}']:.3f}" for a in ("shape", "colour", "where")))
    print("adaptive router (margin, then rrf), test half:")
    for point in calibration["routers"]["margin"]["curve"][:: max(1, len(calibration["routers"]["margin"]["curve"]) // 8)]:
        print(f"  M={point['threshold']:<8g} reasons {point['test']['reasoned']:6.1%}  Hit@1 {point['test']['hit@1']:.3f}")
    print(f"  chosen: {calibration['chosen_fusion']} ({calibration['comparison']})")


def plot(curve: list[dict], calibration: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    minutes = [r["minutes"] for r in curve]
    ax = axes[0]
    colours = {"seen": "tab:blue", "unseen": "tab:orange", "wording": "tab:green", "inference": "tab:red"}
    for split, colour in colours.items():
        ax.plot(minutes, [r[f"{split}_disc"] for r in curve], color=colour, ls="--", marker=".")
        ax.plot(minutes, [r[f"{split}_gen"] for r in curve], color=colour, ls="-", marker="o", label=split)
    ax.set_title("Hit@1 per split (solid gen, dashed disc)")
    ax = axes[1]
    for key, style, label in (("image_answer_seen_all", "b-", "image answer, seen combos"),
                              ("image_answer_unseen_all", "b--", "image answer, unseen combos"),
                              ("inference_query_answer_all", "r-", "query answer, inference"),
                              ("wording_query_answer_all", "g-", "query answer, new wording")):
        ax.plot(minutes, [r[key] for r in curve], style, marker="o", label=label)
    ax.set_title("generated answer right (all three attributes)")
    for ax in axes[:2]:
        ax.set_xlabel("training minutes (CPU; threads: see setup)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax = axes[2]
    pts = calibration["routers"]["margin"]["curve"]
    ax.plot([p["test"]["reasoned"] for p in pts], [p["test"]["hit@1"] for p in pts], "k-", marker=".",
            label="margin router (test half)")
    ax.axhline(calibration["oracle"]["test"]["hit@1"], color="gray", ls=":", label="disc/rrf oracle")
    ax.set_xlabel("share of queries that reason")
    ax.set_ylabel("Hit@1")
    ax.set_title("adaptive:margin=M,then=rrf")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
