"""ume_train: produce UME-R1 checkpoints that ``ume_retriever`` loads.

SFT (contrastive + reasoning) and GRPO (reinforcement learning with the embedding reward) on
transformers' Trainer, so one process, torchrun, accelerate, DeepSpeed and FSDP all work.
Importing this package is light; the trainers load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GRPOConfig", "GRPOTrainer", "SFTConfig", "SFTTrainer", "TrainConfig"]

_LAZY = {"TrainConfig": ".config", "SFTConfig": ".config", "SFTTrainer": ".sft", "GRPOConfig": ".config",
         "GRPOTrainer": ".grpo"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'ume_train' has no attribute {name!r}")
