"""UME-R1 rewards for GRPO: pure functions of completions and gen vectors.

Every reward function follows ``fn(prompts, completions, **columns) -> list[float | None]``
where it is used by the trainer; the two built-ins also have the plain signatures below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ume_retriever.model.prompt import OUTPUT_FORMAT


def format_reward(completions: list[str], **_: object) -> list[float]:
    """1.0 when a completion matches ``<think>.*?</think>.*?\\s*<answer>.*?\\s*<gen_emb>`` (searched, DOTALL)."""
    return [1.0 if OUTPUT_FORMAT.search(c) else 0.0 for c in completions]


def _one_side(sim: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rewards of the rows of ``sim`` (rows: rollouts of this side, columns: of the other side)."""
    rows, cols = sim.shape
    pair_of_row = torch.arange(rows, device=sim.device) // group_size  # (R,)
    pair_of_col = torch.arange(cols, device=sim.device) // group_size  # (C,)
    positive = pair_of_row[:, None] == pair_of_col[None, :]  # (R, C): the other side's G rollouts of this pair
    top = sim.topk(group_size, dim=1).indices  # (R, G)
    rank = positive.gather(1, top).float().mean(dim=1)  # share of own rollouts among the top G
    pos_mean = (sim * positive).sum(1) / group_size
    neg_mean = (sim * ~positive).sum(1) / (cols - group_size)
    return rank * (pos_mean - neg_mean)


def embedding_reward(q: torch.Tensor, t: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The UME-R1 embedding reward for both sides.

    ``q`` and ``t`` are (N*G, d) gen vectors of the query and target rollouts, rows
    ``g*G .. g*G+G-1`` belonging to pair ``g`` (normalised here). For query rollout i of pair
    g, with S = Q T^T: rank = |top-G(S_i) ∩ pair g's target rollouts| / G, gap = mean
    similarity to pair g's target rollouts - mean similarity to every other target rollout,
    reward = rank * gap. Targets mirror it with T Q^T. Returns (q_rewards, t_rewards), (N*G,) each.
    """
    if q.ndim != 2 or q.shape != t.shape:
        raise ValueError(f"q and t must be (N*G, d) tensors of one shape, got {tuple(q.shape)} and {tuple(t.shape)}")
    if group_size < 1 or q.shape[0] % group_size:
        raise ValueError(f"{q.shape[0]} rows do not split into groups of {group_size}")
    if q.shape[0] // group_size < 2:
        raise ValueError("the embedding reward needs at least 2 pairs in the (global) batch: negatives come from other pairs")
    with torch.no_grad():
        q = F.normalize(q.float(), dim=-1)
        t = F.normalize(t.float(), dim=-1)
        sim = q @ t.T  # (NG, NG)
        return _one_side(sim, group_size), _one_side(sim.T, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) over each prompt's G rollouts (sample std, as torch's default)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((grouped - mean) / (std + eps)).view(-1)
