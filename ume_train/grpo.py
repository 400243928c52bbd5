"""``GRPOTrainer``: UME-R1 reinforcement learning of generative embeddings.

Each step, for the queries and for the targets of a batch of pairs: G rollouts per prompt;
one policy forward over prompt + completion gives the token log-probabilities and the gen
vector (teacher-forced at the first generated ``<gen_emb>``); rewards = format + embedding
reward (over the global batch, gathered across processes) + any extra reward functions;
group-normalised advantages; the clipped objective with separate low/high clips and a k3 KL
to a frozen reference; token losses summed and divided by max_completion_length; total =
(query loss + target loss) / 2. One optimisation pass per batch (on-policy), as the paper.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers import Trainer

from ume_retriever.inputs.records import PairRecord
from ume_retriever.model.encoder import UMEEncoder
from ume_retriever.model.preprocess import PreparedInput, collate

from .config import GRPOConfig
from .data.prepared import PreparedRecords, PromptPreparer, ReportSkipped, collate_prompts
from .data.reading import record_preparer
from .losses import world_size
from .modeling import MODEL_INPUT_KEYS, TrainingWrapper, language_model_parts
from .rewards import embedding_reward, format_reward, group_advantages
from .rollouts import RolloutGenerator, TransformersRollouts, rollout_seed
from .trainer_common import UMETrainerMixin, resolve_model

logger = logging.getLogger(__name__)
RewardFn = Callable[..., list]
SIDES = ("query", "target")


@dataclass
class RolloutBatch:
    """One side's rollouts, tokenised: left-padded prompt + completion."""

    inputs: dict[str, torch.Tensor]  # model inputs (B = prompts * G rows)
    completion_mask: torch.Tensor  # (B, L-1): True where the NEXT token is a completion token
    gen_index: torch.Tensor  # (B,) position of the first generated <gen_emb> (or the last token)
    has_gen: torch.Tensor  # (B,) bool
    texts: list[str]
    prompts: list[str]
    lengths: torch.Tensor  # (B,) completion tokens


