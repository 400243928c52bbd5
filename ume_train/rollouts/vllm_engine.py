"""GRPO rollouts sampled by vLLM (``pip install 'ume-r1[vllm]'``), on a copy of the policy.

Colocated (``GRPOConfig(rollout_backend="vllm")``): every training process holds its own vLLM engine on
its own GPU (``distributed_executor_backend="external_launcher"``, engine in-process) and
samples its own prompts; before each step's rollouts the policy's weights are copied in.
The same class is the engine behind ``ume-train rollout-server --engine vllm`` (server mode).

Only vLLM's offline API is used: ``LLM.generate`` with multimodal prompts (as the encoder's
vLLM backend builds them), ``LLM.collective_rpc`` into a worker extension whose method calls
the model's ``load_weights`` (which maps transformers parameter names to vLLM's layout), and
``LLM.reset_prefix_cache`` after an update (cached prefixes were computed by the old weights).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch
from torch import nn

from ume_retriever.model.preprocess import PreparedInput
from ume_retriever.model.tokens import UMETokenIds
from ume_retriever.model.vllm_backend import multimodal_data

from .generator import Rollout
from .weight_sync import named_full_weights, weight_chunks

logger = logging.getLogger(__name__)
EXTENSION = "ume_train.rollouts.vllm_engine.WeightLoaderExtension"


class WeightLoaderExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``); called by ``collective_rpc``."""

    model_runner: Any  # set by the vLLM worker this class is mixed into

    def ume_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        loaded = self.model_runner.model.load_weights(weights=weights)
        return len(loaded) if loaded is not None else len(weights)

    def ume_parameter_sums(self) -> dict[str, float]:
        """Sum of each parameter (vLLM names): lets a test see that an update landed."""
        return {name: float(p.detach().float().sum()) for name, p in self.model_runner.model.named_parameters()}


def rollout_from_vllm(token_ids: list[int], finish_reason: str | None, eos_ids: list[int],
                      decode: Callable[[list[int]], str]) -> Rollout:
    """A vLLM completion as a ``Rollout``: ids end with the end-of-turn token when it stopped there
    (vLLM leaves a stop token out of ``token_ids``; transformers keeps it), text without it."""
    generated = list(token_ids)
    if finish_reason == "stop" and (not generated or generated[-1] not in eos_ids):
        generated.append(eos_ids[0])
    body = generated[:-1] if generated and generated[-1] in eos_ids else generated
    return Rollout(completion_ids=generated, text=decode(body))


def _set_single_process_env() -> None:
    """``external_launcher`` reads torchrun's variables; give a plain ``python`` run its own."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class VLLMRollouts:
    """G sampled completions per prompt from a vLLM engine; ``sync_weights`` copies the policy in."""

    def __init__(self, model_path: str, tokenizer: Any, token_ids: UMETokenIds, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, repetition_penalty: float = 1.0, colocate: bool = True,
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: int | None = None, enforce_eager: bool = False, seed: int = 0,
                 min_pixels: int | None = None, max_pixels: int | None = None, **llm_kwargs: Any):
        """``min_pixels``/``max_pixels``: the policy processor's caps, so vLLM cuts images into the
        same visual-token grid the log-probabilities are computed on."""
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError(f"vLLM rollouts need vLLM: pip install 'ume-r1[vllm]' ({exc})") from exc
        if colocate and tensor_parallel_size != 1:
            raise ValueError("colocated vLLM rollouts run one engine per training process (tensor_parallel_size=1); "
                             "for tensor parallelism run `ume-train rollout-server` and use rollout_backend='server'")
        kwargs: dict[str, Any] = dict(
            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
            enforce_eager=enforce_eager, seed=seed, worker_extension_cls=EXTENSION,
            limit_mm_per_prompt={"image": 8, "video": 1},
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        caps = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        if caps:
            kwargs["mm_processor_kwargs"] = caps
        if colocate:
            _set_single_process_env()
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(model=model_path, **{**kwargs, **llm_kwargs})
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.repetition_penalty = repetition_penalty  # the checkpoint's, as transformers generate uses it

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def generate(self, prompts: list[PreparedInput], num_generations: int, seeds: list[int]) -> list[list[Rollout]]:
        from vllm import SamplingParams

        eos = list(self.token_ids.eos)
        params = [SamplingParams(n=num_generations, seed=seed, temperature=self.temperature, top_p=self.top_p,
                                 max_tokens=self.max_new_tokens, stop_token_ids=eos, skip_special_tokens=False,
                                 repetition_penalty=self.repetition_penalty)
                  for seed in seeds]
        requests = [{"prompt": p.prompt, "multi_modal_data": multimodal_data(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[rollout_from_vllm(list(c.token_ids), c.finish_reason, eos, self.decode) for c in out.outputs]
                for out in outputs]

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.llm.collective_rpc("ume_load_weights", args=(list(weights.items()),))

    def finish_weight_update(self) -> None:
        self.llm.reset_prefix_cache()

    def sync_weights(self, model: nn.Module) -> None:
        for chunk in weight_chunks(named_full_weights(model)):
            self.load_weights(chunk)
        self.finish_weight_update()
