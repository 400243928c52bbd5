"""Indexing on Ray Data against in process, measured side by side in one run.

    python benchmarks/ray_ingest_bench.py                       # random 'small' checkpoint, 64/320 images, 500/2,000 pages
    python benchmarks/ray_ingest_bench.py --model ./ckpt --items 100,500 --pages 1000,4000

1. Ray with 1 encoder actor / in process (1 torch thread each): the overhead      target >= 0.85
2. 2 encoder actors (1 thread each) / 1 actor (1 thread)                          target >= 1.6
3. peak driver memory (RSS) indexing rendered PDF pages with 2 actors, at two corpus sizes:
   flat in the corpus size (ratio large/small)                                    target ~1

Each configuration indexes two corpus sizes. "Steady" throughput is the extra items over the
extra time, so that the fixed start (a local Ray instance, a model load per actor) cancels;
"end to end" includes it. Every measured run is its own process (one torch thread in the
driver and per actor), one after the other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUN = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(1)
from ume_retriever import UMEEncoder, UMEIndex
spec = json.loads(sys.argv[1])
encoder = UMEEncoder.from_pretrained(spec["model"], device="cpu", batch_size=spec["batch"],
                                     max_new_tokens=spec["max_new_tokens"])
options = {} if spec["ray"] is None else {"ray": spec["ray"], "encoders": spec["encoders"], "threads_per_encoder": 1}
with UMEIndex(encoder, spec["store"], vectors=spec["vectors"]) as index:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    report = index.add(spec["inputs"], optimize=False, **options)
    wall = time.perf_counter() - started
    assert not report.failed, report.summary()
    print(json.dumps({"wall": wall, "indexed": len(report.indexed), "rss_before_kb": before,
                      "rss_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _small_spec():
    from ume_retriever.model.tiny import TinyModelSpec

    return TinyModelSpec(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=4, vision_depth=2, vision_embed_dim=128, vision_num_heads=4,
                         max_pixels=224 * 224)


def run(spec: dict) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT), "HOME": str(Path.home())}
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps(spec)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def images(folder: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.png")
    return folder


def pdfs(folder: Path, pages: int, per_file: int = 100) -> Path:
    import fitz

    folder.mkdir(parents=True)
    for f in range(0, pages, per_file):
        doc = fitz.open()
        for p in range(min(per_file, pages - f)):
            page = doc.new_page()
            page.insert_text((72, 72), f"document {f // per_file} page {p}: rivers, mountains and deserts " * 3)
        doc.save(folder / f"doc{f // per_file:03d}.pdf")
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: a tiny one, built here)")
    ap.add_argument("--items", default="64,320", help="two corpus sizes (images) for the throughput runs")
    ap.add_argument("--pages", default="500,2000", help="two corpus sizes (PDF pages) for the memory runs")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="reasoning length (throughput runs index both vectors)")
    ap.add_argument("--out", help="also write the results as JSON here (run_all.py reads its rows)")
    args = ap.parse_args(argv)
    small, large = (int(v) for v in args.pages.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from ume_retriever.model.tiny import build_tiny_checkpoint

        SMALL = _small_spec()

        # the throughput runs need a model whose encoding costs something next to Ray's per-item
        # work (encoder_overhead.py's "small" preset: ~0.2 s an item here); the memory runs the
        # smallest one (thousands of pages)
        model = args.model or str(build_tiny_checkpoint(tmp / "small", seed=0, spec=SMALL))
        pages_model = args.model or str(build_tiny_checkpoint(tmp / "tiny", seed=0))
        few, many = (int(v) for v in args.items.split(","))
        corpora = {n: images(tmp / f"images{n}", n) for n in (few, many)}
        base = {"model": model, "batch": 4, "max_new_tokens": args.max_new_tokens, "vectors": ["disc", "gen"],
                "encoders": 1}

        def timed(name: str, inputs: Path, ray: str | None, encoders: int = 1, **extra) -> dict:
            result = run({**base, "store": str(tmp / f"store-{name}"), "inputs": [str(inputs)], "ray": ray,
                          "encoders": encoders, **extra})
            print(f"{name}: {result['indexed']} items in {result['wall']:.1f} s, "
                  f"driver peak RSS {result['rss_peak_kb'] / 1024:.0f} MiB", flush=True)
            return result

        walls = {}
        for label, ray, encoders in (("in process", None, 1), ("ray 1 actor", "local", 1),
                                     ("ray 2 actors", "local", 2)):
            walls[label] = [timed(f"{label}-{n}".replace(" ", "-"), corpora[n], ray, encoders)["wall"]
                            for n in (few, many)]
        pages = {}
        for n in (small, large):
            pages[n] = timed(f"ray-2-actors-{n}-pages", pdfs(tmp / f"pdf{n}", n), "local", 2, vectors=["disc"],
                             batch=8, model=pages_model)
    # steady: the extra items over the extra time (the fixed start cancels); end to end: all of it
    steady = {k: (many - few) / max(1e-9, w[1] - w[0]) for k, w in walls.items()}
    end_to_end = {k: many / w[1] for k, w in walls.items()}
    rss = {k: (v["rss_peak_kb"] - v["rss_before_kb"]) / 1024 for k, v in pages.items()}
    rows = [
        ("ray 1 actor / in process, steady", steady["ray 1 actor"] / steady["in process"], ">= 0.85"),
        (f"ray 1 actor / in process, end to end ({many} items)", end_to_end["ray 1 actor"] / end_to_end["in process"],
         "-"),
        ("ray 2 actors / 1 actor, steady", steady["ray 2 actors"] / steady["ray 1 actor"], ">= 1.6"),
        (f"ray 2 actors / 1 actor, end to end ({many} items)", end_to_end["ray 2 actors"] / end_to_end["ray 1 actor"],
         "-"),
        (f"driver peak RSS growth, {large} / {small} pages", rss[large] / max(1e-9, rss[small]), "~1 (flat)"),
    ]
    print("\nitems/s, steady: " + ", ".join(f"{k} {v:.2f}" for k, v in steady.items()))
    print("items/s, end to end: " + ", ".join(f"{k} {v:.2f}" for k, v in end_to_end.items()))
    print("walls (s) at " + f"{few}/{many} items: " + ", ".join(f"{k} {w[0]:.1f}/{w[1]:.1f}" for k, w in walls.items()))
    print("driver peak RSS during add (MiB above its start): " + ", ".join(f"{k} pages {v:.0f}" for k, v in rss.items())
          + "; at start: " + ", ".join(f"{pages[k]['rss_before_kb'] / 1024:.0f}" for k in pages))
    print("\n| measure | ratio | target |\n|---|---|---|")
    for name, value, target in rows:
        print(f"| {name} | {value:.2f} | {target} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "steady_items_per_s": steady, "end_to_end_items_per_s":
                                              end_to_end, "walls_s": walls, "rss_growth_mib": rss}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
