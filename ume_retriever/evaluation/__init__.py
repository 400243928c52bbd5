"""MMEB-style retrieval evaluation: plain metric functions, task formats, and a runner that
measures disc, gen, every fusion, the oracle, pass@k and a fusion weight sweep through the
same ``UMEIndex`` users run (``ume-eval`` on the command line)."""

from __future__ import annotations

from .metrics import hit_at_k, mrr_at_k, ndcg_at_k, score_ranking
from .tasks import EvalQuery, EvalTask, load_task

__all__ = ["hit_at_k", "ndcg_at_k", "mrr_at_k", "score_ranking", "EvalQuery", "EvalTask", "load_task",
           "evaluate", "evaluate_task", "TaskResult", "CachedEncoder"]


def __getattr__(name: str):
    if name in ("evaluate", "evaluate_task", "TaskResult"):
        from . import runner

        return getattr(runner, name)
    if name == "CachedEncoder":
        from .cache import CachedEncoder

        return CachedEncoder
    raise AttributeError(name)
