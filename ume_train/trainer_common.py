"""What the SFT and GRPO trainers share: the model, the records (and the budget of bad ones),
held-out evaluation, logging, checkpoints in the encoder's layout marked complete when every
file is written, and resuming from the last complete one (``UMETrainerMixin``)."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ume_retriever.inputs.records import PairRecord

from .checkpoint import mark_complete, resolve_resume, save_checkpoint
from .data.prepared import SkippedRecord, too_many_bad_records
from .data.reading import read_config_records
from .evaluation import retrieval_hit_at_1
from .losses import world_size

logger = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"  # LoRA runs keep the adapter next to the merged weights, for resuming
BAD_RECORDS_FILE = "bad_records.json"  # in each checkpoint: the bad records met so far, for resuming


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

    A ``checkpoint-N`` folder is marked complete (``checkpoint.COMPLETE_MARKER``, listing every
    file and its size) after every process has written its part, so a kill during a save leaves
    an unmarked folder; ``train(resume_from_checkpoint=True | "true" | "auto")`` resumes from the
    last complete one and logs the partial ones it skips (``checkpoint.resolve_resume``).
    Rotation (``save_total_limit``) runs after the marker: an older complete checkpoint is never
    deleted before the new one is complete.

    The trainer sets ``self.trained_model`` (the Qwen2-VL model, PEFT-wrapped with LoRA) and
    ``self.processor``.
    """

    trained_model: torch.nn.Module
    processor: Any
    _rotation_limit: int | None = None  # save_total_limit while a checkpoint save holds it back
    _saving_checkpoint: bool = False

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
        torch.save(self._args_to_save(), os.path.join(output_dir, "training_args.bin"))

    def _args_to_save(self) -> Any:
        """``self.args`` as it goes into ``training_args.bin``: the real ``save_total_limit`` (held
        back during a checkpoint save) and no secrets (``args.secret_fields``)."""
        args = copy.copy(self.args)
        if self._saving_checkpoint:
            args.save_total_limit = self._rotation_limit
        for name in getattr(args, "secret_fields", ()):
            if getattr(args, name, None):
                setattr(args, name, f"<{name.upper()}>")
        return args

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            clear_checkpoint_folder(folder)
        self.accelerator.wait_for_everyone()  # nobody writes into the folder before it is cleared
        self._rotation_limit, self._saving_checkpoint = self.args.save_total_limit, True
        self.args.save_total_limit = None  # Trainer rotates before we mark: we rotate after
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit, self._saving_checkpoint = self._rotation_limit, False
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            self.write_checkpoint_extras(folder)
            mark_complete(folder, self.state.global_step)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def write_checkpoint_extras(self, folder: Path) -> None:
        """Files of ours that a checkpoint holds besides Trainer's (written before the marker)."""

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint`` True, "true" or "auto" resumes from the last
        COMPLETE checkpoint ("auto" starts from scratch when there is none)."""
        resume = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume is not None:
            self.restore_checkpoint_extras(Path(resume))
        return super().train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                             **kwargs)

    def restore_checkpoint_extras(self, folder: Path) -> None:
        """Read back what ``write_checkpoint_extras`` wrote (before training resumes)."""

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


def clear_checkpoint_folder(folder: Path) -> None:
    """Make way for a new save into ``folder``: a partial one left by a killed run is removed
    (its stale files would otherwise mix with the new ones); a complete one loses its marker
    first, so that it does not count as complete while it is rewritten."""
    import shutil

    from .checkpoint import COMPLETE_MARKER, incomplete_reason

    if not folder.exists():
        return
    reason = incomplete_reason(folder)
    if reason is None:
        (folder / COMPLETE_MARKER).unlink()
    else:
        logger.warning("removing %s before saving into it: %s", folder, reason)
        shutil.rmtree(folder)


class UMETrainerMixin(EncoderLayoutCheckpoints):
    """A ``Trainer`` mixin for both UME-R1 trainers: reading the config's records, the budget of
    bad records (reading errors and records that fail to prepare during training, together at
    most ``max_bad_records``), logging the collected metrics with each loss, and ``evaluate`` as
    held-out retrieval (real generation for gen vectors) in the modes ``eval_modes`` names."""

    eval_modes: tuple[str, ...] = ("disc", "gen")
    encoder: Any
    eval_records: list[PairRecord] | None
    _metrics: dict[str, list[float]]
    bad_records: dict[str, str]  # file:line -> reason, in the order they were met

    @staticmethod
    def read_config_records(args: Any, files: list[str], *, require_reasoning: bool) -> list[PairRecord]:
        return read_config_records(args, files, require_reasoning=require_reasoning).records

    def read_train_records(self, args: Any, *, require_reasoning: bool) -> list[PairRecord]:
        """``args.train_files``' records; their reading errors count against ``max_bad_records``."""
        report = read_config_records(args, args.train_files, require_reasoning=require_reasoning)
        self.bad_records.update((e.where, e.reason) for e in report.bad)
        return report.records

    def note_bad_records(self, skipped: list[SkippedRecord]) -> None:
        """Count the bad records a batch's items stood in for (``PreparedRecords``); log the new
        ones with file and line; stop when there are more than ``max_bad_records``.

        Called by every process once per micro-batch: with several processes the new records
        are shared (one small all-reduce, and an all-gather only when there is something new), so
        every process knows the same list and all of them stop at the same step.
        """
        new = {where: reason for where, reason in skipped if where not in self.bad_records}
        if world_size() > 1:
            import torch.distributed as dist

            count = torch.tensor([len(new)], device=self.args.device)
            dist.all_reduce(count)
            if int(count) > 0:
                parts: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(parts, new)
                new = {w: r for part in parts for w, r in part.items() if w not in self.bad_records}
        limit = self.args.max_bad_records
        for where, reason in new.items():
            self.bad_records[where] = reason
            logger.warning("skipping bad record %s: %s (another record takes its place; %d of max_bad_records=%d)",
                           where, reason, len(self.bad_records), limit)
        if len(self.bad_records) > limit:
            raise too_many_bad_records(self.bad_records, limit)

    def write_checkpoint_extras(self, folder: Path) -> None:
        (folder / BAD_RECORDS_FILE).write_text(json.dumps(self.bad_records, indent=1))

    def restore_checkpoint_extras(self, folder: Path) -> None:
        # The bad records met before the checkpoint (resuming skips their batches without
        # preparing them again): still counted, as in an uninterrupted run.
        path = folder / BAD_RECORDS_FILE
        if path.is_file():
            for where, reason in json.loads(path.read_text()).items():
                self.bad_records.setdefault(where, reason)

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
