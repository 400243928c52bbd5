"""The published checkpoint layout: writing it, its chat template, and the processor's pixel caps.

``zhibinlan/UME-R1-2B`` (saved by transformers 4.x) keeps each component in its own file:
``config.json``, safetensors weights, ``generation_config.json``, tokenizer files,
``preprocessor_config.json`` and ``chat_template.json``; no ``processor_config.json``.
The tiny test models and ``ume_train``'s checkpoints are written through ``save_published_layout``
so that every checkpoint loads through the same ``from_pretrained`` path.

The pixel caps (an image's min/max pixels) decide its visual-token grid: the encoder, the
index, the trainers and the rollout server read and set them here, one way.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

# Qwen2-VL's default max_pixels (28*28 pixels per visual token, 1280 tokens).
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
_SUB_PROCESSORS = ("image_processor", "video_processor")


def chat_template() -> str:
    """The Qwen2-VL chat template (shipped as a file next to this module)."""
    return resources.files(__package__).joinpath("chat_template.jinja").read_text()


def save_published_layout(model: Any, processor: Any, path: str | Path, state_dict: dict | None = None) -> Path:
    """Write a Qwen2-VL model and its processor as the published checkpoints are laid out."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    template = getattr(processor, "chat_template", None) or chat_template()
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    return path


def pixel_caps(processor: Any) -> dict[str, list]:
    """The image/video processors' ``[min, max]`` pixels (``size`` shortest/longest edge)."""
    caps = {}
    for name in _SUB_PROCESSORS:
        size = getattr(getattr(processor, name, None), "size", None)
        if size is not None:
            size = dict(size)
            caps[name] = [size.get("shortest_edge"), size.get("longest_edge")]
    return caps


def max_image_pixels(processor: Any) -> int:
    """The most pixels the image processor keeps per image (Qwen2-VL's default when unset)."""
    cap = pixel_caps(processor).get("image_processor", [None, None])[1]
    return int(cap or DEFAULT_MAX_PIXELS)


def set_pixel_caps(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Override the image/video processors' pixel caps (None leaves a cap as it is)."""
    if min_pixels is None and max_pixels is None:
        return
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} is above max_pixels={max_pixels}")
    for name in _SUB_PROCESSORS:
        sub = getattr(processor, name, None)
        if sub is None or getattr(sub, "size", None) is None:
            continue
        size = {k: v for k, v in dict(sub.size).items() if v is not None}
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        try:
            sub.size = type(sub.size)(**size)
        except TypeError:  # a plain dict in some transformers versions
            sub.size = size