def token_logps_and_states(model: nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the completion tokens (B, L-1; 0 elsewhere) and the states at gen_index (B, H)."""
    base, lm_head = language_model_parts(model)
    inputs = {k: batch.inputs[k] for k in MODEL_INPUT_KEYS if k in batch.inputs}
    hidden = base(**inputs, use_cache=False).last_hidden_state  # (B, L, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    states = hidden[rows, batch.gen_index]
    targets = batch.inputs["input_ids"][:, 1:]
    mask = batch.completion_mask
    logits = lm_head(hidden[:, :-1][mask]).float()  # (n, vocab): completion positions only
    picked = logits.gather(1, targets[mask][:, None]).squeeze(1) - logits.logsumexp(dim=-1)
    logps = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
    return logps.masked_scatter(mask, picked), states


class GRPOPolicy(TrainingWrapper):
    """One forward for both sides (DDP/DeepSpeed/FSDP hook this wrapper's forward)."""

    def forward(self, query: RolloutBatch, target: RolloutBatch) -> dict[str, torch.Tensor]:
        q_logps, q_states = token_logps_and_states(self.model, query)
        t_logps, t_states = token_logps_and_states(self.model, target)
        return {"query_logps": q_logps, "query_states": q_states, "target_logps": t_logps, "target_states": t_states}


def _gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def load_reward_fn(spec: str) -> RewardFn:
    """'package.module:function' -> the function."""
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"extra reward {spec!r}: write it as 'module:function'")
    return getattr(importlib.import_module(module), name)


class GRPOTrainer(UMETrainerMixin, Trainer):
    """Train a UME-R1 model with GRPO. ``model``: instance (+ ``processor``) or checkpoint path;
    ``train_dataset``: ``PairRecord``s or None to read ``args.train_files``; ``reward_funcs``:
    extra rewards ``fn(prompts, completions, **columns) -> list[float | None]`` (with
    ``args.extra_reward_weights``, default 1 each). Prompts are prepared in the data loader; a
    record whose prompts fail (or exceed ``max_length``) is replaced in its batch and counted
    against ``args.max_bad_records`` with the reading errors (``bad_records``)."""

    eval_modes = ("gen",)  # held-out gen Hit@1 (disc vectors are not what RL trains)

    def __init__(
        self,
        model: nn.Module | str | None = None,
        args: GRPOConfig | None = None,
        train_dataset: list[PairRecord] | PreparedRecords | None = None,
        eval_records: list[PairRecord] | None = None,
        processor: Any = None,
        reward_funcs: list[RewardFn] | None = None,
        rollouts: RolloutGenerator | None = None,
        callbacks: list | None = None,
    ):
        self.bad_records = {}
        model, processor = resolve_model(model, args, processor, "GRPOTrainer")
        for name, param in model.model.visual.named_parameters():
            param.requires_grad = not args.freeze_vision_tower or name.startswith("merger")
        self.trained_model = model
        self.processor = processor
        self.reference = None
        if args.beta > 0:  # a frozen copy of the starting policy
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.encoder = UMEEncoder(model, processor, num_video_frames=args.num_video_frames,
                                  max_new_tokens=args.eval_max_new_tokens)
        self.rollouts = rollouts or self._default_rollouts(model, processor, self.encoder.token_ids, args)
        funcs = list(reward_funcs or []) + [load_reward_fn(s) for s in args.extra_reward_funcs]
        weights = list(args.extra_reward_weights) or [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ValueError(f"{len(funcs)} extra reward functions but {len(weights)} weights")
        self.extra_rewards = list(zip(funcs, weights))
        self.prompt_preparer: PromptPreparer = record_preparer(args, self.encoder.preparer)
        if train_dataset is None:
            train_dataset = self.read_train_records(args, require_reasoning=False)
        if not isinstance(train_dataset, PreparedRecords):
            train_dataset = PreparedRecords(list(train_dataset), self.prompt_preparer.pair,
                                            max_bad_records=args.max_bad_records)
        if eval_records is None and args.eval_files:
            eval_records = self.read_config_records(args, args.eval_files, require_reasoning=False)
        self.eval_records = eval_records
        super().__init__(model=GRPOPolicy(model), args=args, data_collator=ReportSkipped(collate_prompts),
                         train_dataset=train_dataset, eval_dataset=eval_records, callbacks=callbacks)
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._synced_step: int | None = None  # the step whose weights the rollout generator holds

    @staticmethod
    def _default_rollouts(model: nn.Module, processor: Any, token_ids: Any, args: GRPOConfig) -> RolloutGenerator:
        """The generator ``args.rollout_backend`` names."""
        sampling = dict(max_new_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p)
        if args.rollout_backend == "server":
            from .rollouts.client import ServerRollouts

            server = ServerRollouts(args.rollout_server_url, connect_timeout=args.rollout_server_timeout,
                                    api_key=args.rollout_server_api_key, **sampling)  # None: $UME_ROLLOUT_API_KEY
            server.check_model(model.config, processor)
            return server
        if args.rollout_backend == "vllm":
            from .rollouts.vllm_engine import VLLMRollouts

            if not args.model_name_or_path:
                raise ValueError("rollout_backend='vllm' builds its engine from model_name_or_path: set it")
            return VLLMRollouts(
                args.model_name_or_path, processor.tokenizer, token_ids, colocate=True,
                repetition_penalty=getattr(model.generation_config, "repetition_penalty", None) or 1.0,
                gpu_memory_utilization=args.vllm_gpu_memory_utilization, dtype=str(model.dtype).removeprefix("torch."),
                max_model_len=args.vllm_max_model_len, enforce_eager=args.vllm_enforce_eager,
                seed=args.seed + args.process_index, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                **sampling)
        return TransformersRollouts(model, processor, token_ids, **sampling)

    # -- one step -------------------------------------------------------------------------------

    def _rollout_side(self, records: list[PairRecord], side: str,
                      prompts: list[PreparedInput] | None = None) -> RolloutBatch:
        """``side``'s rollouts for ``records`` (their ``prompts`` when the data loader prepared
        them, else prepared here: ``RecordError`` for a record that fails)."""
        args = self.args
        G = args.num_generations
        if prompts is None:
            prompts = [self.prompt_preparer.side(getattr(r, side), r.where, side) for r in records]
        first = self.args.process_index * len(records)  # global index of this process's first prompt
        seeds = [rollout_seed(args.seed, self.state.global_step, side, first + i) for i in range(len(records))]
        rollouts = self.rollouts.generate(prompts, G, seeds)
        gen_id = self.encoder.token_ids.gen
        config = self.trained_model.config
        vision_ids = {getattr(config, k, None) for k in ("image_token_id", "video_token_id",
                                                         "vision_start_token_id", "vision_end_token_id")} - {None}
        seqs, starts, gen_pos, has_gen, texts, prompt_texts, lengths = [], [], [], [], [], [], []
        for prompt, group in zip(prompts, rollouts):
            for r in group:
                completion = r.completion_ids
                # A vision placeholder cannot be fed back as text (the model would look for its
                # pixels): the rollout is cut before it, like a rollout that ran out of tokens.
                cut = next((i for i, t in enumerate(completion) if t in vision_ids), None)
                if cut is not None:
                    completion = completion[:cut]
                ids = torch.tensor(completion or [self.encoder.token_ids.eos[0]], dtype=torch.long)
                seqs.append(prompt.extended(ids))
                starts.append(len(prompt))
                hits = (ids == gen_id).nonzero()
                has_gen.append(len(hits) > 0)
                gen_pos.append(len(prompt) + (int(hits[0, 0]) if len(hits) else len(ids) - 1))
                texts.append(r.text if cut is None else self.encoder.backend.decode(completion))
                prompt_texts.append(prompt.prompt)
                lengths.append(len(completion))
        inputs = collate(seqs, self.encoder.token_ids.pad)
        length = inputs["input_ids"].shape[1]
        mask = torch.zeros((len(seqs), length - 1), dtype=torch.bool)
        gen_index = []
        for row, (seq, start, pos, n) in enumerate(zip(seqs, starts, gen_pos, lengths)):
            pad = length - len(seq)
            # States that predict completion tokens; an empty completion (its placeholder
            # end token was never generated) scores nothing.
            mask[row, pad + start - 1: pad + start - 1 + n] = True
            gen_index.append(pad + pos)
        device = self.args.device
        return RolloutBatch(
            inputs={k: v.to(device) for k, v in inputs.items()}, completion_mask=mask.to(device),
            gen_index=torch.tensor(gen_index, device=device), has_gen=torch.tensor(has_gen, device=device),
            texts=texts, prompts=prompt_texts, lengths=torch.tensor(lengths, dtype=torch.float, device=device),
        )

    def _rewards(self, records: list[PairRecord], batches: dict[str, RolloutBatch],
                 states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Total reward per rollout for each side, logging every component."""
        args = self.args
        G = args.num_generations
        local = states["query"].shape[0]
        q_all, t_all = _gather_no_grad(states["query"].detach()), _gather_no_grad(states["target"].detach())
        q_emb, t_emb = embedding_reward(q_all, t_all, G)
        start = self.args.process_index * local
        emb = {"query": q_emb[start:start + local], "target": t_emb[start:start + local]}
        totals = {}
        for side in SIDES:
            batch = batches[side]
            fmt = torch.tensor(format_reward(batch.texts), device=batch.has_gen.device)
            side_emb = torch.where(batch.has_gen, emb[side].to(fmt.device), torch.zeros_like(fmt))  # no <gen_emb>: 0
            total = args.format_reward_weight * fmt + args.embedding_reward_weight * side_emb
            columns = {k: [v for v in values for _ in range(G)] for k, values in self._columns(records, side).items()}
            for fn, weight in self.extra_rewards:
                values = fn(batch.prompts, batch.texts, **columns)
                if len(values) != len(batch.texts):
                    raise ValueError(f"reward {getattr(fn, '__name__', fn)} returned {len(values)} values "
                                     f"for {len(batch.texts)} completions")
                extra = torch.tensor([0.0 if v is None else float(v) for v in values], device=fmt.device)
                total = total + weight * extra
                self._metrics[f"{side}_reward_{getattr(fn, '__name__', 'extra')}"].append(float(extra.mean()))
            totals[side] = total
            self._metrics[f"{side}_reward"].append(float(total.mean()))
            self._metrics[f"{side}_reward_format"].append(float(fmt.mean()))
            self._metrics[f"{side}_reward_embedding"].append(float(side_emb.mean()))
            self._metrics[f"{side}_completion_length"].append(float(batch.lengths.mean()))
        self.last_rewards = {side: t.detach() for side, t in totals.items()}  # for inspection and tests
        return totals

    @staticmethod
    def _columns(records: list[PairRecord], side: str) -> dict[str, list]:
        return {"side": [side] * len(records), "record": records, "dataset": [r.dataset for r in records],
                **{k: [r.extra.get(k) for r in records] for k in sorted({k for r in records for k in r.extra})}}

    def _side_loss(self, side: str, logps: torch.Tensor, batch: RolloutBatch, advantages: torch.Tensor) -> torch.Tensor:
        args = self.args
        mask = batch.completion_mask.float()
        ratio = torch.exp(logps - logps.detach())  # on-policy: 1, with the policy's gradient
        adv = advantages[:, None]
        clipped = torch.clamp(ratio, 1 - args.epsilon_low, 1 + args.epsilon_high)
        per_token = -torch.min(ratio * adv, clipped * adv)
        if self.reference is not None:
            with torch.no_grad():
                ref_logps, _ = token_logps_and_states(self.reference, batch)
            delta = ref_logps - logps
            kl = torch.exp(delta) - delta - 1  # k3 estimator of KL(policy || reference)
            per_token = per_token + args.beta * kl
            self._metrics[f"{side}_kl"].append(float((kl.detach() * mask).sum() / mask.sum().clamp(min=1)))
        was_clipped = ((ratio < 1 - args.epsilon_low) & (adv < 0)) | ((ratio > 1 + args.epsilon_high) & (adv > 0))
        self._metrics[f"{side}_clip_fraction"].append(float((was_clipped.float() * mask).sum() / mask.sum().clamp(min=1)))
        # Dr. GRPO-style normalisation: every token counts alike, divided by the max length.
        return (per_token * mask).sum() / (mask.shape[0] * args.max_completion_length)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.note_bad_records(inputs.get("skipped", []))
        records: list[PairRecord] = inputs["records"]
        prompts = inputs.get("prompts") or {}
        if self._synced_step != self.state.global_step:  # once per optimiser step: rollouts are on-policy
            self.rollouts.sync_weights(self.trained_model)
            self._synced_step = self.state.global_step
        batches = {side: self._rollout_side(records, side, prompts.get(side)) for side in SIDES}
        out = model(query=batches["query"], target=batches["target"])
        states = {side: out[f"{side}_states"] for side in SIDES}
        rewards = self._rewards(records, batches, states)
        losses = {}
        for side in SIDES:
            advantages = group_advantages(rewards[side], self.args.num_generations)
            losses[side] = self._side_loss(side, out[f"{side}_logps"], batches[side], advantages)
            self._metrics[f"{side}_loss"].append(float(losses[side].detach()))
        loss = (losses["query"] + losses["target"]) / 2
        return (loss, out) if return_outputs else loss

    # -- logging (held-out evaluation: UMETrainerMixin) -------------------------------------------

    def add_derived_metrics(self, logs: dict[str, float]) -> None:
        fmt = [logs[f"{s}_reward_format"] for s in SIDES if f"{s}_reward_format" in logs]
        if fmt:
            logs["format_rate"] = round(sum(fmt) / len(fmt), 4)
