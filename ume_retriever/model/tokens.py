"""Token ids a UME-R1 checkpoint needs, looked up by string (never hard-coded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError
from .prompt import DISC_TOKEN, GEN_TOKEN


@dataclass(frozen=True)
class UMETokenIds:
    disc: int
    gen: int
    pad: int
    eos: tuple[int, ...]


def _lookup(tokenizer: Any, token: str, source: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise CheckpointError(
            f"{source}: the tokenizer has no {token} token; this is not a UME-R1 checkpoint "
            f"(a plain Qwen2-VL model must be fine-tuned with ume_train first)"
        )
    return int(token_id)


def resolve_token_ids(tokenizer: Any, generation_config: Any, source: str) -> UMETokenIds:
    """Find ``<disc_emb>``, ``<gen_emb>``, the pad id and the end-of-turn ids of a checkpoint."""
    disc = _lookup(tokenizer, DISC_TOKEN, source)
    gen = _lookup(tokenizer, GEN_TOKEN, source)
    eos: Any = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = _lookup(tokenizer, "<|im_end|>", source)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tokenizer.unk_token_id and int(im_end) not in eos_ids:
        eos_ids = (int(im_end), *eos_ids)  # the end of the assistant turn always ends generation
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = getattr(generation_config, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[-1]
    return UMETokenIds(disc=disc, gen=gen, pad=int(pad), eos=eos_ids)
