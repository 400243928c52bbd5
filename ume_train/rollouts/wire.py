"""What travels between a trainer and a rollout server: prepared prompts in, rollouts out.

A generate request is one safetensors blob (no pickle): per prompt its token ids, vision
tensors and decoded pixels (so an engine that preprocesses itself, like vLLM, gets the exact
images and frames the trainer saw), plus a JSON header with the prompt texts and the sampling
settings. The reply is JSON.
"""

from __future__ import annotations

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


def decode_generate_request(blob: bytes) -> tuple[list[PreparedInput], SamplingRequest]:
    tensors, meta = from_bytes(blob)
    if not meta or "prompts" not in meta or "sampling" not in meta:
        raise ValueError("generate request: header has no 'prompts' and 'sampling'")
    sampling = SamplingRequest(**meta["sampling"])
    if len(sampling.seeds) != len(meta["prompts"]):
        raise ValueError(f"generate request: {len(meta['prompts'])} prompts but {len(sampling.seeds)} seeds")
    prompts = []
    for i, h in enumerate(meta["prompts"]):
        if f"{i}.input_ids" not in tensors:
            raise ValueError(f"generate request: prompt {i} has no input_ids")
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
