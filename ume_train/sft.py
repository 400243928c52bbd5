"""``SFTTrainer``: the UME-R1 cold start (InfoNCE on gen and disc vectors + next-token loss on
both sides' reasoning), on transformers' ``Trainer`` so that accelerate, torchrun, DeepSpeed,
FSDP, gradient accumulation, schedules, checkpointing and resuming work as users know them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer

from ume_retriever.inputs.records import PairRecord
from ume_retriever.model.encoder import UMEEncoder

from .config import SFTConfig
from .data.pairs import PairCollator, PairDataset, SideTokenizer
from .data.prepared import ReportSkipped
from .data.reading import record_preparer
from .modeling import LossWeights, UMETrainingModel
from .trainer_common import UMETrainerMixin, resolve_model

logger = logging.getLogger(__name__)


def set_trainable(model: torch.nn.Module, args: SFTConfig) -> None:
    """Vision tower frozen (default), merger and LLM trained; LoRA adapters when asked."""
    visual = model.model.visual
    for name, param in visual.named_parameters():
        is_merger = name.startswith("merger")
        param.requires_grad = (is_merger and args.train_merger) or (not is_merger and not args.freeze_vision_tower)


def apply_lora(model: torch.nn.Module, args: SFTConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    # Only the LLM's projections get adapters (the vision blocks have other names: qkv, fc1...).
    target = rf"^model\.language_model\..*\.({'|'.join(args.lora_target_modules)})$"
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=target)
    trainable_visual = {n for n, p in model.model.visual.named_parameters() if p.requires_grad}
    model = get_peft_model(model, config)
    for name, param in model.get_base_model().model.visual.named_parameters():
        param.requires_grad = name in trainable_visual  # keep the merger (and tower) choice
    return model


def split_vision_groups(optimizer: torch.optim.Optimizer, vision: set[int], lr: float, base_lr: float) -> int:
    """Move the parameters whose ``id`` is in ``vision`` out of every optimizer group into a
    twin group (same weight decay and betas) at ``lr``. Its ``lr_scale`` (lr / base_lr) lets a
    schedule set from outside, such as ``TimeBudget``, keep the ratio; transformers' own
    schedulers keep it through each group's ``initial_lr``. Returns how many parameters moved."""
    count = 0
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in vision]
        if not moved:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in vision]
        twin = {k: v for k, v in group.items() if k != "params"}
        optimizer.add_param_group({**twin, "params": moved, "lr": lr, "lr_scale": lr / base_lr if base_lr else 0.0})
        count += len(moved)
    return count


class SFTTrainer(UMETrainerMixin, Trainer):
    """Train a UME-R1 model with the SFT loss.

    ``model``: a model instance (then pass ``processor``) or a checkpoint name/path (default:
    ``args.model_name_or_path``). ``train_dataset``: ``PairRecord``s, a ``PairDataset``, or
    None to read ``args.train_files``. A record that fails to tokenise is replaced in its batch
    and counted against ``args.max_bad_records`` with the reading errors (``bad_records``).
    """

    def __init__(
        self,
        model: torch.nn.Module | str | None = None,
        args: SFTConfig | None = None,
        train_dataset: list[PairRecord] | PairDataset | None = None,
        eval_records: list[PairRecord] | None = None,
        processor: Any = None,
        callbacks: list | None = None,
    ):
        self.bad_records = {}
        model, processor = resolve_model(model, args, processor, "SFTTrainer")
        set_trainable(model, args)
        if args.use_lora:
            model = apply_lora(model, args)
        self.processor = processor
        self.trained_model = model  # what is saved (PEFT: adapters merged on save)
        # The encoder runs the model as serving does; a PEFT model's base holds the live adapters.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.encoder = UMEEncoder(base, processor, num_video_frames=args.num_video_frames,
                                  max_new_tokens=args.eval_max_new_tokens)
        self.side_tokenizer: SideTokenizer = record_preparer(args, self.encoder.preparer)
        if train_dataset is None:
            train_dataset = self.read_train_records(args, require_reasoning=True)
        if not isinstance(train_dataset, PairDataset):
            train_dataset = PairDataset(list(train_dataset), self.side_tokenizer, cache=args.cache_tokenized,
                                        max_bad_records=args.max_bad_records)
        if eval_records is None and args.eval_files:
            eval_records = self.read_config_records(args, args.eval_files, require_reasoning=False)
        self.eval_records = eval_records
        weights = LossWeights(args.gen_nce_weight, args.disc_nce_weight, args.query_ce_weight, args.target_ce_weight)
        wrapper = UMETrainingModel(model, weights, args.logit_scale)
        super().__init__(model=wrapper, args=args, data_collator=ReportSkipped(PairCollator(self.encoder.token_ids.pad)),
                         train_dataset=train_dataset, eval_dataset=eval_records, callbacks=callbacks)
        self.model_accepts_loss_kwargs = False  # our loss is complete; Trainer only divides by GA
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """transformers' optimizer; with ``vision_lr``, the vision module in groups of its own."""
        had_optimizer = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        if self.args.vision_lr is not None and not had_optimizer:
            vision = {id(p) for p in self.encoder.model.model.visual.parameters()}  # the (PEFT base) model
            if not split_vision_groups(optimizer, vision, self.args.vision_lr, self.args.learning_rate):
                # e.g. FSDP flattens parameters before the optimizer sees them
                logger.warning("vision_lr=%g: no trainable vision parameter is in the optimizer as such; "
                               "the vision module trains at learning_rate", self.args.vision_lr)
        return optimizer

    # -- loss (logging and held-out evaluation: UMETrainerMixin) --------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.note_bad_records(inputs.pop("skipped", []))
        out = model(**inputs)
        for key in ("nce_gen", "nce_disc", "ce_query", "ce_target"):
            self._metrics[key].append(float(out[key]))
        return (out["loss"], out) if return_outputs else out["loss"]
