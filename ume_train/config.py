"""Trainer configs: dataclasses with help text on every field; ``__post_init__`` validates only.

``TrainConfig`` holds what both trainers read and checks it; ``SFTConfig`` and ``GRPOConfig``
extend it. It extends transformers' ``TrainingArguments`` (as TRL's configs do), so every
launcher option works unchanged: ``deepspeed=...json``, ``fsdp=...``, ``bf16``,
``gradient_accumulation_steps``, ``save_steps``, ``resume_from_checkpoint``. YAML files and
command lines are parsed by ``HfArgumentParser``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from transformers import TrainingArguments

from ume_retriever.inputs.records import FORMATS

ROLLOUT_BACKENDS = ("transformers", "vllm", "server")


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


@dataclass
class TrainConfig(TrainingArguments):
    """What every UME-R1 trainer reads: the model, the records, media sizes, held-out evaluation,
    and the checks on them. ``SFTConfig`` and ``GRPOConfig`` add their own fields and defaults."""

    # Whether training reads both sides' reasoning from the records (SFT) or samples its own (GRPO).
    trains_on_reasoning: ClassVar[bool] = False
    # Fields never written out in clear (to_dict, str, training_args.bin in checkpoints).
    secret_fields: ClassVar[tuple[str, ...]] = ()

    model_name_or_path: str | None = field(default=None, **_help(
        "Checkpoint to start from: a UME-R1 checkpoint or a Qwen2-VL one already extended with "
        "<gen_emb>/<disc_emb> (hub name or local folder)."))
    train_files: list[str] = field(default_factory=list, **_help("Training record files (JSON or JSONL)."))
    data_format: str = field(default="auto", **_help(f"Record format: one of {FORMATS}."))
    media_root: str | None = field(default=None, **_help(
        "Folder that relative media paths start from (default: each record file's folder)."))
    max_bad_records: int = field(default=0, **_help(
        "How many bad records may be skipped (each is logged with file and line); more is an error."))
    query_reasoning_field: str = field(default="qry_reasoning", **_help(
        "ume-r1 format: the field holding the query side's reasoning (SFT trains on it; GRPO samples its own)."))
    target_reasoning_field: str = field(default="pos_reasoning", **_help(
        "ume-r1 format: the field holding the target side's reasoning."))
    max_length: int = field(default=4096, **_help("Longest prompt (+ answer, in SFT) in tokens; longer records are errors."))
    min_pixels: int | None = field(default=None, **_help("Image processor min pixels (default: the checkpoint's)."))
    max_pixels: int | None = field(default=None, **_help("Image processor max pixels (default: the checkpoint's)."))
    num_video_frames: int = field(default=8, **_help("Frames sampled uniformly per video."))
    pdf_dpi: int = field(default=144, **_help("Render resolution of PDF pages (then capped by max_pixels)."))
    model_dtype: str = field(default="auto", **_help(
        "Weights dtype when loading: auto (bf16 if --bf16, else fp32), float32 or bfloat16."))
    attn_implementation: str = field(default="sdpa", **_help("Attention kernel: sdpa, eager or flash_attention_2."))
    eval_files: list[str] = field(default_factory=list, **_help(
        "Held-out record files: retrieval Hit@1 (gen through real generation) is logged every eval_steps."))
    eval_max_new_tokens: int = field(default=128, **_help("Generation budget for gen vectors during evaluation."))
    remove_unused_columns: bool = field(default=False, **_help("Keep all batch fields (ours are not flat tensors)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data_format not in FORMATS:
            raise ValueError(f"data_format must be one of {FORMATS}, got {self.data_format!r}")
        if self.max_bad_records < 0:
            raise ValueError("max_bad_records must be >= 0")
        if self.max_length < 16:
            raise ValueError(f"max_length={self.max_length} cannot hold a UME-R1 prompt")
        if self.model_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"model_dtype must be auto, float32 or bfloat16, got {self.model_dtype!r}")
        if self.remove_unused_columns:
            raise ValueError(f"remove_unused_columns must stay False: {type(self).__name__} batches are not flat tensors")

    def to_dict(self) -> dict:
        """``TrainingArguments.to_dict`` (what trackers log) with the secret fields hidden."""
        d = super().to_dict()
        for name in self.secret_fields:
            if d.get(name):
                d[name] = f"<{name.upper()}>"
        return d

    def __str__(self) -> str:
        text = super().__str__()
        for name in self.secret_fields:
            value = getattr(self, name, None)
            if value:
                text = text.replace(f"{name}={value},", f"{name}=<{name.upper()}>,")
        return text

    __repr__ = __str__


@dataclass(repr=False)  # TrainConfig's repr: secrets hidden
class SFTConfig(TrainConfig):
    """UME-R1 cold-start SFT. Defaults follow the paper (lr 5e-5, cosine, warmup 3%, no weight
    decay, grad-norm clip 1, loss weights 1, logit scale 50, vision tower frozen)."""

    trains_on_reasoning: ClassVar[bool] = True
    cache_tokenized: bool = field(default=False, **_help(
        "Keep tokenised pairs in memory after first use (small datasets, many epochs)."))
    gen_nce_weight: float = field(default=1.0, **_help("Weight of InfoNCE on gen vectors."))
    disc_nce_weight: float = field(default=1.0, **_help("Weight of InfoNCE on disc vectors."))
    query_ce_weight: float = field(default=1.0, **_help("Weight of the next-token loss on the query's answer."))
    target_ce_weight: float = field(default=1.0, **_help("Weight of the next-token loss on the target's answer."))
    logit_scale: float = field(default=50.0, **_help("Fixed InfoNCE logit scale (1 / temperature)."))
    freeze_vision_tower: bool = field(default=True, **_help(
        "Freeze the vision encoder (the paper's SFT); turn off when the backbone is random."))
    train_merger: bool = field(default=True, **_help("Train the vision-language merger."))
    vision_lr: float | None = field(default=None, **_help(
        "Peak learning rate of the vision module (tower and merger), on the same schedule as the LLM's "
        "learning_rate (default: learning_rate). Not applied under DeepSpeed, which builds its own optimizer."))
    use_lora: bool = field(default=False, **_help("Train LoRA adapters (peft) on the LLM instead of all of it."))
    lora_r: int = field(default=16, **_help("LoRA rank."))
    lora_alpha: int = field(default=32, **_help("LoRA alpha."))
    lora_dropout: float = field(default=0.05, **_help("LoRA dropout."))
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        **_help("LLM modules that get LoRA adapters."))

    # Paper defaults that differ from TrainingArguments'.
    learning_rate: float = field(default=5e-5, **_help("Peak learning rate (paper: 5e-5)."))
    lr_scheduler_type: str = field(default="cosine", **_help("Learning-rate schedule (paper: cosine)."))
    warmup_steps: float = field(default=0.03, **_help("Warmup: steps, or a fraction of training when < 1 (paper: 0.03)."))
    weight_decay: float = field(default=0.0, **_help("Weight decay (paper: 0)."))
    max_grad_norm: float = field(default=1.0, **_help("Gradient clipping norm (paper: 1)."))
    logging_steps: float = field(default=10, **_help("Log every N steps (every loss term is logged)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("gen_nce_weight", "disc_nce_weight", "query_ce_weight", "target_ce_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")
        if self.vision_lr is not None and self.vision_lr < 0:
            raise ValueError(f"vision_lr must be >= 0, got {self.vision_lr}")
        if self.use_lora and self.lora_r <= 0:
            raise ValueError("lora_r must be > 0")


@dataclass(repr=False)  # TrainConfig's repr: secrets hidden
class GRPOConfig(TrainConfig):
    """UME-R1 reinforcement learning (GRPO with the embedding reward). Defaults follow the paper:
    G=8 rollouts per prompt for queries and targets, temperature 1, clip 0.2/0.28, KL 0.04
    (k3) to a frozen copy of the starting model, lr 1e-6, vision tower trainable."""

    num_generations: int = field(default=8, **_help("Rollouts G per prompt (for queries and for targets)."))
    max_completion_length: int = field(default=2048, **_help("Most tokens per rollout; also the loss normaliser."))
    temperature: float = field(default=1.0, **_help("Rollout sampling temperature."))
    top_p: float = field(default=1.0, **_help("Rollout nucleus sampling."))
    beta: float = field(default=0.04, **_help("KL weight (k3 estimator) to the frozen reference; 0 loads no reference."))
    epsilon_low: float = field(default=0.2, **_help("Lower clip range of the ratio."))
    epsilon_high: float = field(default=0.28, **_help("Upper clip range of the ratio."))
    format_reward_weight: float = field(default=1.0, **_help("Weight of the format reward."))
    embedding_reward_weight: float = field(default=1.0, **_help("Weight of the embedding reward."))
    extra_reward_funcs: list[str] = field(default_factory=list, **_help(
        "More rewards as 'module:function' with the signature fn(prompts, completions, **columns) -> "
        "list[float | None]; None means no reward (counts 0)."))
    extra_reward_weights: list[float] = field(default_factory=list, **_help("One weight per extra reward (default 1)."))
    freeze_vision_tower: bool = field(default=False, **_help("Freeze the vision encoder (the paper trains it in RL)."))
    rollout_backend: str = field(default="transformers", **_help(
        "Who samples the rollouts: 'transformers' (generate on the policy itself), 'vllm' (a vLLM engine "
        "in each training process, weights copied in each step; needs the vllm extra) or 'server' (a "
        "`ume-train rollout-server` at rollout_server_url, weights sent each step)."))
    rollout_server_url: str = field(default="http://127.0.0.1:8000", **_help("The rollout server (rollout_backend=server)."))
    rollout_server_timeout: float = field(default=600.0, **_help("Seconds to wait for the rollout server to come up."))
    rollout_server_api_key: str | None = field(default=None, **_help(
        "The rollout server's --api-key, sent as a bearer token (default: the environment variable "
        "UME_ROLLOUT_API_KEY; never logged nor saved in checkpoints)."))
    vllm_gpu_memory_utilization: float = field(default=0.3, **_help(
        "Share of the GPU the colocated vLLM engine may take (the rest is training's)."))
    vllm_max_model_len: int | None = field(default=None, **_help("vLLM context length (default: the model's)."))
    vllm_enforce_eager: bool = field(default=False, **_help("Run vLLM without CUDA graphs (less memory, slower)."))

    learning_rate: float = field(default=1e-6, **_help("Learning rate (paper: 1e-6)."))
    num_train_epochs: float = field(default=1.0, **_help("Epochs (paper: 1)."))
    logging_steps: float = field(default=1, **_help("Log every N steps."))
    dataloader_drop_last: bool = field(default=True, **_help(
        "Equal batches on every process (the embedding reward gathers them)."))

    secret_fields: ClassVar[tuple[str, ...]] = ("rollout_server_api_key",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: advantages are normalised within each prompt's group")
        if self.beta < 0 or self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError("beta, epsilon_low and epsilon_high must be >= 0")
        if self.max_completion_length < 1:
            raise ValueError("max_completion_length must be >= 1")
        if not 0 < self.temperature < float("inf"):
            raise ValueError(f"temperature must be > 0 (rollouts are sampled), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.extra_reward_weights and len(self.extra_reward_weights) != len(self.extra_reward_funcs):
            raise ValueError("give one extra_reward_weights entry per extra_reward_funcs entry")
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"rollout_backend must be one of {ROLLOUT_BACKENDS}, got {self.rollout_backend!r}")
