"""``ume-train``: SFT from a YAML config, plus the synthetic data generator.

    ume-train sft --config examples/train/sft_tiny_cpu.yaml [--learning_rate 1e-4 ...] [--dry-run]
    ume-train grpo --config examples/train/grpo_tiny_cpu.yaml [--dry-run]
    torchrun --nproc_per_node 8 -m ume_train.cli sft --config examples/train/sft_2b_zero3.yaml
    ume-train synthetic ./shapes --modalities image,video,pdf
    ume-train reasoning-task ./task --vocabulary other      # held-out combinations, wordings, inference queries
    UME_ROLLOUT_API_KEY=... ume-train rollout-server --model ./sft-ckpt --engine vllm --host 10.0.0.5   # rollouts for GRPO

Keys on the command line override the file's. ``--dry-run`` parses and validates the config,
reads and checks every record (media present, reasoning present), prepares every record as
training will (the checkpoint's processor, no weights: corrupt media, PDF pages past the end,
more tokens than max_length), checks the DeepSpeed/FSDP files, prints the plan, and loads no
model weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("ume_train")


def _yaml_to_argv(path: str, cls: type) -> list[str]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping of SFTConfig fields")
    import dataclasses

    # Fields such as ``fsdp`` take ``--fsdp`` alone to mean True.
    flag_only = {f.name for f in dataclasses.fields(cls) if f.metadata.get("const") is True}
    argv: list[str] = []
    for key, value in data.items():
        if value is True and key in flag_only:
            argv.append(f"--{key}")
        elif isinstance(value, dict):  # e.g. fsdp_config given inline
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def parse_sft_config(config: str | None, overrides: list[str], *, without_deepspeed: bool = False) -> Any:
    from .config import SFTConfig

    return parse_config(SFTConfig, config, overrides, without_deepspeed=without_deepspeed)


def parse_config(cls: type, config: str | None, overrides: list[str], *, without_deepspeed: bool = False) -> Any:
    """A config dataclass from a YAML file and ``--key value`` overrides (the later wins).

    ``without_deepspeed`` drops the ``deepspeed`` field (its validation needs the package):
    the dry run checks that file itself on machines without DeepSpeed.
    """
    from transformers import HfArgumentParser

    argv = (_yaml_to_argv(config, cls) if config else []) + overrides
    deepspeed = None
    if without_deepspeed:
        while "--deepspeed" in argv:
            i = argv.index("--deepspeed")
            deepspeed = argv[i + 1]
            del argv[i:i + 2]
    (args,) = HfArgumentParser(cls).parse_args_into_dataclasses(args=argv)
    if deepspeed is not None:
        args.deepspeed_file_unvalidated = deepspeed
    return args


def dry_run(args: Any) -> dict[str, Any]:
    """Validate everything that can be checked without loading model weights; returns the plan.

    Bad records (reading them, then preparing them) are reported with file:line and reason and
    counted together against ``max_bad_records``, as training counts them."""
    from .config import GRPOConfig
    from .data.reading import read_config_records

    world = int(os.environ.get("WORLD_SIZE", "1"))
    report = read_config_records(args, args.train_files, require_reasoning=args.trains_on_reasoning)
    deepspeed = args.deepspeed or getattr(args, "deepspeed_file_unvalidated", None)
    if isinstance(deepspeed, str):
        json.loads(Path(deepspeed).read_text())  # a broken file fails here, not on 64 GPUs
    if isinstance(args.fsdp_config, str):
        json.loads(Path(args.fsdp_config).read_text())
    model = args.model_name_or_path
    local = model is not None and Path(model).exists()
    if local and not (Path(model) / "config.json").is_file():
        raise ValueError(f"{model} has no config.json: not a checkpoint folder")
    bad = {e.where: e.reason for e in report.bad}
    records, prepared = _prepare_every_record(args, report.records, bad, local)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    return {
        "model": model, "model_source": "local folder" if local else "hub name (downloaded at start)",
        "records": len(records), "bad_records_skipped": len(bad), "records_prepared": prepared,
        "world_size": world, "pairs_per_forward": args.per_device_train_batch_size * world,
        "pairs_per_optimizer_step": per_step,
        "steps": args.max_steps if args.max_steps > 0 else int(args.num_train_epochs * len(records) // per_step),
        "deepspeed": deepspeed, "fsdp": args.fsdp or None, "bf16": args.bf16, "lora": getattr(args, "use_lora", False),
        "output_dir": args.output_dir,
        **({"rollouts": _rollout_plan(args)} if isinstance(args, GRPOConfig) else {}),
    }


def _prepare_every_record(args: Any, records: list, bad: dict[str, str], local: bool) -> tuple[list, str]:
    """(the records that prepare, how they were checked): each record through the preparation
    training gives it, with the checkpoint's processor (tokenizer and image processor files only)."""
    from .checkpoint import load_training_processor, training_preparer
    from .data.reading import check_records_prepare, record_preparer

    model = args.model_name_or_path
    if model is None:
        return records, "not checked: no model_name_or_path (its processor prepares the records)"
    try:
        processor = load_training_processor(model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        preparer = training_preparer(model, processor, max_new_tokens=args.eval_max_new_tokens,
                                     num_video_frames=args.num_video_frames)
    except (OSError, ValueError) as exc:
        if local:
            raise ValueError(f"{model}: cannot load its processor to prepare the records ({exc})") from None
        return records, f"not checked: the processor of {model} is not available here ({exc})"
    logger.info("preparing %d records as training will (processor of %s)", len(records), model)
    good = check_records_prepare(records, record_preparer(args, preparer).pair, bad, args.max_bad_records)
    return good, f"each of the {len(records)} records prepared with the processor of {model}"


def _rollout_plan(args: Any) -> str:
    import importlib.util

    if args.rollout_backend == "server":
        return f"server at {args.rollout_server_url} (start it with `ume-train rollout-server --model ...`)"
    if args.rollout_backend == "vllm":
        found = importlib.util.find_spec("vllm") is not None
        return f"vllm, colocated ({'installed' if found else 'NOT installed here: pip install ume-r1[vllm]'})"
    return "transformers generate on the policy"


def run_training(kind: str, args: Any) -> dict[str, Any]:
    if kind == "sft":
        from .sft import SFTTrainer as trainer_cls
        terms = ("nce_gen", "nce_disc", "ce_query", "ce_target")
    else:
        from .grpo import GRPOTrainer as trainer_cls
        terms = ("query_reward", "target_reward", "query_reward_embedding", "target_reward_embedding",
                 "format_rate", "query_kl", "target_kl")
    t0 = time.perf_counter()
    trainer = trainer_cls(args=args)
    # "true" / "auto" / a path: the trainer resumes from the last COMPLETE checkpoint (checkpoint.resolve_resume)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    summary = {"steps": result.global_step, "train_loss": round(result.training_loss, 4),
               "minutes": round((time.perf_counter() - t0) / 60, 2), "checkpoint": args.output_dir,
               "bad_records_skipped": len(trainer.bad_records)}
    last = [h for h in trainer.state.log_history if terms[0] in h]
    if last:
        summary.update({k: last[-1][k] for k in terms if k in last[-1]})
    if trainer.eval_records:
        summary.update(trainer.evaluate())
    return summary


