"""Every performance benchmark in one command: one table of ratios, each measured side by side
within its own run, written to benchmarks/results/suite.md (and .json).

    python benchmarks/run_all.py                 # encoder overheads, store (20k points), ingest, store vs bare
                                                 # engine, staged ingestion + query cache, rollout server,
                                                 # ume serve under load, indexing on Ray Data
    python benchmarks/run_all.py --points 100000 # the store at 100k (about 17 minutes on 2 cores)
    python benchmarks/run_all.py --device cuda --preset 2b

The benchmarks run one after the other (never two at once: they would time each other), each
in its own process; the learning benchmarks (sft_learning.py, grpo_learning.py) are separate
because they take tens of minutes and produce curves, not ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(HERE / script), *args, "--out", str(out)]
    print(f"$ {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=20_000, help="store benchmark size")
    ap.add_argument("--preset", default="small", choices=("small", "2b"), help="encoder benchmark model")
    ap.add_argument("--device", help="encoder benchmark device (default: cuda if available)")
    ap.add_argument("--out", default=str(HERE / "results" / "suite"))
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = []
    enc_args = ["--preset", args.preset] + (["--device", args.device] if args.device else [])
    sections.append(("encoder", run("encoder_overhead.py", enc_args, out.with_name("suite_encoder.json"))))
    sections.append(("store + ingest", run("index_bench.py", ["--points", str(args.points)],
                                           out.with_name("suite_index.json"))))
    sections.append(("store vs bare engine", run("store_overhead.py", ["--points", str(args.points), "--skip-local"],
                                                 out.with_name("suite_store_overhead.json"))))
    sections.append(("staged ingestion", run("staged_bench.py", [], out.with_name("suite_staged.json"))))
    sections.append(("rollout server", run("rollout_server_bench.py", [], out.with_name("suite_rollouts.json"))))
    sections.append(("ume serve", run("serve_bench.py", [], out.with_name("suite_serve.json"))))
    sections.append(("ray ingest", run("ray_ingest_bench.py", [], out.with_name("suite_ray_ingest.json"))))
    lines = [f"Benchmarks on {machine()}, {time.strftime('%Y-%m-%d')}; store at {args.points:,} points; "
             f"encoder preset {args.preset}.", "", "| section | measure | ratio | target |", "|---|---|---|---|"]
    for section, result in sections:
        for name, value, target in result["rows"]:
            lines.append(f"| {section} | {name} | {value:.3f} | {target} |")
    table = "\n".join(lines)
    print("\n" + table)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "points": args.points,
                                                    "sections": dict(sections)}, indent=2))
    print(f"\nwrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
