"""What rollout_backend='server' costs against sampling on the policy itself, side by side.

    python benchmarks/rollout_server_bench.py                    # ~90M-parameter random model, CPU
    python benchmarks/rollout_server_bench.py --hidden 256 --layers 4

A random UME checkpoint is served by `ume-train rollout-server --engine transformers` in its
own process on this machine. Measured, alternating the two sides (this machine is noisy):
- rollouts: the server's (HTTP, request encoding, merged requests) over `TransformersRollouts`
  on the same weights in this process, same prompts and seeds (the outputs are checked equal);
- weight sync: `ServerRollouts.sync_weights` (safetensors chunks over HTTP into the server's
  model) over copying the same weights into a second model in this process; and its
  throughput, with the time it would take for Qwen2-VL-2B's weights in bf16 (4.42 GB); and
  two chunks in flight (the default) over one at a time.
The two processes share this machine's cores, so the server's numbers include that contention.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

QWEN2_VL_2B_BF16_BYTES = 2_208_985_600 * 2  # parameters x 2 bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "rollout_server.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ume_retriever import Item, UMEEncoder
    from ume_retriever.model.tiny import TinyModelSpec, build_tiny_checkpoint
    from ume_train.rollouts.client import ServerRollouts
    from ume_train.rollouts import TransformersRollouts
    from ume_train.rollouts.weight_sync import load_full_weights, named_full_weights

    work = Path(tempfile.mkdtemp(prefix="ume-rollout-bench-"))
    spec = TinyModelSpec(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                         num_attention_heads=max(4, args.hidden // 64), num_key_value_heads=2)
    ckpt = build_tiny_checkpoint(work / "ckpt", seed=0, spec=spec)
    encoder = UMEEncoder.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    policy = encoder.model
    weight_bytes = sum(t.numel() * t.element_size() for _, t in named_full_weights(policy))
    print(f"model: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters, "
          f"{weight_bytes / 2**20:.0f} MiB of weights (float32)", flush=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ume_train.cli", "rollout-server", "--model", str(ckpt),
                               "--engine", "transformers", "--dtype", "float32", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = ServerRollouts(f"http://127.0.0.1:{port}", max_new_tokens=args.new_tokens, connect_timeout=300)
        local = TransformersRollouts(policy, encoder.processor, encoder.token_ids, max_new_tokens=args.new_tokens)
        prompts = [encoder.preparer.prepare(Item(text=f"a scene with {i + 1} shapes in a row")) for i in range(args.prompts)]
        seeds = list(range(args.prompts))
        other = copy.deepcopy(policy)  # the in-process floor for the weight copy
        client.sync_weights(policy)  # warm up both sides
        assert client.generate(prompts, args.generations, seeds) == local.generate(prompts, args.generations, seeds)

        served, inproc, synced, serial, copied = [], [], [], [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            client.generate(prompts, args.generations, seeds)
            served.append(time.perf_counter() - t)
            t = time.perf_counter()
            local.generate(prompts, args.generations, seeds)
            inproc.append(time.perf_counter() - t)
            for in_flight, times in ((2, synced), (1, serial)):
                client.chunks_in_flight = in_flight
                t = time.perf_counter()
                client.sync_weights(policy)
                times.append(time.perf_counter() - t)
            t = time.perf_counter()
            load_full_weights(other, dict(named_full_weights(policy)))
            copied.append(time.perf_counter() - t)
    finally:
        server.terminate()
        server.wait(timeout=60)

    med = {k: statistics.median(v) for k, v in
           (("served", served), ("inproc", inproc), ("synced", synced), ("serial", serial), ("copied", copied))}
    throughput = weight_bytes / med["synced"]
    rows = [
        ("rollouts: server / in-process (same outputs)", med["served"] / med["inproc"], "<= 1.10"),
        ("weight sync over HTTP / in-process copy", med["synced"] / med["copied"], "(report)"),
        ("weight sync, 2 chunks in flight / 1 at a time", med["synced"] / med["serial"], "< 1"),
    ]
    print(f"\nrollouts ({args.prompts} prompts x {args.generations}, {args.new_tokens} new tokens): "
          f"server {med['served']:.2f} s, in-process {med['inproc']:.2f} s")
    print(f"weight sync: {med['synced']:.2f} s for {weight_bytes / 2**20:.0f} MiB = {throughput / 2**20:.0f} MiB/s "
          f"(one chunk at a time {med['serial']:.2f} s; in-process copy {med['copied']:.3f} s); "
          f"Qwen2-VL-2B in bf16 at this rate: "
          f"{QWEN2_VL_2B_BF16_BYTES / throughput:.1f} s per step")
    for name, value, target in rows:
        print(f"| {name} | {value:.3f} | {target} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "median_seconds": med, "weight_bytes": weight_bytes,
                               "sync_bytes_per_s": throughput, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
