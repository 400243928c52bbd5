"""Contrastive losses on embeddings (no model inside), and the cross-process gather they need."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_SCALE = 50.0  # UME-R1's fixed logit scale (temperature 0.02)


def symmetric_info_nce(q: torch.Tensor, t: torch.Tensor, scale: float = DEFAULT_SCALE) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch negatives: rows ``i`` of ``q`` and ``t`` are the positives.

    ``q`` and ``t`` are (N, d); both are L2-normalised here. Returns the mean of the
    query->target and target->query cross-entropies of ``scale * cos`` logits (a scalar).
    """
    if q.ndim != 2 or q.shape != t.shape:
        raise ValueError(f"symmetric_info_nce needs two (N, d) tensors of one shape, got {tuple(q.shape)} and {tuple(t.shape)}")
    q = F.normalize(q.float(), dim=-1)
    t = F.normalize(t.float(), dim=-1)
    logits = scale * q @ t.T  # (N, N); the diagonal holds the positives
    labels = torch.arange(q.shape[0], device=q.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) over all processes, keeping the gradient.

    Without a process group this is the identity. The backward pass sums each rank's gradient
    into the owner of the rows, so when every rank computes the same global loss and DDP then
    averages parameter gradients, the result equals one process on the whole batch.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    # torch's recommended autograd all-gather (the backward is a summing reduce-scatter)
    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """A detached sum over processes (for normalisers such as a global token count)."""
    import torch.distributed as dist

    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
