"""Generation backends: what turns a batch of prepared inputs into disc and gen vectors.

``TransformersBackend`` is the default. ``ume_retriever.model.vllm_backend.VLLMBackend``
implements the same protocol behind the ``vllm`` extra.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .preprocess import PreparedInput, collate
from .tokens import UMETokenIds

logger = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """How to decode the reasoning. Greedy unless ``do_sample``."""

    max_new_tokens: int
    num_samples: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    # Extra keyword arguments for the backend's generate call (e.g. a transformers
    # ``logits_processor`` for constrained decoding).
    generation_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RawGenSample:
    """One decoded completion and the last-layer state read for it (not normalised)."""

    state: torch.Tensor  # (H,) float32, on CPU
    token_ids: list[int]  # generated ids up to the end-of-turn token (excluded)
    found_gen_emb: bool
    num_tokens: int  # generated tokens, end-of-turn included
    end_id: int | None = None  # the end-of-turn token that ended it (None: cut at max_new_tokens)


@dataclass
class BatchOutput:
    disc: torch.Tensor | None  # (B, H) float32 on CPU, not normalised
    gen: list[list[RawGenSample]] | None  # per input, num_samples each


class GenerationBackend(Protocol):
    """Computes raw (un-normalised) disc and/or gen states for one batch."""

    def run(self, batch: list[PreparedInput], want_disc: bool, sampling: SamplingParams | None) -> BatchOutput: ...

    def decode(self, token_ids: list[int]) -> str: ...


class _LastLayerRecorder:
    """Forward hook on the LLM's final norm (whose output is the last-layer hidden state).

    Per forward call it keeps only the LAST position's state, (B, H): during KV-cached decoding
    call t (t >= 1) processes generated token t-1, so ``steps[t]`` is that token's state. At the
    first call (the prefill over the prompt) it can also gather states at given positions.
    The reference implementation keeps every layer at every step instead.
    """

    def __init__(self, norm: torch.nn.Module, gather_positions: torch.Tensor | None = None):
        self.norm = norm
        self.gather_positions = gather_positions
        self.gathered: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []
        self._handle: Any = None

    def _hook(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        if not self.steps and self.gather_positions is not None:
            rows = torch.arange(output.shape[0], device=output.device)
            self.gathered = output[rows, self.gather_positions.to(output.device)].float()
        # clone: a view would keep the whole (B, L, H) prefill output alive during decoding
        self.steps.append(output[:, -1, :].clone())

    def __enter__(self) -> "_LastLayerRecorder":
        self._handle = self.norm.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def find_final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The language model's final RMSNorm in a Qwen2-VL model (layouts differ across versions)."""
    for path in ("model.language_model.norm", "model.norm", "language_model.model.norm"):
        module: Any = model
        try:
            for name in path.split("."):
                module = getattr(module, name)
        except AttributeError:
            continue
        return module
    raise AttributeError(f"cannot find the language model's final norm in {type(model).__name__}")


