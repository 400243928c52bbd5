"""Staged ingestion and the query path, measured side by side in one run with the demo model.

    python benchmarks/staged_bench.py                      # the demo model (built on first use)
    python benchmarks/staged_bench.py --model ./ckpt --limit 120

On the synthetic evaluation set (``ume_train.data.synthetic``: images and PDF pages of shape
scenes; the eval queries name one target file each), with its target files as the corpus:

1. time to searchable: ``add(gen="later")`` wall / ``add(gen="now")`` wall      target <= 0.3
2. backfill throughput / in-line gen throughput, where the in-line gen cost is
   ``now - later`` (what reasoning adds to an ingest)                             target >= 0.9
3. Hit@1 (RRF) while the backfill runs, after each fifth of it, against disc-only and the
   gen="now" index's fused figure (the pending-point rule: a pending point ranks in the gen
   list as in the disc list)
4. a cached query's time / an uncached one's (fused RRF, the same query)         target <= 0.05
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _corpus(root: Path, limit: int | None) -> tuple[list[Path], list[tuple[str, str, Path]]]:
    """The synthetic eval set: (target files, [(query text, instruction, target file)])."""
    from ume_train.data.synthetic import main as write_synthetic

    write_synthetic([str(root), "--modalities", "image,pdf", "--train-per-scene", "1"])
    queries = []
    for line in (root / "eval.jsonl").read_text().splitlines():
        row = json.loads(line)
        target = row["target"].get("image") or row["target"].get("pdf") or row["target"].get("document")
        if target is None:
            continue
        queries.append((row["query"]["text"], row["query"].get("instruction") or "", (root / target).resolve()))
    if limit:
        queries = queries[:limit]
    files = sorted({t for _, _, t in queries})
    return files, queries


def _hit1(index, queries, fusion: str) -> float:
    from ume_retriever import Item

    right = 0
    for text, instruction, target in queries:
        hits = index.search(Item(text=text, instruction=instruction or None), k=1, fusion=fusion)
        right += bool(hits) and Path(hits[0].source) == target
    return right / len(queries)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the demo model, built if missing)")
    ap.add_argument("--limit", type=int, help="use the first N eval queries (and their targets)")
    ap.add_argument("--repeats", type=int, default=30, help="query timing repeats")
    ap.add_argument("--out", help="also write the results as JSON here (run_all.py reads its rows)")
    args = ap.parse_args(argv)

    import torch

    from ume_retriever import UMEEncoder, UMEIndex

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.model is None:
        from ume_train.demo.model import demo_model

        args.model = str(demo_model())
    encoder = UMEEncoder.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    out: dict = {"model": args.model}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files, queries = _corpus(tmp / "data", args.limit)
        out["corpus"] = {"files": len(files), "queries": len(queries)}
        encoder.encode([str(files[0])], mode="both")  # warm-up outside the timings

        now, later = UMEIndex(encoder, tmp / "now"), UMEIndex(encoder, tmp / "later")
        t0 = time.perf_counter()
        now.add(files)
        t_now = time.perf_counter() - t0
        t0 = time.perf_counter()
        staged = later.add(files, gen="later")
        t_later = time.perf_counter() - t0
        pending = staged.gen_pending
        out["ingest"] = {"now_s": t_now, "later_s": t_later, "later_over_now": t_later / t_now, "pending": pending}

        disc = _hit1(later, queries, "disc")
        fused_now = _hit1(now, queries, "rrf")
        curve = [{"filled": 0, "hit@1_rrf": _hit1(later, queries, "rrf")}]
        t_backfill = 0.0
        step = max(1, -(-pending // 5))
        while later.pending_gen():
            t0 = time.perf_counter()
            later.backfill_gen(limit=step)
            t_backfill += time.perf_counter() - t0
            curve.append({"filled": pending - later.pending_gen(), "hit@1_rrf": _hit1(later, queries, "rrf")})
        inline_gen = t_now - t_later
        out["backfill"] = {"backfill_s": t_backfill, "inline_gen_s": inline_gen,
                           "throughput_ratio": inline_gen / t_backfill if t_backfill else None}
        out["during_backfill"] = {"disc_hit@1": disc, "fused_now_hit@1": fused_now, "curve": curve}

        # the query path: the same fused query, cache cleared vs cached, interleaved
        from ume_retriever import Item

        q = Item(text=queries[0][0], instruction=queries[0][1] or None)
        now.search(q, k=10)
        cold, warm = [], []
        for _ in range(args.repeats):
            now.queries.clear()
            t0 = time.perf_counter()
            now.search(q, k=10)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            now.search(q, k=10)
            warm.append(time.perf_counter() - t0)
        c, w = statistics.median(cold), statistics.median(warm)
        out["query_cache"] = {"uncached_p50_ms": c * 1e3, "cached_p50_ms": w * 1e3, "ratio": w / c}
        now.close()
        later.close()

    i, b, d, qc = out["ingest"], out["backfill"], out["during_backfill"], out["query_cache"]
    print(f"model {out['model']}; {out['corpus']['files']} files, {out['corpus']['queries']} queries")
    print(f"1. time to searchable: later {i['later_s']:.1f}s / now {i['now_s']:.1f}s = {i['later_over_now']:.3f}"
          "   (target <= 0.3)")
    print(f"2. backfill {b['backfill_s']:.1f}s vs in-line gen {b['inline_gen_s']:.1f}s: throughput ratio "
          f"{b['throughput_ratio']:.3f}   (target >= 0.9)")
    print(f"3. Hit@1 during backfill (rrf): " + ", ".join(f"{p['filled']}/{i['pending']}: {p['hit@1_rrf']:.3f}"
                                                          for p in d["curve"])
          + f"; disc-only {d['disc_hit@1']:.3f}, gen=now fused {d['fused_now_hit@1']:.3f}")
    print(f"4. query cache: cached {qc['cached_p50_ms']:.2f} ms / uncached {qc['uncached_p50_ms']:.2f} ms = "
          f"{qc['ratio']:.3f}   (target <= 0.05)")
    out["rows"] = [("time to searchable: add(gen=later) / add(gen=now)", i["later_over_now"], "<= 0.3"),
                   ("backfill throughput / in-line gen throughput", b["throughput_ratio"], ">= 0.9"),
                   ("cached fused query / uncached", qc["ratio"], "<= 0.05")]
    print(json.dumps(out))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
