"""What travels between a trainer and a rollout server: prepared prompts in, rollouts out.

A generate request is one safetensors blob (no pickle): per prompt its token ids, vision
tensors and decoded pixels (so an engine that preprocesses itself, like vLLM, gets the exact
images and frames the trainer saw), plus a JSON header with the prompt texts and the sampling
settings. The reply is JSON.

A server checks a request against its ``RequestLimits`` and the model's vocabulary before
anything reaches the engine (``decode_generate_request``): an out-of-range token id indexes
past the embedding table, which on a GPU is a device-side assert that poisons the CUDA
context for every later request.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ume_retriever.model.preprocess import PreparedInput

from .generator import Rollout
from .weight_sync import from_bytes, to_bytes


@dataclass
class SamplingRequest:
    num_generations: int
    seeds: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


API_KEY_ENV = "UME_ROLLOUT_API_KEY"  # where the server and the trainers find the key by default

# The largest single tensor a weight sync sends travels alone in one request: for a 7B model
# (Qwen2-VL-7B) its embeddings, 152,064 x 3,584 in bf16 = 1.09 GB. The default leaves room.
DEFAULT_MAX_BODY_BYTES = 2 * 2**30


@dataclass(frozen=True)
class RequestLimits:
    """What a rollout server accepts in one request; anything outside is refused (400; 413 for
    the body size) before it reaches the engine."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_prompts: int = 4096  # per generate request
    max_num_generations: int = 256
    max_new_tokens: int = 32768
    max_temperature: float = 100.0
    max_images_per_prompt: int = 64

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"RequestLimits.{name} must be > 0, got {value!r}")


MAX_SEED = 2**63  # seeds are in [0, MAX_SEED): what torch.manual_seed and vLLM both take


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sampling(sampling: SamplingRequest, num_prompts: int, limits: RequestLimits) -> None:
    """``ValueError`` naming the setting when a generate request's sampling is out of bounds."""
    def bounded(name: str, value: Any, low: int, high: int) -> None:
        if not _int(value) or not low <= value <= high:
            raise ValueError(f"generate request: {name} must be an integer in [{low}, {high}], got {value!r}")

    bounded("the number of prompts", num_prompts, 1, limits.max_prompts)
    bounded("num_generations", sampling.num_generations, 1, limits.max_num_generations)
    bounded("max_new_tokens", sampling.max_new_tokens, 1, limits.max_new_tokens)
    t, p = sampling.temperature, sampling.top_p
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or not 0 < t <= limits.max_temperature:
        raise ValueError(f"generate request: temperature must be in (0, {limits.max_temperature}], got {t!r}")
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p) or not 0 < p <= 1:
        raise ValueError(f"generate request: top_p must be in (0, 1], got {p!r}")
    if not isinstance(sampling.seeds, list) or len(sampling.seeds) != num_prompts:
        count = len(sampling.seeds) if isinstance(sampling.seeds, list) else type(sampling.seeds).__name__
        raise ValueError(f"generate request: {num_prompts} prompts but {count} seeds")
    bad = next((s for s in sampling.seeds if not _int(s) or not 0 <= s < MAX_SEED), None)
    if bad is not None:
        raise ValueError(f"generate request: seeds must be integers in [0, 2**63), got {bad!r}")


def check_prompt_tensors(i: int, tensors: dict[str, torch.Tensor], header: dict[str, Any], vocab_size: int | None,
                         limits: RequestLimits) -> None:
    """``ValueError`` when prompt ``i``'s tensors could make the engine index out of bounds: token
    ids outside [0, vocab_size), token types outside 0-2, a ``<disc_emb>`` position past the
    end, vision tensors whose rows disagree with their grids."""
    ids = tensors.get(f"{i}.input_ids")
    if ids is None:
        raise ValueError(f"generate request: prompt {i} has no input_ids")
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"generate request: prompt {i}: input_ids must be a non-empty 1-d integer tensor, "
                         f"got {ids.dtype} of shape {tuple(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        raise ValueError(f"generate request: prompt {i}: token id {bad} is outside the model's vocabulary "
                         f"(0..{vocab_size - 1 if vocab_size is not None else 'N'})")
    mm = tensors.get(f"{i}.mm_token_type_ids")
    if mm is not None and (mm.shape != ids.shape or mm.dtype not in (torch.int64, torch.int32)
                           or int(mm.min()) < 0 or int(mm.max()) > 2):
        raise ValueError(f"generate request: prompt {i}: mm_token_type_ids must be 0/1/2 and as long as input_ids")
    if not isinstance(header.get("prompt"), str) or not isinstance(header.get("video"), bool):
        raise ValueError(f"generate request: prompt {i}: header needs 'prompt' (a string) and 'video' (true/false)")
    position = header.get("disc_position")
    if not _int(position) or not 0 <= position < ids.numel():
        raise ValueError(f"generate request: prompt {i}: disc_position {position!r} is not a position of its input_ids")
    images = header.get("images")
    if not _int(images) or not 0 <= images <= limits.max_images_per_prompt:
        raise ValueError(f"generate request: prompt {i}: images must be an integer in [0, {limits.max_images_per_prompt}]")
    vision = header.get("vision")
    if not isinstance(vision, list) or not set(vision) <= {"pixel_values", "image_grid_thw", "pixel_values_videos",
                                                          "video_grid_thw"}:
        raise ValueError(f"generate request: prompt {i}: unknown vision tensors {vision!r}")
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if (pixels in vision) != (grid in vision):
            raise ValueError(f"generate request: prompt {i}: {pixels} and {grid} come together")
        if grid not in vision:
            continue
        g, x = tensors[f"{i}.vision.{grid}"], tensors[f"{i}.vision.{pixels}"]
        if g.dim() != 2 or g.shape[1] != 3 or g.dtype not in (torch.int64, torch.int32) or int(g.min()) < 1:
            raise ValueError(f"generate request: prompt {i}: {grid} must be (n, 3) positive integers")
        if x.dim() != 2 or x.shape[0] != int(g.prod(dim=1).sum()):
            raise ValueError(f"generate request: prompt {i}: {pixels} has {tuple(x.shape)} rows for a grid of "
                             f"{int(g.prod(dim=1).sum())} patches")


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB")))  # (H, W, 3) uint8, a writable copy


