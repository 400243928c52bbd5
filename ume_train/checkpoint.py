"""Loading a model to train and saving checkpoints in the layout ``UMEEncoder.from_pretrained`` reads.

The layout is the published one (see ``ume_retriever.model.checkpoint``): ``config.json``,
``model.safetensors``, ``generation_config.json``, tokenizer files,
``preprocessor_config.json`` and ``chat_template.json``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ume_retriever.model.prompt import DISC_TOKEN, GEN_TOKEN, NEW_TOKEN_INIT_SOURCES
from ume_retriever.model.checkpoint import save_published_layout, set_pixel_caps

logger = logging.getLogger(__name__)


def load_for_training(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
    min_pixels: int | None = None, max_pixels: int | None = None,
) -> tuple[nn.Module, Any]:
    """(model, processor) from a UME-R1 or Qwen2-VL checkpoint; adds the UME tokens when missing."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True,
        trust_remote_code=False,
    )
    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=False)
    processor.tokenizer.padding_side = "left"
    set_pixel_caps(processor, min_pixels, max_pixels)
    ensure_ume_tokens(model, processor)
    return model, processor


def ensure_ume_tokens(model: nn.Module, processor: Any) -> bool:
    """Add ``<gen_emb>``/``<disc_emb>`` to a plain Qwen2-VL model, initialised as the paper does
    (copies of ``<|object_ref_end|>`` / ``<|object_ref_start|>``). Returns True when added."""
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    missing = [t for t in (GEN_TOKEN, DISC_TOKEN) if t not in vocab]
    if not missing:
        return False
    tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for token in missing:
            emb[tokenizer.convert_tokens_to_ids(token)] = emb[tokenizer.convert_tokens_to_ids(NEW_TOKEN_INIT_SOURCES[token])]
    logger.info("added %s to the vocabulary (initialised as in the paper)", ", ".join(missing))
    return True


def save_checkpoint(model: nn.Module, processor: Any, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (a Qwen2-VL model; PEFT adapters merged in) and ``processor`` to ``path``."""
    if hasattr(model, "merge_and_unload"):  # PEFT: the encoder loads plain weights
        model = copy.deepcopy(model).merge_and_unload()
        state_dict = None
    return save_published_layout(model, processor, path, state_dict)