def serve_rollouts(ns: argparse.Namespace) -> None:
    from .rollouts.server import API_KEY_ENV, RolloutServer, check_listen_address, load_engine
    from .rollouts.wire import RequestLimits

    api_key = ns.api_key or os.environ.get(API_KEY_ENV) or None
    check_listen_address(ns.host, api_key, ns.insecure)  # before minutes of loading the engine
    limits = RequestLimits() if ns.max_body_bytes is None else RequestLimits(max_body_bytes=ns.max_body_bytes)

    options = {"device": ns.device, "dtype": ns.dtype, "gpu_memory_utilization": ns.gpu_memory_utilization,
               "tensor_parallel_size": ns.tensor_parallel_size, "max_model_len": ns.max_model_len,
               "enforce_eager": ns.enforce_eager, "min_pixels": ns.min_pixels, "max_pixels": ns.max_pixels}
    if ns.engine == "transformers":
        ignored = [k for k, v in options.items() if v is not None and k not in ("device", "dtype")]
        if ignored:
            raise ValueError(f"--engine transformers takes no {', '.join('--' + k.replace('_', '-') for k in ignored)}")
    engine, fingerprint = load_engine(ns.model, ns.engine, **options)
    server = RolloutServer(engine, model=ns.model, fingerprint=fingerprint, host=ns.host, port=ns.port,
                           engine_name=ns.engine, api_key=api_key, insecure=ns.insecure, limits=limits,
                           timeout=ns.timeout)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("rollout server stopped")
    finally:
        server.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ume-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    sft = sub.add_parser("sft", help="supervised fine-tuning (cold start)")
    sft.add_argument("--config", help="YAML file of SFTConfig fields")
    sft.add_argument("--dry-run", action="store_true",
                     help="validate config and data (every record prepared as training will), load no weights")
    grpo = sub.add_parser("grpo", help="reinforcement learning with the embedding reward (from an SFT checkpoint)")
    grpo.add_argument("--config", help="YAML file of GRPOConfig fields")
    grpo.add_argument("--dry-run", action="store_true",
                      help="validate config and data (every prompt prepared as training will), load no weights")
    srv = sub.add_parser("rollout-server", help="sample GRPO rollouts for trainers (rollout_backend=server)")
    srv.add_argument("--model", required=True, help="the checkpoint the trainer starts from")
    srv.add_argument("--engine", choices=("vllm", "transformers"), default="vllm")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on; any but a loopback one needs --api-key (or --insecure)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None,
                     help="bearer token every request must carry (default: $UME_ROLLOUT_API_KEY; the variable keeps "
                          "it out of the process list)")
    srv.add_argument("--insecure", action="store_true",
                     help="serve a non-loopback address without an API key (anyone reaching it can replace the weights)")
    srv.add_argument("--max-body-bytes", type=int, default=None,
                     help="largest request body (default 2 GiB: above a 7B model's embeddings in bf16, the "
                          "largest tensor a weight sync sends alone); larger ones get 413")
    srv.add_argument("--timeout", type=float, default=60.0,
                     help="seconds any socket read or write may wait (a client that stops sending gets 408)")
    srv.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    srv.add_argument("--device", default=None, help="transformers engine: cpu, cuda, cuda:1, ...")
    srv.add_argument("--gpu-memory-utilization", type=float, default=None, help="vllm engine")
    srv.add_argument("--tensor-parallel-size", type=int, default=None, help="vllm engine")
    srv.add_argument("--max-model-len", type=int, default=None, help="vllm engine")
    srv.add_argument("--enforce-eager", action="store_true", default=None, help="vllm engine: no CUDA graphs")
    srv.add_argument("--min-pixels", type=int, default=None, help="vllm engine: the trainer's min_pixels")
    srv.add_argument("--max-pixels", type=int, default=None, help="vllm engine: the trainer's max_pixels")
    syn = sub.add_parser("synthetic", help="write the synthetic shape-scene dataset")
    syn.add_argument("root")
    syn.add_argument("--modalities", default="image")
    syn.add_argument("--image-size", type=int, default=28)
    syn.add_argument("--train-per-scene", type=int, default=8)
    syn.add_argument("--seed", type=int, default=0)
    task = sub.add_parser("reasoning-task", help="write the reasoning-generalisation shape task (held-out splits)")
    task.add_argument("root")
    task.add_argument("--vocabulary", choices=("base", "other"), default="base")
    task.add_argument("--image-size", type=int, default=112, help="rendered size (the model's pixel caps resize it)")
    task.add_argument("--train-per-scene", type=int, default=64,
                      help="renders per seen combination (16 is memorised: docs/reasoning.md)")
    task.add_argument("--queries-per-render", type=int, default=1, help="training queries drawn per render")
    task.add_argument("--inference-share", type=float, default=0.5, help="share of training queries that riddle")
    task.add_argument("--heldout-fraction", type=float, default=0.2, help="share of combinations never trained on")
    task.add_argument("--inference-hops", type=int, choices=(1, 2), default=2,
                      help="2: eval riddles positions through two-hop chains held out of training")
    task.add_argument("--train-hops", type=int, choices=(2, 3), default=2,
                      help="3: training also names positions by three-hop routes free of held-out chains")
    task.add_argument("--seed", type=int, default=0)
    ns, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if ns.command == "synthetic":
            from .data.synthetic import make_dataset

            if rest:
                parser.error(f"unknown arguments: {' '.join(rest)}")
            data = make_dataset(ns.root, modalities=tuple(ns.modalities.split(",")), image_size=ns.image_size,
                                train_per_scene=ns.train_per_scene, seed=ns.seed)
            print(f"train: {data.train}\neval:  {data.eval}")
            return 0
        if ns.command == "reasoning-task":
            from .data.reasoning_task import make_reasoning_task

            if rest:
                parser.error(f"unknown arguments: {' '.join(rest)}")
            made = make_reasoning_task(ns.root, vocabulary=ns.vocabulary, image_size=ns.image_size,
                                       train_per_scene=ns.train_per_scene, queries_per_render=ns.queries_per_render,
                                       inference_share=ns.inference_share, heldout_fraction=ns.heldout_fraction,
                                       inference_hops=ns.inference_hops, train_hops=ns.train_hops, seed=ns.seed)
            print(f"train: {made.train}\neval:  {made.eval}")
            return 0
        if ns.command == "rollout-server":
            if rest:
                parser.error(f"unknown arguments: {' '.join(rest)}")
            serve_rollouts(ns)
            return 0
        import importlib.util

        no_deepspeed = ns.dry_run and importlib.util.find_spec("deepspeed") is None
        from .config import GRPOConfig, SFTConfig

        cls = SFTConfig if ns.command == "sft" else GRPOConfig
        args = parse_config(cls, ns.config, rest, without_deepspeed=no_deepspeed)
        result = dry_run(args) if ns.dry_run else run_training(ns.command, args)
        width = max(map(len, result))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in result.items()))
        return 0
    except Exception as exc:  # noqa: BLE001 - one clear line unless --verbose
        if ns.verbose:
            raise
        print(f"ume-train: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
