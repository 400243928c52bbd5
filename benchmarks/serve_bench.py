"""``ume serve`` under load, on loopback only, with bounded loops: throughput and latency of
embeddings at several concurrencies, with request batching and without (max batch 1), searches,
and an ingest with searches running beside it.

    python benchmarks/serve_bench.py                       # tiny random checkpoint, CPU
    python benchmarks/serve_bench.py --model zhibinlan/UME-R1-2B --requests 200

Each configuration runs the real command in a subprocess (local Ray). The ratio batching /
no batching is measured in this one run, back to back, on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key-0123456789"


class Service:
    def __init__(self, args: list[str], cwd: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "ume_retriever.cli", "serve", "--port", str(self.port),
                                      "--api-key", KEY, *args], cwd=cwd, env=env, stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True)
        ready = threading.Event()
        self.log: list[str] = []

        def read() -> None:
            for line in self.proc.stderr:
                self.log.append(line)
                if "ume serve: ready on" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300):
            self.proc.kill()
            raise SystemExit("ume serve did not start:\n" + "".join(self.log[-40:]))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


async def load(url: str, path: str, bodies: list[dict], concurrency: int, timeout: float = 300) -> dict:
    """Send ``bodies`` with at most ``concurrency`` in flight; latencies, errors, throughput."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout,
                                 limits=limits) as client:
        async def one(body: dict) -> None:
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, json=body)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(bodies), "concurrency": concurrency, "seconds": wall, "per_s": len(bodies) / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "errors": len(errors), "first_error": errors[0] if errors else None}


def embedding_bodies(model: str, n: int, salt: str) -> list[dict]:
    # distinct texts of varying length (no two requests the same)
    return [{"model": model, "input": f"{salt} query {i}: " + "a red circle next to a blue square " * (1 + i % 4)}
            for i in range(n)]


def model_ceiling(model: str, batch: int, rounds: int = 5) -> dict:
    """What batching can gain in the model alone: ``batch`` texts one by one vs in one call
    (the encoder's own forward batching), in this process with one torch thread."""
    import torch

    from ume_retriever import UMEEncoder

    torch.set_num_threads(1)
    encoder = UMEEncoder.from_pretrained(model, batch_size=batch)
    texts = [b["input"] for b in embedding_bodies(model, batch, "ceiling")]
    encoder.encode(texts)
    one = together = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for t in texts:
            encoder.encode([t])
        t1 = time.perf_counter()
        encoder.encode(texts)
        one, together = one + t1 - t0, together + time.perf_counter() - t1
    del encoder
    return {"single_ms": 1000 * one / rounds / batch, "batched_ms_per_input": 1000 * together / rounds / batch,
            "ceiling_ratio": one / together}


