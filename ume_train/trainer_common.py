"""What the SFT and GRPO trainers share: the model, the records, held-out evaluation, logging,
checkpoints in the encoder's layout, and resuming (``UMETrainerMixin``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ume_retriever.inputs.records import PairRecord

from .checkpoint import save_checkpoint
from .data.reading import read_config_records
from .evaluation import retrieval_hit_at_1

logger = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"  # LoRA runs keep the adapter next to the merged weights, for resuming


def model_dtype(args: Any) -> torch.dtype:
    if args.model_dtype == "bfloat16" or (args.model_dtype == "auto" and args.bf16):
        return torch.bfloat16
    return torch.float32


def resolve_model(model: Any, args: Any, processor: Any, trainer_name: str) -> tuple[torch.nn.Module, Any]:
    """(model, processor): a given instance (with its processor) or one loaded from a path."""
    if args is None:
        raise ValueError(f"{trainer_name} needs args=...Config(...)")
    model = model if model is not None else args.model_name_or_path
    if model is None:
        raise ValueError("no model: pass model= or set model_name_or_path in the config")
    if isinstance(model, (str, os.PathLike)):
        from .checkpoint import load_for_training

        return load_for_training(str(model), dtype=model_dtype(args), attn_implementation=args.attn_implementation,
                                 min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if processor is None:
        raise ValueError("pass processor= together with a model instance")
    return model, processor


def log_with_metrics(trainer: Any, logs: dict[str, float]) -> None:
    """Add the means of ``trainer._metrics`` (averaged over processes) to a loss log, then clear them."""
    if trainer._metrics and "loss" in logs:
        names = sorted(trainer._metrics)
        local = torch.tensor([sum(trainer._metrics[n]) / len(trainer._metrics[n]) for n in names],
                             device=trainer.args.device)
        means = trainer.accelerator.gather(local[None]).mean(0)
        logs.update({n: round(float(v), 4) for n, v in zip(names, means)})
        trainer._metrics.clear()


class EncoderLayoutCheckpoints:
    """A ``Trainer`` mixin: ``save_model`` and ``checkpoint-N`` folders hold the published layout
    (what ``UMEEncoder.from_pretrained`` reads), and resuming reads them back.

    The trainer sets ``self.trained_model`` (the Qwen2-VL model, PEFT-wrapped with LoRA) and
    ``self.processor``.
    """

    trained_model: torch.nn.Module
    processor: Any

    @property
    def inner_model(self) -> torch.nn.Module:
        """The Qwen2-VL model being trained, without the loss wrapper."""
        return self.trained_model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if state_dict is not None:  # consolidated by DeepSpeed/FSDP: keys of the wrapper
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
            if any(k.startswith("base_model.") for k in state_dict):
                state_dict = None  # PEFT: merged from the live model instead
        model = self.inner_model
        save_checkpoint(model, self.processor, output_dir, state_dict)
        if hasattr(model, "peft_config"):
            model.save_pretrained(Path(output_dir) / ADAPTER_DIR)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        inner = self.inner_model
        if hasattr(inner, "peft_config"):
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(inner, load_peft_weights(str(Path(resume_from_checkpoint) / ADAPTER_DIR)))
            return
        # Checkpoints hold the published key layout: load through from_pretrained, which maps
        # it to this transformers version's module names, then copy into the live model.
        saved = type(inner).from_pretrained(resume_from_checkpoint, dtype=next(inner.parameters()).dtype)
        inner.load_state_dict(saved.state_dict(), strict=True)
        logger.info("resumed weights from %s", resume_from_checkpoint)


class UMETrainerMixin(EncoderLayoutCheckpoints):
    """A ``Trainer`` mixin for both UME-R1 trainers: reading the config's records, logging the
    collected metrics with each loss, and ``evaluate`` as held-out retrieval (real generation
    for gen vectors) in the modes ``eval_modes`` names."""

    eval_modes: tuple[str, ...] = ("disc", "gen")
    encoder: Any
    eval_records: list[PairRecord] | None
    _metrics: dict[str, list[float]]

    @staticmethod
    def read_config_records(args: Any, files: list[str], *, require_reasoning: bool) -> list[PairRecord]:
        return read_config_records(args, files, require_reasoning=require_reasoning).records

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        log_with_metrics(self, logs)
        self.add_derived_metrics(logs)
        super().log(logs, start_time)

    def add_derived_metrics(self, logs: dict[str, float]) -> None:
        """Metrics computed from the collected ones, added before logging (none by default)."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        records = eval_dataset if eval_dataset is not None else self.eval_records
        if not records:
            return {}
        model = self.inner_model
        was_training = model.training
        model.eval()
        try:
            metrics = retrieval_hit_at_1(self.encoder, records, modes=self.eval_modes)
        finally:
            model.train(was_training)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        return metrics
