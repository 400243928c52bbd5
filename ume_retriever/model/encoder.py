"""``UMEEncoder``: discriminative and generative UME-R1 embeddings from a checkpoint."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence, overload

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, InputError
from ..inputs.item import InputLike, Item, as_item
from ..inputs.media import DEFAULT_MAX_DECODE_PIXELS, DEFAULT_NUM_FRAMES
from ..results import EncodeResult, GenOutcome, GenSample
from .checkpoint import set_pixel_caps
from .backends import BatchOutput, GenerationBackend, SamplingParams, TransformersBackend
from .preprocess import InputPreparer, PreparedInput
from .tokens import UMETokenIds, resolve_token_ids

logger = logging.getLogger(__name__)

Mode = Literal["disc", "gen", "both"]
Output = Literal["numpy", "list"]
# RL rollouts were at most 2048 new tokens; the paper's evaluation allowed up to 8192.
DEFAULT_MAX_NEW_TOKENS = 2048
_SINGLE_TYPES = (Item, str, bytes, bytearray, dict, os.PathLike)


def fit_to_context(
    context: int, max_new_tokens: int, max_input_tokens: int | None, shortest: int, name: str = "the checkpoint"
) -> tuple[int, int]:
    """``(max_new_tokens, max_input_tokens)`` that fit a context of ``context`` positions, for
    prompts of at least ``shortest`` tokens.

    Without ``max_input_tokens``, the input gets what generation leaves, and a
    ``max_new_tokens`` above half the context is lowered to half (to the context minus the
    shortest prompt if that is less), with one warning. With both given, a sum above the
    context lowers ``max_new_tokens`` (warned). ``CheckpointError`` when the context cannot
    hold the shortest prompt plus one generated token.
    """
    for label, value in (("max_new_tokens", max_new_tokens), ("max_input_tokens", max_input_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    where = f"{name}: its context of {context} positions (max_position_embeddings)"
    if shortest >= context:
        raise CheckpointError(f"{where} cannot hold the shortest prompt ({shortest} tokens) and any reasoning: "
                              "use a checkpoint with a longer context")
    if max_input_tokens is None:
        fitted = min(max_new_tokens, context // 2, context - shortest)
        room = context - fitted
    elif max_input_tokens >= context:
        raise ValueError(f"max_input_tokens={max_input_tokens} leaves no room for reasoning in {where}: use at most "
                         f"{context - 1} (and at least {shortest}, the shortest prompt)")
    else:
        fitted, room = min(max_new_tokens, context - max_input_tokens), max_input_tokens
        if room < shortest:  # asked for: each input then fails with that limit named (not refused here)
            logger.warning("%s: max_input_tokens=%d is below the shortest prompt (%d tokens): every input will fail",
                           name, room, shortest)
    if fitted != max_new_tokens:
        logger.warning(
            "%s: max_new_tokens=%d does not fit with room for the input: using max_new_tokens=%d and "
            "max_input_tokens=%d. To choose the split, pass max_new_tokens=N and max_input_tokens=M with "
            "N + M <= %d and M >= %d, the shortest prompt (reasoning longer than N is cut; inputs longer than M "
            "have their text truncated).", where, max_new_tokens, fitted, room, context, shortest,
        )
    return fitted, room


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class EncoderRecipe:
    """How an encoder was loaded (``UMEEncoder.from_pretrained``'s arguments): another process,
    e.g. a Ray actor, loads the same encoder from it."""

    name_or_path: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self, **overrides: Any) -> "UMEEncoder":
        """The encoder again; ``overrides`` (``device``, ``dtype``, ...) replace recorded arguments."""
        return UMEEncoder.from_pretrained(self.name_or_path, **{**self.kwargs, **overrides})


class UMEEncoder:
    """Encodes text, images, videos and mixes into UME-R1 disc and gen vectors.

    Build it with :meth:`from_pretrained`. ``encode`` batches inputs by length, isolates bad
    inputs (an error on that input's result, never a lost batch) and returns one
    :class:`~ume_retriever.results.EncodeResult` per input, in input order.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name_or_path: str = "<in-memory>",
        revision: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_input_tokens: int | None = None,
        num_video_frames: int = DEFAULT_NUM_FRAMES,
        blank_image_for_text: bool = True,
        max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
        backend: GenerationBackend | None = None,
        config: Any = None,
        generation_config: Any = None,
    ):
        """``model`` may be None when a ``backend`` that holds its own model is given (vLLM);
        ``config``/``generation_config`` then describe the checkpoint."""
        if model is None and backend is None:
            raise ValueError("UMEEncoder needs a model or a backend")
        self.model = model
        self.processor = processor
        self.name_or_path = name_or_path
        self.revision = revision
        self.batch_size = batch_size
        self.config = config if config is not None else model.config
        self.generation_config = generation_config if generation_config is not None else getattr(model, "generation_config", None)
        self.token_ids: UMETokenIds = resolve_token_ids(processor.tokenizer, self.generation_config, name_or_path)
        text_config = getattr(self.config, "text_config", self.config)
        context = int(text_config.max_position_embeddings)
        self.preparer = InputPreparer(
            processor,
            self.token_ids,
            max_input_tokens=context,  # set below, once the split of the context is known
            num_video_frames=num_video_frames,
            blank_image_for_text=blank_image_for_text,
            max_decode_pixels=max_decode_pixels,
        )
        self.max_new_tokens, self.preparer.max_input_tokens = fit_to_context(
            context, max_new_tokens, max_input_tokens, self.preparer.shortest_prompt_length(), name_or_path)
        self.backend: GenerationBackend = backend or TransformersBackend(model, processor, self.token_ids)
        # One model call at a time: the gen read-out hooks the shared model, and a concurrent
        # forward from another thread (e.g. a search during an ingest) would feed that hook.
        self._model_lock = threading.Lock()
        # set by from_pretrained: how to load this encoder elsewhere (None: built from objects)
        self.recipe: EncoderRecipe | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = "sdpa",
        revision: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        backend: Literal["transformers", "vllm"] = "transformers",
        vllm_kwargs: dict[str, Any] | None = None,
        **encoder_kwargs: Any,
    ) -> "UMEEncoder":
        """Load a UME-R1 checkpoint: a hub name (e.g. ``zhibinlan/UME-R1-2B``) or a local directory.

        ``dtype`` defaults to bfloat16 on CUDA and float32 on CPU. ``min_pixels``/``max_pixels``
        override the processor's image caps (the paper evaluates with max 2,359,296).
        Other keyword arguments go to the constructor (batch_size, max_new_tokens, ...).
        Weights load from safetensors only and remote code is never trusted.
        ``backend="vllm"`` (experimental, ``vllm`` extra) runs generation and pooling in vLLM
        engines built with ``vllm_kwargs``; no transformers weights are loaded then.
        """
        from transformers import AutoConfig, AutoProcessor, GenerationConfig, Qwen2VLForConditionalGeneration

        source = os.fspath(name_or_path)
        if os.path.isdir(source):  # indexes record the model: a local folder by its absolute path
            source = os.path.abspath(source)
        recipe = EncoderRecipe(source, {
            "device": None if device is None else str(device), "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
            "attn_implementation": attn_implementation, "revision": revision, "min_pixels": min_pixels,
            "max_pixels": max_pixels, "backend": backend, "vllm_kwargs": vllm_kwargs, **encoder_kwargs})
        if backend == "vllm":
            from .vllm_backend import VLLMBackend

            processor = AutoProcessor.from_pretrained(source, revision=revision, trust_remote_code=False)
            processor.tokenizer.padding_side = "left"
            set_pixel_caps(processor, min_pixels, max_pixels)
            config = AutoConfig.from_pretrained(source, revision=revision)
            gen_config = GenerationConfig.from_pretrained(source, revision=revision)
            token_ids = resolve_token_ids(processor.tokenizer, gen_config, source)
            kwargs = dict(vllm_kwargs or {})
            if dtype is not None:
                kwargs.setdefault("dtype", str(dtype).replace("torch.", ""))
            if revision is not None:
                kwargs.setdefault("revision", revision)
            mm_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
            if mm_kwargs:
                kwargs.setdefault("mm_processor_kwargs", mm_kwargs)
            vllm_backend = VLLMBackend(
                source, processor.tokenizer, token_ids,
                repetition_penalty=getattr(gen_config, "repetition_penalty", None) or 1.0, **kwargs,
            )
            encoder = cls(None, processor, name_or_path=source, revision=revision, backend=vllm_backend,
                          config=config, generation_config=gen_config, **encoder_kwargs)
            encoder.recipe = recipe
            return encoder
        if backend != "transformers":
            raise ValueError(f"backend must be 'transformers' or 'vllm', got {backend!r}")
        device = torch.device(device) if device is not None else _default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        model = Qwen2VLForConditionalGeneration.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=attn_implementation,
            revision=revision,
            use_safetensors=True,
            trust_remote_code=False,
        )
        model.to(device).eval()
        processor = AutoProcessor.from_pretrained(source, revision=revision, trust_remote_code=False)
        processor.tokenizer.padding_side = "left"
        set_pixel_caps(processor, min_pixels, max_pixels)
        logger.info("loaded %s on %s (%s, %s)", source, device, dtype, attn_implementation)
        encoder = cls(model, processor, name_or_path=source, revision=revision, **encoder_kwargs)
        encoder.recipe = recipe
        return encoder

    @property
    def embedding_dim(self) -> int:
        """Size of both the disc and the gen vectors (the LLM hidden size)."""
        text_config = getattr(self.config, "text_config", self.config)
        return int(text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        if self.model is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return next(self.model.parameters()).device

    def prepare(self, item: InputLike) -> PreparedInput:
        """The tokenised prompt and vision tensors for one input (raises ``InputError``)."""
        return self.preparer.prepare(as_item(item))

    @overload
    def encode(self, inputs: InputLike, mode: Mode = ..., **kwargs: Any) -> EncodeResult: ...
    @overload
    def encode(self, inputs: Sequence[InputLike], mode: Mode = ..., **kwargs: Any) -> list[EncodeResult]: ...

    def encode(
        self,
        inputs: InputLike | Sequence[InputLike],
        mode: Mode = "disc",
        *,
        batch_size: int | None = None,
        output: Output = "numpy",
        show_progress: bool = False,
        num_samples: int = 1,
        do_sample: bool | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        generation_kwargs: dict[str, Any] | None = None,
    ) -> EncodeResult | list[EncodeResult]:
        """Embed inputs. One input in gives one result; a sequence gives a list, in order.

        mode: "disc" (one forward pass), "gen" (reason, then embed) or "both".
        Gen decoding is greedy unless ``do_sample`` (default: True when ``num_samples > 1``);
        sampling uses ``temperature``/``top_p``/``seed``. ``generation_kwargs`` go to the
        backend's generate call (e.g. ``logits_processor``). ``output="list"`` gives python floats.
        """
        single = isinstance(inputs, _SINGLE_TYPES) or hasattr(inputs, "convert")
        batch_inputs: Sequence[Any] = [inputs] if single else list(inputs)  # type: ignore[arg-type]
        sampling = self._sampling(mode, num_samples, do_sample, temperature, top_p, seed, max_new_tokens)
        if sampling is not None and generation_kwargs:
            sampling.generation_kwargs = dict(generation_kwargs)
        results = [EncodeResult(index=i) for i in range(len(batch_inputs))]
        items: dict[int, Item] = {}
        for i, value in enumerate(batch_inputs):
            try:
                items[i] = as_item(value)
            except InputError as exc:
                self._fail(results[i], exc)
        want_disc = mode in ("disc", "both")
        # Inputs are fully prepared (decoded, processed) one batch at a time, so memory holds
        # one batch of pixel tensors whatever the number of inputs; sorting uses cheap estimates.
        for indices in self._batches(items, batch_size or self.batch_size, show_progress):
            prepared: dict[int, PreparedInput] = {}
            for i in indices:
                try:
                    prepared[i] = self.preparer.prepare(items[i])
                except InputError as exc:
                    self._fail(results[i], exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - a malformed input fails alone
                    self._fail(results[i], InputError(f"input {i}", f"cannot prepare it ({type(exc).__name__}: {exc})"))
                    continue
                results[i].truncated = prepared[i].truncated
                results[i].warnings.extend(prepared[i].warnings)
            if prepared:
                self._run_isolated(list(prepared), prepared, want_disc, sampling, results, output)
        return results[0] if single else results

    # -- internals -------------------------------------------------------------------------

    def _sampling(
        self, mode: str, num_samples: int, do_sample: bool | None, temperature: float,
        top_p: float, seed: int | None, max_new_tokens: int | None,
    ) -> SamplingParams | None:
        if mode not in ("disc", "gen", "both"):
            raise ValueError(f"mode must be 'disc', 'gen' or 'both', got {mode!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if do_sample is None:
            do_sample = num_samples > 1
        if num_samples > 1 and not do_sample:
            raise ValueError("num_samples > 1 needs do_sample=True (greedy decoding gives one chain)")
        if mode == "disc":
            return None
        return SamplingParams(
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            num_samples=num_samples,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )

    @staticmethod
    def _fail(result: EncodeResult, exc: InputError) -> None:
        result.error = exc.at(result.index)
        logger.warning("skipping %s", result.error)

    def _batches(self, items: dict[int, Item], batch_size: int, show_progress: bool) -> Iterable[list[int]]:
        """Longest first (as sentence-transformers does): padding stays small, OOM shows early."""
        from tqdm.auto import tqdm

        lengths = {i: self.preparer.estimate_length(item) for i, item in items.items()}
        order = sorted(items, key=lambda i: -lengths[i])
        with tqdm(total=len(order), desc="encoding", unit="input", disable=not show_progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                yield chunk
                bar.update(len(chunk))

    def _run_isolated(
        self, indices: list[int], prepared: dict[int, PreparedInput], want_disc: bool,
        sampling: SamplingParams | None, results: list[EncodeResult], output: Output,
    ) -> None:
        """Run one batch; if it fails, retry its inputs one by one so only the culprit fails."""
        failure: Exception | None = None
        try:
            with self._model_lock, torch.inference_mode():
                out = self.backend.run([prepared[i] for i in indices], want_disc, sampling)
        except Exception as exc:  # noqa: BLE001 - any model failure is isolated per input
            failure = exc
        if failure is not None:
            # Retried outside the except block: its traceback would keep the failed batch's
            # tensors (activations, KV cache) alive during the retries.
            message = f"{type(failure).__name__}: {failure}"
            del failure
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(indices) == 1:
                results[indices[0]].error = InputError(f"input {indices[0]}", f"the model failed on it ({message})",
                                                       indices[0])
                logger.warning("%s", results[indices[0]].error)
                return
            logger.warning("batch of %d failed (%s); retrying its inputs one by one", len(indices), message)
            for i in indices:
                self._run_isolated([i], prepared, want_disc, sampling, results, output)
            return
        self._fill(indices, out, results, output)

    def _fill(self, indices: list[int], out: BatchOutput, results: list[EncodeResult], output: Output) -> None:
        def convert(v: torch.Tensor) -> Any:
            arr = F.normalize(v.float(), dim=-1).numpy().astype(np.float32)
            return arr.tolist() if output == "list" else arr

        for row, i in enumerate(indices):
            res = results[i]
            if out.disc is not None:
                res.disc = convert(out.disc[row])
            if out.gen is not None:
                res.samples = [
                    GenSample(
                        vector=convert(s.state),
                        reasoning=self.backend.decode(s.token_ids),
                        outcome=GenOutcome.OK if s.found_gen_emb else GenOutcome.NO_GEN_EMB,
                        num_tokens=s.num_tokens,
                    )
                    for s in out.gen[row]
                ]
                first = res.samples[0]
                res.gen, res.reasoning, res.gen_outcome = first.vector, first.reasoning, first.outcome
                if first.fallback:
                    res.warnings.append(
                        f"no <gen_emb> in the completion ({first.num_tokens} tokens): gen vector "
                        "taken from the last generated step (reference fallback)"
                    )