def write_images(folder: Path, n: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(img).ellipse((10 + i % 30, 10, 60 + i % 30, 70), fill=(40 * (i % 6), 30 * (i % 8), 200))
        img.save(folder / f"img{i:03d}.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: a tiny random one built here)")
    ap.add_argument("--requests", type=int, default=500, help="embedding requests per concurrency level")
    ap.add_argument("--searches", type=int, default=200)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--ingest-files", type=int, default=40)
    ap.add_argument("--out", help="also write the results as JSON here (run_all.py reads its rows)")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ume-serve-bench-"))
    model = args.model
    if model is None:
        from ume_retriever.model.tiny import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(work / "tiny"))
    results_model = model_ceiling(model, args.max_batch_size)
    print(f"in process, no service: {results_model}", flush=True)
    corpus = work / "corpus"
    write_images(corpus / "first", 12)
    write_images(corpus / "second", args.ingest_files)
    common = ["--model", model, "--allow-root", str(corpus), "--max-new-tokens", str(args.max_new_tokens),
              "--max-inputs", "256"]
    results: dict = {"model": model, "cpu_count": os.cpu_count(), "embeddings": {}, "unbatched": {},
                     "in_process": results_model}

    # -- batched service: every concurrency level, searches, ingest + search --------------------
    svc = Service([*common, "--store", str(work / "store"), "--max-batch-size", str(args.max_batch_size)], work)
    try:
        asyncio.run(load(svc.url, "/v1/embeddings", embedding_bodies(model, 100, "warm"), 8))
        for c in levels:
            results["embeddings"][c] = asyncio.run(load(svc.url, "/v1/embeddings",
                                                        embedding_bodies(model, args.requests, f"c{c}"), c))
            print(f"embeddings, batched, concurrency {c}: {results['embeddings'][c]}", flush=True)
        httpx.post(svc.url + "/v1/index", json={"paths": [str(corpus / "first")]}, timeout=None,
                   headers={"Authorization": f"Bearer {KEY}"}).raise_for_status()
        searches = [{"query": f"search {i}: a red circle", "k": 5} for i in range(args.searches)]
        results["search"] = asyncio.run(load(svc.url, "/v1/search", searches, 16))
        print(f"searches (rrf, reasoning queries), concurrency 16: {results['search']}", flush=True)

        # an ingest with searches beside it: no errors, every file's point there afterwards
        ingest: dict = {}

        def run_ingest() -> None:
            r = httpx.post(svc.url + "/v1/index", json={"paths": [str(corpus / "second")]}, timeout=None,
                           headers={"Authorization": f"Bearer {KEY}"})
            ingest["status"], ingest["body"] = r.status_code, r.json()

        thread = threading.Thread(target=run_ingest)
        thread.start()
        during = asyncio.run(load(svc.url, "/v1/search",
                                  [{"query": f"during {i}", "k": 5, "fusion": "disc"} for i in range(100)], 16))
        thread.join()
        health = httpx.get(svc.url + "/health").json()
        results["ingest_with_search"] = {
            "ingest_status": ingest["status"], "indexed": ingest["body"].get("indexed"),
            "failed": ingest["body"].get("failed"), "search": during,
            "points": health["points"], "expected_points": 12 + args.ingest_files}
        print(f"ingest + search: {results['ingest_with_search']}", flush=True)
    finally:
        results["batched_exit"] = svc.stop()

    # -- the same service without batching, at the reference concurrency -----------------------
    svc = Service([*common, "--store", str(work / "store1"), "--max-batch-size", "1"], work)
    try:
        asyncio.run(load(svc.url, "/v1/embeddings", embedding_bodies(model, 100, "warm"), 8))
        for c in (16,):
            results["unbatched"][c] = asyncio.run(load(svc.url, "/v1/embeddings",
                                                       embedding_bodies(model, args.requests, f"u{c}"), c))
            print(f"embeddings, max batch 1, concurrency {c}: {results['unbatched'][c]}", flush=True)
    finally:
        results["unbatched_exit"] = svc.stop()

    ratio = results["embeddings"][16]["per_s"] / results["unbatched"][16]["per_s"]
    results["batching_ratio_c16"] = ratio
    errors = sum(r["errors"] for r in results["embeddings"].values()) + results["search"]["errors"] + \
        results["unbatched"][16]["errors"] + results["ingest_with_search"]["search"]["errors"]
    results["errors"] = errors
    iws = results["ingest_with_search"]
    print("\n| embeddings | concurrency | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|")
    for c, r in results["embeddings"].items():
        print(f"| batched (max {args.max_batch_size}) | {c} | {r['per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |")
    r = results["unbatched"][16]
    print(f"| max batch 1 | 16 | {r['per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |")
    s = results["search"]
    print(f"\nsearches (rrf: each query reasons), concurrency 16: {s['per_s']:.1f}/s, p50 {s['p50_ms']:.0f} ms, "
          f"p99 {s['p99_ms']:.0f} ms, errors {s['errors']}")
    print(f"batched / unbatched throughput at 16 concurrent: {ratio:.2f} (target >= 2)")
    m = results["in_process"]
    c1 = results["embeddings"].get(1)
    print(f"in process, the model alone: {m['single_ms']:.1f} ms per input one at a time, "
          f"{m['batched_ms_per_input']:.1f} ms per input {args.max_batch_size} at a time: batching can gain at most "
          f"{m['ceiling_ratio']:.2f}x" + (f"; the service adds {1000 / c1['per_s'] - m['single_ms']:.0f} ms per "
                                          "request at concurrency 1" if c1 else ""))
    print(f"ingest beside {iws['search']['requests']} searches: status {iws['ingest_status']}, indexed "
          f"{iws['indexed']}, failed {iws['failed']}, points {iws['points']} of {iws['expected_points']}, "
          f"search errors {iws['search']['errors']}")
    print(f"errors in all: {errors}")
    if args.out:
        results["rows"] = [
            ("serve: embeddings/s batched / max batch 1, 16 concurrent", ratio, ">= 2"),
            ("serve: errors over every load", errors, "0"),
            ("serve: points after ingest beside searches / expected",
             iws["points"] / iws["expected_points"], "1.0"),
        ]
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return 0 if errors == 0 and iws["points"] == iws["expected_points"] else 1


if __name__ == "__main__":
    sys.exit(main())
