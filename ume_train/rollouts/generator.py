"""Rollout generation for GRPO: G sampled completions per prompt.

``TransformersRollouts`` (default) samples with transformers' ``generate`` through the
encoder's own backend, so rollouts are decoded exactly as gen vectors are at serving time.
Each prompt's G rollouts are drawn with a seed derived from (run seed, step, side, global
prompt index): the same prompt gets the same rollouts however the batch is split across
processes, which makes runs reproducible and lets the distributed test compare exactly.
Other generators: ``vllm_engine.VLLMRollouts`` (a vLLM engine per training process) and
``client.ServerRollouts`` (a ``ume-train rollout-server``); ``GRPOConfig.rollout_backend``
picks one, and the trainer calls ``sync_weights`` once per optimiser step before sampling.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from ume_retriever.model.backends import SamplingParams, TransformersBackend
from ume_retriever.model.preprocess import PreparedInput


@dataclass
class Rollout:
    completion_ids: list[int]  # generated tokens, the end-of-turn token included when produced
    text: str  # decoded completion without the end-of-turn token


class RolloutGenerator(Protocol):
    def generate(self, prompts: list[PreparedInput], num_generations: int, seeds: list[int]) -> list[list[Rollout]]: ...

    def sync_weights(self, model: nn.Module) -> None: ...


def rollout_seed(seed: int, step: int, side: str, prompt_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}|{step}|{side}|{prompt_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class TransformersRollouts:
    """Samples on the live policy (no weight copy to sync)."""

    def __init__(self, model: nn.Module, processor: Any, token_ids: Any, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, generation_kwargs: dict[str, Any] | None = None):
        """``generation_kwargs`` go to ``generate`` (e.g. a ``logits_processor``)."""
        self.model = model
        self.generation_kwargs = generation_kwargs or {}
        self.backend = TransformersBackend(model, processor, token_ids)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p

    def generate(self, prompts: list[PreparedInput], num_generations: int, seeds: list[int]) -> list[list[Rollout]]:
        was_training = self.model.training
        self.model.eval()  # no dropout and KV caching while sampling
        try:
            out = []
            for prompt, seed in zip(prompts, seeds):
                sampling = SamplingParams(max_new_tokens=self.max_new_tokens, num_samples=num_generations,
                                          do_sample=True, temperature=self.temperature, top_p=self.top_p, seed=seed,
                                          generation_kwargs=self.generation_kwargs)
                samples = self.backend.run([prompt], want_disc=False, sampling=sampling).gen[0]
                out.append([
                    Rollout(s.token_ids + ([s.end_id] if s.end_id is not None else []), self.backend.decode(s.token_ids))
                    for s in samples
                ])
            return out
        finally:
            self.model.train(was_training)

    def sync_weights(self, model: nn.Module) -> None:
        """Nothing to do: generation runs on the policy itself."""