def _move(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


class TransformersBackend:
    """Disc and gen vectors with a transformers ``Qwen2VLForConditionalGeneration``."""

    def __init__(self, model: Any, processor: Any, token_ids: UMETokenIds):
        self.model = model
        self.processor = processor
        self.token_ids = token_ids
        self.norm = find_final_norm(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def decode(self, token_ids: list[int]) -> str:
        return self.processor.tokenizer.decode(token_ids, skip_special_tokens=False)

    def last_layer_at_end(self, batch: list[PreparedInput], stop_after_disc: bool) -> torch.Tensor:
        """One forward pass; the last-layer state at each sequence's last token, (B, H) float32."""
        inputs = _move(collate(batch, self.token_ids.pad, stop_after_disc=stop_after_disc), self.device)
        # The base model skips the LM head: no (B, L, vocab) logits for a single vector.
        hidden = self.model.model(**inputs, use_cache=False).last_hidden_state  # (B, L, H)
        return hidden[:, -1, :].float().cpu()  # left padding: the last column is every row's end

    def run(self, batch: list[PreparedInput], want_disc: bool, sampling: SamplingParams | None) -> BatchOutput:
        if sampling is None:
            return BatchOutput(disc=self.last_layer_at_end(batch, stop_after_disc=True), gen=None)
        return self._generate(batch, want_disc, sampling)

    def _generation_config(self, sampling: SamplingParams) -> Any:
        from transformers import GenerationConfig

        base = self.model.generation_config
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.num_samples,
            eos_token_id=list(self.token_ids.eos),
            pad_token_id=self.token_ids.pad,
            bos_token_id=getattr(base, "bos_token_id", None),
            # The checkpoint's repetition penalty is part of how the published model decodes.
            repetition_penalty=getattr(base, "repetition_penalty", None) or 1.0,
            # The read-out assumes one forward per generated token on un-reordered rows.
            num_beams=1,
            return_dict_in_generate=False,
        )
        # Unset (None) fields are filled from the checkpoint's generation config by generate(),
        # so every sampling field is set explicitly: the checkpoint's top_k=1 / temperature=0.01
        # would otherwise turn sampling back into greedy.
        if sampling.do_sample:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)  # neutral values
        return GenerationConfig(**kwargs)

    def _generate(self, batch: list[PreparedInput], want_disc: bool, sampling: SamplingParams) -> BatchOutput:
        k = sampling.num_samples
        inputs = _move(collate(batch, self.token_ids.pad), self.device)
        prompt_len = inputs["input_ids"].shape[1]
        gather = None
        if want_disc:  # the prefill already computes the prompt: read <disc_emb> there for free
            pads = prompt_len - torch.tensor([len(p) for p in batch])
            gather = (pads + torch.tensor([p.disc_position for p in batch])).repeat_interleave(k)
        config = self._generation_config(sampling)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with _LastLayerRecorder(self.norm, gather) as rec:
                sequences = self.model.generate(**inputs, generation_config=config, **sampling.generation_kwargs)
        generated = sequences[:, prompt_len:].cpu()  # (B*k, T)
        steps = len(rec.steps)
        if steps != generated.shape[1]:
            raise RuntimeError(f"generation ran {steps} forward passes for {generated.shape[1]} tokens: an option "
                               "(beam search, assisted or chunked decoding) breaks the gen read-out")
        samples: list[RawGenSample] = []
        needs_forward: list[int] = []  # rows whose <gen_emb> was the very last token produced
        for row in range(generated.shape[0]):
            ids = generated[row].tolist()
            end = len(ids)
            for pos, tok in enumerate(ids):
                if tok in self.token_ids.eos:
                    end = pos + 1
                    break
            body = ids[: end - 1] if end and ids[end - 1] in self.token_ids.eos else ids[:end]
            hits = [pos for pos in range(end) if ids[pos] == self.token_ids.gen]
            if hits:
                step = hits[0] + 1  # the call whose input token is the generated <gen_emb>
                found = True
            else:
                # The reference's fallback: the last step's state (the one that produced the
                # final token); defined per row so it does not depend on the batch.
                step = max(end - 1, 0)
                found = False
            if step < steps:
                state = rec.steps[step][row].float().cpu()
            else:
                state = torch.empty(0)
                needs_forward.append(row)
            end_id = ids[end - 1] if end and ids[end - 1] in self.token_ids.eos else None
            samples.append(RawGenSample(state=state, token_ids=body, found_gen_emb=found, num_tokens=end, end_id=end_id))
        if needs_forward:
            self._teacher_forced_states(batch, k, generated, samples, needs_forward)
        disc = rec.gathered[::k].cpu() if want_disc and rec.gathered is not None else None
        return BatchOutput(disc=disc, gen=[samples[i * k:(i + 1) * k] for i in range(len(batch))])

    def _teacher_forced_states(
        self, batch: list[PreparedInput], k: int, generated: torch.Tensor,
        samples: list[RawGenSample], rows: list[int],
    ) -> None:
        """State at <gen_emb> for rows where generation stopped right on it (never fed back)."""
        extended = []
        for row in rows:
            gen_pos = samples[row].token_ids.index(self.token_ids.gen)
            extended.append(batch[row // k].extended(generated[row, : gen_pos + 1]))
        states = self.last_layer_at_end(extended, stop_after_disc=False)
        for row, state in zip(rows, states):
            samples[row].state = state
