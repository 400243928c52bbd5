"""A vLLM generation backend (``pip install 'ume-r1[vllm]'``): EXPERIMENTAL.

vLLM runs a model either as a generator or as a pooler, so this backend holds two engines on
the same checkpoint: one generates the reasoning, the other returns last-token states
("LAST" pooling, unnormalised):
- disc: pool the prompt cut right after ``<disc_emb>`` (in a causal model the state there
  does not depend on what follows);
- gen: generate, then pool prompt + completion cut right after the first generated
  ``<gen_emb>`` (or, without one, cut before the last generated token: the reference's
  fallback, as in the transformers backend).
The completion goes back to vLLM as text, so a BPE re-tokenisation can differ from the
generated ids in rare cases; the parity test (tests/test_vllm_backend.py, GPU only) compares
the vectors with the transformers backend.

    enc = UMEEncoder.from_pretrained("zhibinlan/UME-R1-2B", backend="vllm",
                                     vllm_kwargs={"gpu_memory_utilization": 0.4})
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .backends import BatchOutput, RawGenSample, SamplingParams
from .preprocess import PreparedInput
from .prompt import DISC_TOKEN
from .tokens import UMETokenIds

logger = logging.getLogger(__name__)


def prompt_until_disc(prompt: str) -> str:
    """The prompt text up to and including its last ``<disc_emb>``."""
    cut = prompt.rfind(DISC_TOKEN)
    if cut < 0:
        raise ValueError("prompt has no <disc_emb> token")
    return prompt[: cut + len(DISC_TOKEN)]


def completion_ids_to_pool(token_ids: list[int], gen_id: int) -> tuple[list[int], bool]:
    """Ids of the completion to pool over, and whether ``<gen_emb>`` was found.

    ``token_ids`` are all generated tokens, end-of-turn included. With ``<gen_emb>``: everything
    up to and including the first one. Without: every generated token but the last (the state
    that produced the last token: the reference's fallback, as in the transformers backend).
    """
    body = list(token_ids)
    if gen_id in body:
        return body[: body.index(gen_id) + 1], True
    return body[:-1], False


def multimodal_data(p: PreparedInput) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if p.images:
        data["image"] = p.images if len(p.images) > 1 else p.images[0]
    if p.video is not None:
        data["video"] = np.stack([np.asarray(f) for f in p.video])  # (T, H, W, 3) uint8
    return data


class VLLMBackend:
    """Disc and gen vectors through vLLM engines (one generating, one pooling)."""

    def __init__(self, model_path: str, tokenizer: Any, token_ids: UMETokenIds, repetition_penalty: float = 1.0,
                 **llm_kwargs: Any):
        import vllm  # noqa: F401 - fail early with an ImportError if the extra is missing

        self.model_path = model_path
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self.repetition_penalty = repetition_penalty
        self.llm_kwargs = {"gpu_memory_utilization": 0.4, "limit_mm_per_prompt": {"image": 8, "video": 1}, **llm_kwargs}
        self._generator: Any = None
        self._pooler: Any = None

    def _engine(self, pooling: bool) -> Any:
        from vllm import LLM

        if pooling and self._pooler is None:
            from vllm.config import PoolerConfig

            # LAST pooling; the encoder L2-normalises afterwards either way.
            self._pooler = LLM(model=self.model_path, runner="pooling", convert="embed",
                               pooler_config=PoolerConfig(pooling_type="LAST"), **self.llm_kwargs)
        if not pooling and self._generator is None:
            self._generator = LLM(model=self.model_path, runner="generate", **self.llm_kwargs)
        return self._pooler if pooling else self._generator

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def _pool(self, prompts: list[dict[str, Any]]) -> torch.Tensor:
        outputs = self._engine(pooling=True).embed(prompts, use_tqdm=False)
        return torch.stack([torch.as_tensor(o.outputs.embedding, dtype=torch.float32) for o in outputs])

    def run(self, batch: list[PreparedInput], want_disc: bool, sampling: SamplingParams | None) -> BatchOutput:
        disc = None
        if want_disc:
            disc = self._pool([
                {"prompt": prompt_until_disc(p.prompt), "multi_modal_data": multimodal_data(p)} for p in batch
            ])
        if sampling is None:
            return BatchOutput(disc=disc, gen=None)
        if sampling.generation_kwargs:
            raise ValueError(f"the vLLM backend takes no generation_kwargs (got {sorted(sampling.generation_kwargs)})")
        from vllm import SamplingParams as VLLMSampling

        params = VLLMSampling(
            n=sampling.num_samples,
            temperature=sampling.temperature if sampling.do_sample else 0.0,
            top_p=sampling.top_p if sampling.do_sample else 1.0,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
            stop_token_ids=list(self.token_ids.eos),
            repetition_penalty=self.repetition_penalty,
            skip_special_tokens=False,
        )
        prompts = [{"prompt": p.prompt, "multi_modal_data": multimodal_data(p)} for p in batch]
        outputs = self._engine(pooling=False).generate(prompts, params, use_tqdm=False)
        per_input: list[list[RawGenSample]] = []
        pool_prompts: list[dict[str, Any]] = []
        for p, out in zip(batch, outputs):
            samples = []
            for completion in out.outputs:
                generated = list(completion.token_ids)
                if completion.finish_reason == "stop" and (not generated or generated[-1] not in self.token_ids.eos):
                    generated.append(self.token_ids.eos[0])  # count the stop token like transformers does
                upto, found = completion_ids_to_pool(generated, self.token_ids.gen)
                body = generated[:-1] if generated and generated[-1] in self.token_ids.eos else generated
                pool_prompts.append({"prompt": p.prompt + self.decode(upto), "multi_modal_data": multimodal_data(p)})
                samples.append(RawGenSample(state=torch.empty(0), token_ids=body, found_gen_emb=found,
                                            num_tokens=len(generated)))
            per_input.append(samples)
        states = self._pool(pool_prompts)
        flat = [s for samples in per_input for s in samples]
        for sample, state in zip(flat, states):
            sample.state = state
        return BatchOutput(disc=disc, gen=per_input)
