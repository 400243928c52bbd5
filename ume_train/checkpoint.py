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
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True,
        trust_remote_code=False,
    )
    processor = _load_processor(name_or_path, min_pixels, max_pixels)
    ensure_ume_tokens(model, processor)
    return model, processor


def load_training_processor(name_or_path: str, *, min_pixels: int | None = None,
                            max_pixels: int | None = None) -> Any:
    """The processor ``load_for_training`` gives, without loading any weights (the dry run
    prepares every record with it)."""
    processor = _load_processor(name_or_path, min_pixels, max_pixels)
    add_ume_tokens(processor.tokenizer)
    return processor


def training_preparer(name_or_path: str, processor: Any, *, max_new_tokens: int, num_video_frames: int) -> Any:
    """The ``InputPreparer`` that the trainers' ``UMEEncoder(model, processor, max_new_tokens=...,
    num_video_frames=...)`` builds, from the checkpoint's config files alone (no weights)."""
    from transformers import AutoConfig, GenerationConfig

    from ume_retriever.model.preprocess import InputPreparer
    from ume_retriever.model.tokens import resolve_token_ids

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    try:
        generation_config = GenerationConfig.from_pretrained(name_or_path)
    except OSError:  # no generation_config.json: transformers derives one from the config, as here
        generation_config = GenerationConfig.from_model_config(config)
    token_ids = resolve_token_ids(processor.tokenizer, generation_config, name_or_path)
    text_config = getattr(config, "text_config", config)
    return InputPreparer(processor, token_ids, max_input_tokens=int(text_config.max_position_embeddings) - max_new_tokens,
                         num_video_frames=num_video_frames)


def _load_processor(name_or_path: str, min_pixels: int | None, max_pixels: int | None) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=False)
    processor.tokenizer.padding_side = "left"
    set_pixel_caps(processor, min_pixels, max_pixels)
    return processor


def add_ume_tokens(tokenizer: Any) -> list[str]:
    """Add ``<gen_emb>``/``<disc_emb>`` to a tokenizer that lacks them; returns those added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (GEN_TOKEN, DISC_TOKEN) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def ensure_ume_tokens(model: nn.Module, processor: Any) -> bool:
    """Add ``<gen_emb>``/``<disc_emb>`` to a plain Qwen2-VL model, initialised as the paper does
    (copies of ``<|object_ref_end|>`` / ``<|object_ref_start|>``). Returns True when added."""
    tokenizer = processor.tokenizer
    missing = add_ume_tokens(tokenizer)
    if not missing:
        return False
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


# -- complete checkpoints and resuming -----------------------------------------------------------
#
# Trainer writes a ``checkpoint-N`` folder file by file (weights, optimizer, scheduler, RNG
# states, trainer_state.json); a kill in between leaves a folder that looks like a checkpoint.
# The trainers write COMPLETE_MARKER last, once every process has written its part: only a
# folder with the marker (and every file the marker lists, at its size) is complete.

COMPLETE_MARKER = "ume_checkpoint_complete.json"
CHECKPOINT_PREFIX = "checkpoint-"


def mark_complete(folder: str | Path, global_step: int) -> Path:
    """Write the completion marker of ``folder``: every file in it with its size. Written to a
    temporary name and renamed, so the marker itself is never half written."""
    import json
    import os

    folder = Path(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(COMPLETE_MARKER)}
    tmp = folder / f"{COMPLETE_MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"global_step": global_step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / COMPLETE_MARKER)
    return folder / COMPLETE_MARKER


def incomplete_reason(folder: str | Path) -> str | None:
    """None when ``folder`` is a complete checkpoint, else why it is not."""
    import json

    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER}: its save was cut short (or it predates completion markers)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable {COMPLETE_MARKER} ({exc})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} when the checkpoint was written"
    return None


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, by step (oldest first)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def last_complete_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint or None, [(newer incomplete folder, why)])."""
    skipped: list[tuple[Path, str]] = []
    for folder in reversed(checkpoint_folders(output_dir)):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    return None, skipped


def resolve_resume(value: str | bool | None, output_dir: str | Path) -> str | None:
    """What ``Trainer.train(resume_from_checkpoint=...)`` gets for ``value``.

    ``True``/``"true"``: the last COMPLETE checkpoint of ``output_dir`` (partial ones are skipped
    with a warning); an error when there is none. ``"auto"``: the same, but start from scratch
    when there is none (a job that is simply rerun after a preemption). A path: that folder (an
    error when it was cut off before its trainer state; a warning when it has no marker).
    ``None``/``False``/``"false"``/``""``: no resuming.
    """
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.strip().lower() in ("", "false", "no", "none"):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "auto")):
        auto = isinstance(value, str) and value.strip().lower() == "auto"
        found, skipped = last_complete_checkpoint(output_dir)
        for folder, reason in skipped:
            logger.warning("not resuming from %s: %s", folder, reason)
        if found is not None:
            logger.info("resuming from %s%s", found,
                        f" (skipped {len(skipped)} incomplete newer checkpoint(s))" if skipped else "")
            return str(found)
        if auto:
            logger.info("resume_from_checkpoint=auto: no complete checkpoint in %s, starting from scratch", output_dir)
            return None
        partial = "; ".join(f"{f.name}: {r}" for f, r in skipped)
        raise ValueError(f"resume_from_checkpoint=True but {output_dir} holds no complete checkpoint"
                         + (f" ({partial}); pass the folder itself to resume from it anyway" if partial else ""))
    folder = Path(value)
    if not folder.is_dir():
        raise ValueError(f"resume_from_checkpoint={value!r}: no such checkpoint folder")
    reason = incomplete_reason(folder)
    if reason is not None:
        if not (folder / "trainer_state.json").is_file():
            raise ValueError(f"resume_from_checkpoint={value!r} is not a complete checkpoint: {reason}, and it "
                             f"has no trainer_state.json; resume from an earlier one")
        logger.warning("resuming from %s although it is not marked complete: %s", folder, reason)
    return str(folder)
