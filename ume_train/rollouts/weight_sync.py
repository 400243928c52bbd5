"""The policy's full weights, streamed in chunks to a rollout engine that samples with a copy.

Names are the policy's ``named_parameters()`` names (``model.language_model.*``, ``model.visual.*``,
``lm_head.*``): transformers loads them back with ``load_state_dict`` and vLLM's Qwen2-VL
``load_weights`` maps them to its own layout. Sharded parameters are gathered one at a time
(DeepSpeed ZeRO-3, FSDP2 DTensors), so the full model is never held twice in memory; every
process must iterate (the gathers are collectives), and only the sender keeps what it gets.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterable, Iterator

import torch
from torch import nn

DEFAULT_CHUNK_BYTES = 64 * 2**20


def _gathered(param: nn.Parameter) -> contextlib.AbstractContextManager:
    if hasattr(param, "ds_id"):  # a DeepSpeed ZeRO-3 partition: gather the whole tensor
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def named_full_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter, detached; tied parameters once."""
    if any("_fsdp_wrapped_module" in name for name, _ in model.named_parameters()):
        # FSDP1 flattens parameters into per-rank shards under wrapper names; not gathered here.
        raise ValueError("copying weights to a rollout engine does not support FSDP version 1: use FSDP2 "
                         "(fsdp_config: {\"version\": 2}) or DeepSpeed ZeRO-3, or rollout_backend='transformers'")
    for name, param in model.named_parameters():
        with _gathered(param):
            tensor = param.detach()
            if hasattr(tensor, "full_tensor"):  # an FSDP2 / tensor-parallel DTensor shard
                tensor = tensor.full_tensor()
            yield name, tensor.clone() if hasattr(param, "ds_id") else tensor


def weight_chunks(weights: Iterable[tuple[str, torch.Tensor]],
                  max_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[dict[str, torch.Tensor]]:
    """Groups of tensors of at most ``max_bytes`` each (a larger tensor travels alone)."""
    chunk: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = {}, 0
        chunk[name] = tensor
        size += nbytes
    if chunk:
        yield chunk


def load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (full tensors, by parameter name) into a plain transformers model."""
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"weights for parameters this model does not have: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{name}: got shape {tuple(tensor.shape)}, the model has {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """A safetensors blob (no pickle), with ``metadata`` (JSON-able) kept in its header."""
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(cpu, metadata={"ume": json.dumps(metadata)} if metadata is not None else None)


def from_bytes(blob: bytes) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors and metadata written by ``to_bytes``."""
    from safetensors.torch import load

    if len(blob) < 8:
        raise ValueError(f"not a safetensors blob ({len(blob)} bytes)")
    (header_size,) = struct.unpack("<Q", blob[:8])  # the format: u64 header length, JSON header, data
    if header_size > len(blob) - 8:
        raise ValueError("not a safetensors blob (header longer than the body)")
    header = json.loads(blob[8:8 + header_size])
    meta = header.get("__metadata__", {}).get("ume")
    return load(blob), (json.loads(meta) if meta is not None else None)