def encode_generate_request(prompts: list[PreparedInput], sampling: SamplingRequest) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    header: list[dict[str, Any]] = []
    for i, p in enumerate(prompts):
        tensors[f"{i}.input_ids"] = p.input_ids
        if p.mm_token_type_ids is not None:
            tensors[f"{i}.mm_token_type_ids"] = p.mm_token_type_ids
        for key, value in p.vision.items():
            tensors[f"{i}.vision.{key}"] = value
        for j, image in enumerate(p.images):
            tensors[f"{i}.image.{j}"] = _pixels(image)
        if p.video is not None:
            tensors[f"{i}.video"] = torch.stack([_pixels(f) for f in p.video])
        header.append({"prompt": p.prompt, "disc_position": p.disc_position, "images": len(p.images),
                       "vision": sorted(p.vision), "video": p.video is not None})
    return to_bytes(tensors, {"prompts": header, "sampling": asdict(sampling)})


def decode_generate_request(blob: bytes, *, vocab_size: int | None = None,
                            limits: RequestLimits | None = None) -> tuple[list[PreparedInput], SamplingRequest]:
    """The prompts and sampling of a generate request, checked (``check_sampling``,
    ``check_prompt_tensors``); ``ValueError``/``KeyError``/``TypeError`` say what is wrong."""
    limits = limits or RequestLimits()
    tensors, meta = from_bytes(blob)
    if not isinstance(meta, dict) or not isinstance(meta.get("prompts"), list) or not isinstance(meta.get("sampling"), dict):
        raise ValueError("generate request: header has no 'prompts' and 'sampling'")
    sampling = SamplingRequest(**meta["sampling"])
    check_sampling(sampling, len(meta["prompts"]), limits)
    for i, h in enumerate(meta["prompts"]):
        if not isinstance(h, dict):
            raise ValueError(f"generate request: prompt {i}: header must be an object")
        check_prompt_tensors(i, tensors, h, vocab_size, limits)
    prompts = []
    for i, h in enumerate(meta["prompts"]):
        video = tensors.get(f"{i}.video") if h["video"] else None
        prompts.append(PreparedInput(
            prompt=h["prompt"], input_ids=tensors[f"{i}.input_ids"],
            mm_token_type_ids=tensors.get(f"{i}.mm_token_type_ids"),
            vision={k: tensors[f"{i}.vision.{k}"] for k in h["vision"]},
            images=[Image.fromarray(tensors[f"{i}.image.{j}"].numpy()) for j in range(h["images"])],
            video=None if video is None else [Image.fromarray(f.numpy()) for f in video],
            disc_position=h["disc_position"],
        ))
    return prompts, sampling


def encode_rollouts(rollouts: list[list[Rollout]]) -> dict[str, Any]:
    return {"rollouts": [[asdict(r) for r in group] for group in rollouts]}


def decode_rollouts(reply: dict[str, Any]) -> list[list[Rollout]]:
    return [[Rollout(**r) for r in group] for group in reply["rollouts"]]


def config_fingerprint(config: Any) -> dict[str, Any]:
    """What must agree between the trainer's model and the server's before weights can be synced."""
    text = getattr(config, "text_config", config)
    vision = getattr(config, "vision_config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "vision_depth": getattr(vision, "depth", None),
    }
