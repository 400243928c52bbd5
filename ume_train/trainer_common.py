"""What the SFT and GRPO trainers share: checkpoints in the encoder's layout, and resuming."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import save_checkpoint

logger = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"  # LoRA runs keep the adapter next to the merged weights, for resuming


def model_dtype(args: Any) -> torch.dtype:
    if args.model_dtype == "bfloat16" or (args.model_dtype == "auto" and args.bf16):
        return torch.bfloat16
    return torch.float32


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
