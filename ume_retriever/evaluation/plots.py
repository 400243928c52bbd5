"""PNG figures of an evaluation: Hit@1 per task and mode, pass@k curves, the fusion weight sweep,
the adaptive calibration curve."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .runner import TaskResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, legend_columns: int = 1) -> Path:
    """The finish every plot here shares: 0-1 scores, a light grid, legend, PNG, figure closed.
    ``ax``: one axes or a sequence of them."""
    for a in ax if isinstance(ax, (list, tuple)) else [ax]:
        a.set_ylim(0, 1)
        a.grid(alpha=0.3)
        a.legend(fontsize=7, ncol=legend_columns)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_modes(results: Sequence[TaskResult], path: Path, metric: str = "hit@1") -> Path:
    plt = _plt()
    modes = list(results[0].modes)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(results) * len(modes) / 3), 4))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        xs = [i + j * width for i in range(len(results))]
        ax.bar(xs, [r.modes[mode][metric] for r in results], width, label=mode)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(results))], [r.task for r in results])
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per task and mode")
    return _save(fig, ax, path, legend_columns=3)


def plot_pass_at_k(results: Sequence[TaskResult], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in results:
        ks = sorted(r.pass_at_k)
        ax.plot(ks, [r.pass_at_k[k] for k in ks], "o-", label=r.task)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (sampled reasoning chains)")
    ax.set_ylabel("pass@k (gen, Hit@1)")
    return _save(fig, ax, path)


def plot_sweep(results: Sequence[TaskResult], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in results:
        if not r.sweep:
            continue
        ws = [c["disc_weight"] for c in r.sweep["curve"]]
        ax.plot(ws, [c["dev"]["hit@1"] for c in r.sweep["curve"]], "--", label=f"{r.task} dev")
        ax.plot(ws, [c["test"]["hit@1"] for c in r.sweep["curve"]], "-", label=f"{r.task} test")
        ax.axvline(r.sweep["best_disc_weight"], color="gray", lw=0.6)
    ax.set_xlabel("disc weight (gen weight = 1 - disc weight)")
    ax.set_ylabel("Hit@1 (weighted fusion)")
    return _save(fig, ax, path)


def plot_adaptive(results: Sequence[TaskResult], path: Path) -> Path:
    """Per task: Hit@1 against the fraction of queries that reason, for the margin router
    (``adaptive:margin=M``) and the top-1 router, dev dashed and test solid; disc (no
    reasoning), the fused ranking (all reason), the chosen thresholds (test) and the oracle."""
    plt = _plt()
    calibrated = [r for r in results if r.adaptive_calibration]
    fig, axes = plt.subplots(1, len(calibrated), figsize=(5 * len(calibrated), 4), squeeze=False)
    for r, ax in zip(calibrated, axes[0]):
        cal = r.adaptive_calibration
        for name, colour in (("margin", "C0"), ("top1", "C1")):
            curve = cal["routers"][name]["curve"]
            for split, style in (("dev", "--"), ("test", "-")):
                ax.plot([c[split]["reasoned"] for c in curve], [c[split]["hit@1"] for c in curve], style,
                        color=colour, lw=1, label=f"{name} router {split}")
            chosen = cal["routers"][name]["chosen"]
            ax.plot(chosen["test"]["reasoned"], chosen["test"]["hit@1"], "*", color=colour, ms=12,
                    label=f"chosen {name} {chosen['threshold']:g} (test)")
        ax.plot(0, cal["disc"]["test"]["hit@1"], "s", color="C2", label="disc (test)")
        ax.plot(1, cal["fused"]["test"]["hit@1"], "D", color="C3", label=f"{cal['then']} (test)")
        ax.axhline(cal["oracle"]["test"]["hit@1"], color="gray", ls=":", lw=1, label="oracle (test)")
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("fraction of queries that reason")
        ax.set_ylabel("Hit@1")
        ax.set_title(f"{r.task}: adaptive, then {cal['then']}", fontsize=9)
    return _save(fig, list(axes[0]), path)
