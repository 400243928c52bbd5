"""The UME-R1 training forward pass: one teacher-forced pass per side gives the disc vector, the
gen vector and the answer's next-token loss.

``UMETrainingModel`` wraps the Qwen2-VL model so that the whole computation, including the
cross-process gather of embeddings, runs inside ``forward``: DDP, DeepSpeed and FSDP hook
the wrapper's forward, so gradients are synchronised as for any model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ume_retriever.model.preprocess import VISION_KEYS

from .losses import all_reduce_sum, gather_with_grad, symmetric_info_nce, world_size

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", *VISION_KEYS)


@dataclass
class SideOutput:
    disc: torch.Tensor  # (B, H) last-layer state at <disc_emb>
    gen: torch.Tensor  # (B, H) last-layer state at the answer's <gen_emb>
    ce_sum: torch.Tensor  # summed next-token loss over the answer tokens
    ce_tokens: torch.Tensor  # how many answer tokens were scored


def language_model_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the Qwen2-VL base model that returns last hidden states, the LM head), through PEFT."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.lm_head


def side_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> SideOutput:
    """One teacher-forced pass over prompt + answer (left-padded batch from ``collate_sides``)."""
    base, lm_head = language_model_parts(model)
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    hidden = base(**inputs, use_cache=False).last_hidden_state  # (B, L, H), after the final norm
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    disc = hidden[rows, batch["disc_index"]]
    gen = hidden[rows, batch["gen_index"]]
    # Next-token loss on the answer only: the state at p predicts labels[p + 1]. The LM head
    # runs on those positions alone (no (B, L, vocab) logits).
    targets = batch["labels"][:, 1:]  # (B, L-1)
    scored = targets != -100
    logits = lm_head(hidden[:, :-1][scored])  # (n, vocab)
    ce_sum = F.cross_entropy(logits.float(), targets[scored], reduction="sum")
    return SideOutput(disc, gen, ce_sum, scored.sum())


@dataclass
class LossWeights:
    gen_nce: float = 1.0
    disc_nce: float = 1.0
    query_ce: float = 1.0
    target_ce: float = 1.0


class TrainingWrapper(nn.Module):
    """A loss module around the Qwen2-VL model that Trainer can configure like the model itself."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()


class UMETrainingModel(TrainingWrapper):
    """Computes the UME-R1 SFT loss; ``forward(query=..., target=...)`` returns the loss and its terms.

    InfoNCE runs on embeddings gathered from every process (with gradient); each process
    computes the same global value. The CE terms are normalised by the GLOBAL number of
    answer tokens and scaled by the world size, so that DDP's gradient averaging yields the
    gradient of the global token mean: a run on N processes equals one process on the
    global batch.
    """

    def __init__(self, model: nn.Module, weights: LossWeights | None = None, scale: float = 50.0):
        super().__init__(model)
        self.weights = weights or LossWeights()
        self.scale = scale

    def forward(self, query: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q = side_forward(self.model, query)
        t = side_forward(self.model, target)
        nce_disc = symmetric_info_nce(gather_with_grad(q.disc), gather_with_grad(t.disc), self.scale)
        nce_gen = symmetric_info_nce(gather_with_grad(q.gen), gather_with_grad(t.gen), self.scale)
        scale = world_size()
        ce_query = q.ce_sum * scale / all_reduce_sum(q.ce_tokens).clamp(min=1)
        ce_target = t.ce_sum * scale / all_reduce_sum(t.ce_tokens).clamp(min=1)
        w = self.weights
        loss = w.gen_nce * nce_gen + w.disc_nce * nce_disc + w.query_ce * ce_query + w.target_ce * ce_target
        return {
            "loss": loss,
            "nce_gen": nce_gen.detach(), "nce_disc": nce_disc.detach(),
            # logged per process; the mean over processes is the global token mean
            "ce_query": ce_query.detach(), "ce_target": ce_target.detach(),
        }
