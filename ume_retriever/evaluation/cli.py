"""``ume-eval``: evaluate a UME-R1 model on retrieval tasks; table, JSON and plots.

    ume-eval --model zhibinlan/UME-R1-2B --task tasks/docvqa.jsonl --format mmeb --media-root mmeb/
    ume-eval --model ./my-ckpt --task shapes/eval.jsonl --format pairs --fusion rrf --fusion weighted:disc=0.3,gen=0.7
    ume-eval ... --path exact           # numpy scoring for large pools (default: through UMEIndex)
    ume-eval ... --calibrate-adaptive   # the adaptive margin: reasoning share vs Hit@1 (then rrf)
    ume-eval ... --calibrate-adaptive weighted:disc=0.3,gen=0.7

Writes ``results.json``, ``hit1_by_mode.png``, ``pass_at_k.png``, ``fusion_sweep.png`` and
(with ``--calibrate-adaptive``) ``adaptive_curve.png`` to ``--out``; vectors are cached per
model under ``--cache`` so re-runs do not re-encode.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ume-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="hub name or checkpoint folder")
    ap.add_argument("--task", action="append", required=True, help="task file (repeatable)")
    ap.add_argument("--format", default="ume", choices=("ume", "mmeb", "pairs"), help="task file format")
    ap.add_argument("--media-root", help="folder relative media paths are read from (default: the task file's)")
    ap.add_argument("--fusion", action="append", help="fusion(s) to measure (default rrf, weighted, dbsf)")
    ap.add_argument("--pass-k", default="1,2,4,8", help="sampled-gen pass@k values ('' to skip sampling)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pass@k")
    ap.add_argument("--path", default="index", choices=("index", "exact"), help="score through UMEIndex or numpy")
    ap.add_argument("--no-sweep", action="store_true", help="skip the fusion weight sweep")
    ap.add_argument("--calibrate-adaptive", nargs="?", const="rrf", metavar="THEN",
                    help="calibrate adaptive:margin=M on a dev half of the queries; THEN is the fusion a query "
                         "that reasons uses (rrf, weighted:disc=W,gen=W, dbsf, gen; default rrf)")
    ap.add_argument("--out", default="ume-eval-results", help="output folder")
    ap.add_argument("--cache", default=".ume-eval-cache", help="encoding cache folder")
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", "-v", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run(args)
    except Exception as exc:  # noqa: BLE001 - one line unless --verbose
        if args.verbose:
            raise
        print(f"ume-eval: error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..model.encoder import UMEEncoder
    from ..model.checkpoint import max_image_pixels
    from .metrics import METRICS
    from .plots import plot_adaptive, plot_modes, plot_pass_at_k, plot_sweep
    from .runner import evaluate
    from .tasks import load_task

    if args.calibrate_adaptive is not None:
        from .calibrate import then_fusion

        then_fusion(args.calibrate_adaptive)  # a bad THEN fails before the model loads
    pass_k = [int(k) for k in args.pass_k.split(",") if k.strip()]
    kwargs = {k: getattr(args, k) for k in ("device", "dtype", "batch_size", "max_new_tokens") if getattr(args, k)}
    encoder = UMEEncoder.from_pretrained(args.model, **kwargs)
    tasks = [load_task(t, args.format, media_root=args.media_root, pdf_max_pixels=max_image_pixels(encoder.processor))
             for t in args.task]
    results = evaluate(encoder, tasks, cache_dir=args.cache, fusions=args.fusion or ("rrf", "weighted", "dbsf"),
                       pass_k=pass_k, path=args.path, sweep=not args.no_sweep, temperature=args.temperature,
                       calibrate_adaptive=args.calibrate_adaptive, seed=args.seed, show_progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"model": args.model, "path": args.path,
                                                  "tasks": [r.as_dict() for r in results]}, indent=2))
    console = Console()
    for r in results:
        table = Table(title=f"{r.task}: {r.queries} queries, {r.candidates} candidates ({args.path} path)")
        table.add_column("mode")
        for m in METRICS:
            table.add_column(m, justify="right")
        reasoned = any("reasoned" in values for values in r.modes.values())
        if reasoned:
            table.add_column("reasoned", justify="right")
        for mode, values in r.modes.items():
            extra = [f"{values['reasoned']:.1%}" if "reasoned" in values else ""] if reasoned else []
            table.add_row(mode, *(f"{values[m]:.3f}" for m in METRICS), *extra)
        console.print(table)
        if r.pass_at_k:
            console.print("pass@k (gen): " + ", ".join(f"k={k}: {v:.3f}" for k, v in sorted(r.pass_at_k.items())))
        if r.sweep:
            t = r.sweep["test_at_best"]
            console.print(f"fusion sweep: best on dev ({r.sweep['dev_queries']} queries) {r.sweep['best_fusion']}; "
                          f"on test ({r.sweep['test_queries']}): hit@1 {t['hit@1']:.3f}, ndcg@5 {t['ndcg@5']:.3f}")
        if r.adaptive_calibration:
            console.print(calibration_table(r.task, r.adaptive_calibration, Table))
            console.print(r.adaptive_calibration["comparison"])
    _plot(plot_modes, results, out / "hit1_by_mode.png")
    if any(r.pass_at_k for r in results):
        _plot(plot_pass_at_k, results, out / "pass_at_k.png")
    if any(r.sweep for r in results):
        _plot(plot_sweep, results, out / "fusion_sweep.png")
    if any(r.adaptive_calibration for r in results):
        _plot(plot_adaptive, results, out / "adaptive_curve.png")
    console.print(f"wrote {out / 'results.json'} and plots in {out}")
    return 0


def _plot(fn: Callable[..., Any], results: Sequence[Any], path: Path) -> None:
    """One figure; without matplotlib (the ``train`` extra) a warning instead."""
    try:
        fn(results, path)
    except ImportError as exc:
        logger.warning("%s not written: %s (matplotlib comes with the train extra)", path.name, exc)


def calibration_table(task: str, cal: dict[str, Any], table_cls: Any, rows: int = 6) -> Any:
    """Disc, fused, oracle, each router's curve at about ``rows`` evenly spaced dev reasoning
    shares (its two ends included) and its chosen threshold (marked *)."""
    table = table_cls(title=f"{task}: adaptive calibration, fused = {cal['then']} "
                            f"(dev {cal['dev_queries']} / test {cal['test_queries']} queries)",
                      caption=f"* chosen: the least dev reasoning with dev Hit@1 >= max(disc, fused) "
                              f"- {cal['tolerance']:g}; margin M = adaptive:margin=M; top1 T: reason when the "
                              "top-1 disc cosine < T")
    table.add_column("", no_wrap=True)
    for col in ("M / T", "dev reason", "dev hit@1", "dev ndcg@5", "test reason", "test hit@1", "test ndcg@5"):
        table.add_column(col, justify="right")

    def row(label: str, threshold: str, point: dict[str, Any]) -> None:
        table.add_row(label, threshold, *(f"{point[s]['reasoned']:.0%}" if m == "reasoned" else f"{point[s][m]:.3f}"
                                          for s in ("dev", "test") for m in ("reasoned", "hit@1", "ndcg@5")))

    row("disc", "", cal["disc"])
    row("fused", "", cal["fused"])
    row("oracle", "", cal["oracle"])
    for name, router in cal["routers"].items():
        curve = router["curve"]
        def nearest(share: float) -> int:
            return min(range(len(curve)), key=lambda i: abs(curve[i]["dev"]["reasoned"] - share))

        shown = {0, len(curve) - 1} | {nearest(j / (rows - 1)) for j in range(1, rows - 1)}
        for i in sorted(shown):
            row(name, f"{curve[i]['threshold']:g}", curve[i])
        row(f"{name} *", f"{router['chosen']['threshold']:g}", router["chosen"])
    return table
