"""Store and ingest benchmarks for UMEIndex, ratios measured side by side in one run.

    python benchmarks/index_bench.py                 # 100k points (takes a few minutes)
    python benchmarks/index_bench.py --points 20000  # quicker

1. Store (through our store API, 1536-d disc + 1536-d gen, clustered unit vectors of low
   intrinsic dimension as real embeddings have; queries at cosine ~0.8 of a stored vector):
   - Edge (after optimize): fused RRF p50 / (disc-only p50 + gen-only p50)     target <= 1.1
   - qdrant-client local mode fused p50 / Edge fused p50                        target >= 300
   - Edge single-vector and fused recall@10 against exact numpy                target >= 0.99
2. Ingest with the tiny model (real PDF pages, images, text files):
   - re-ingesting the unchanged corpus / first ingest                           target <= 0.05
   - encoder-only throughput on the same items / whole-pipeline throughput     target >= 0.9
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ume_retriever.fusion import Fusion, fuse_reference  # noqa: E402
from ume_retriever.store import StoredPoint, StoreSchema, VectorQuery  # noqa: E402
from ume_retriever.store.edge import EdgeStore  # noqa: E402
from ume_retriever.store.qdrant import QdrantStore  # noqa: E402


def clustered(n: int, dim: int, rng: np.random.Generator, centres: int = 64, latent: int = 48) -> np.ndarray:
    """Unit vectors shaped like real embeddings: topic clusters in a low-dimensional subspace
    (``latent`` dims, randomly embedded in ``dim``) plus a little isotropic noise."""
    basis = rng.normal(size=(latent, dim)).astype(np.float32)
    c = rng.normal(size=(centres, latent)).astype(np.float32)
    z = c[rng.integers(0, centres, n)] + 0.6 * rng.normal(size=(n, latent)).astype(np.float32)
    x = z @ basis + 0.05 * np.sqrt(latent) * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(x: np.ndarray, rng: np.random.Generator, noise: float = 0.75) -> np.ndarray:
    """Queries near stored vectors: cosine about 1/sqrt(1 + noise^2) (0.8) to their source."""
    q = x + noise * rng.normal(size=x.shape).astype(np.float32) / np.sqrt(x.shape[1])
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def p50(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def store_bench(n: int, dim: int, local_queries: int, out: dict) -> None:
    rng = np.random.default_rng(0)
    disc, gen = clustered(n, dim, rng), clustered(n, dim, rng)
    # queries near the data (a perturbed stored vector), as real queries are
    picked = rng.integers(0, n, 40)
    queries, gen_queries = near(disc[picked], rng), near(gen[picked], rng)
    ids = [str(uuid.uuid5(uuid.NAMESPACE_URL, str(i))) for i in range(n)]
    schema = StoreSchema(vector_size=dim, model="bench")
    points = [StoredPoint(ids[i], {"disc": disc[i], "gen": gen[i]}, {"source": f"s{i % 100}"}) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        edge = EdgeStore(tmp, schema)
        t0 = time.perf_counter()
        for s in range(0, n, 1000):
            edge.upsert(points[s:s + 1000])
        upsert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        edge.optimize()
        optimize_s = time.perf_counter() - t0
        k, pf = 10, 40
        rrf = Fusion("rrf")
        qi = iter(range(10**9))

        def fused():
            i = next(qi) % len(queries)
            return edge.query([VectorQuery("disc", queries[i]), VectorQuery("gen", gen_queries[i])], rrf, k, pf)

        def single(using):
            i = next(qi) % len(queries)
            q = queries[i] if using == "disc" else gen_queries[i]
            return edge.query([VectorQuery(using, q)], Fusion(using), k, pf)

        for _ in range(20):  # warm-up
            fused(), single("disc"), single("gen")
        edge_fused = p50(fused, 200)
        edge_disc, edge_gen = p50(lambda: single("disc"), 200), p50(lambda: single("gen"), 200)
        # recall@10 against exact numpy, single-vector and fused
        position = {pid: i for i, pid in enumerate(ids)}
        rec_single, rec_fused = [], []
        for q, qg in zip(queries[:20], gen_queries[:20]):
            exact = set(np.argsort(-(disc @ q))[:k].tolist())
            got = {position[h.id] for h in edge.query([VectorQuery("disc", q)], Fusion("disc"), k, pf)}
            rec_single.append(len(exact & got) / k)
            scores = np.stack([disc @ q, gen @ qg])
            exact_fused = dict(fuse_reference(scores, ["disc", "gen"], rrf, pf, 2 * pf))
            kth = sorted(exact_fused.values(), reverse=True)[k - 1]
            got = {position[h.id] for h in edge.query([VectorQuery("disc", q), VectorQuery("gen", qg)],
                                                        rrf, k, pf)}
            # RRF ties often (a rank-r hit in one list only scores the same from either list):
            # a returned point is right when its exact fused score reaches the exact k-th score.
            rec_fused.append(sum(exact_fused.get(i, 0.0) >= kth - 1e-12 for i in got) / k)
        edge.close()
    local = QdrantStore(schema, location=":memory:")
    t0 = time.perf_counter()
    for s in range(0, n, 1000):
        local.upsert(points[s:s + 1000])
    local_upsert_s = time.perf_counter() - t0
    local_q = [VectorQuery("disc", queries[0]), VectorQuery("gen", gen_queries[0])]
    local.query(local_q, rrf, k, pf)
    local_fused = p50(lambda: local.query(local_q, rrf, k, pf),
                      local_queries)
    local.close()
    out["store"] = {
        "points": n, "dim": dim, "edge_upsert_s": upsert_s, "edge_optimize_s": optimize_s,
        "local_upsert_s": local_upsert_s, "edge_fused_p50_ms": edge_fused * 1e3,
        "edge_disc_p50_ms": edge_disc * 1e3, "edge_gen_p50_ms": edge_gen * 1e3,
        "local_fused_p50_ms": local_fused * 1e3,
        "fused_over_single_sum": edge_fused / (edge_disc + edge_gen),
        "local_over_edge_fused": local_fused / edge_fused,
        "edge_recall10_single": float(np.mean(rec_single)), "edge_recall10_fused": float(np.mean(rec_fused)),
    }


def ingest_bench(out: dict, repeats: int) -> None:
    import logging

    import pymupdf
    import torch
    from PIL import Image, ImageDraw

    from ume_retriever import UMEEncoder, UMEIndex
    from ume_retriever.inputs.loaders import LoaderConfig, load_file, walk
    from ume_retriever.model.tiny import build_tiny_checkpoint

    logging.getLogger("ume_retriever").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "corpus"
        root.mkdir()
        doc = pymupdf.open()
        for i in range(24):
            page = doc.new_page(width=400, height=520)
            page.insert_text((30, 60), f"Section {i}: quarterly figures and notes", fontsize=14)
            page.draw_rect(pymupdf.Rect(30, 100, 370, 300), color=(0, 0, 1), fill=(0.2 + i / 40, 0.6, 0.9))
        doc.save(str(root / "report.pdf"))
        for i in range(16):
            img = Image.new("RGB", (320, 240), (255, 255, 255))
            ImageDraw.Draw(img).ellipse((20 + 5 * i, 20, 200, 200), fill=(10 * i, 80, 160))
            img.save(root / f"img{i:02d}.png")
        for i in range(24):
            (root / f"note{i:02d}.md").write_text(f"# Note {i}\n" + "Some words about shapes and colours. " * 10)
        ckpt = build_tiny_checkpoint(Path(tmp) / "tiny")
        enc = UMEEncoder.from_pretrained(ckpt, device="cpu", dtype=torch.float32, max_new_tokens=8, batch_size=8)
        loader = LoaderConfig(pdf_max_pixels=enc.processor.image_processor.size.longest_edge)
        # encoder-only on the very items the pipeline produces (loaded beforehand, untimed)
        items = [li.item for path in walk([root]) for li in load_file(path, loader)]
        enc.encode(items[:8], mode="both")  # warm-up
        encoder_times, pipeline_times, reingest_times = [], [], []
        for r in range(repeats):  # interleaved: machine noise hits both alike
            t0 = time.perf_counter()
            enc.encode(items, mode="both")
            encoder_times.append(time.perf_counter() - t0)
            idx = UMEIndex(enc, Path(tmp) / f"store{r}", loader=loader)
            t0 = time.perf_counter()
            first = idx.add([root])
            pipeline_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            again = idx.add([root])
            reingest_times.append(time.perf_counter() - t0)
            idx.close()
        encoder_only = statistics.median(encoder_times)
        pipeline = statistics.median(pipeline_times)
        reingest = statistics.median(reingest_times)
    out["ingest"] = {
        "items": len(items), "indexed": len(first.indexed), "unchanged_on_reingest": len(again.unchanged),
        "encoder_only_s": encoder_only, "pipeline_s": pipeline, "reingest_s": reingest,
        "pipeline_over_encoder_throughput": encoder_only / pipeline, "reingest_over_first": reingest / pipeline,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--local-queries", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved ingest repeats")
    ap.add_argument("--skip-store", action="store_true")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/index_bench.json")
    args = ap.parse_args()
    out: dict = {}
    if not args.skip_ingest:
        ingest_bench(out, args.repeats)
    if not args.skip_store:
        store_bench(args.points, args.dim, args.local_queries, out)
    rows = []
    if "store" in out:
        s = out["store"]
        rows += [
            (f"Edge fused RRF p50 / (disc p50 + gen p50)  [{s['edge_fused_p50_ms']:.2f} / "
             f"({s['edge_disc_p50_ms']:.2f} + {s['edge_gen_p50_ms']:.2f}) ms]", s["fused_over_single_sum"], "<= 1.1"),
            (f"local-mode fused p50 / Edge fused p50  [{s['local_fused_p50_ms']:.0f} ms]", s["local_over_edge_fused"],
             ">= 300"),
            ("Edge recall@10 single vector vs exact", s["edge_recall10_single"], ">= 0.99"),
            ("Edge recall@10 fused RRF vs exact fusion", s["edge_recall10_fused"], ">= 0.99"),
        ]
    if "ingest" in out:
        g = out["ingest"]
        rows += [
            (f"re-ingest unchanged / first ingest  [{g['reingest_s']:.2f} / {g['pipeline_s']:.1f} s]",
             g["reingest_over_first"], "<= 0.05"),
            (f"pipeline / encoder-only throughput  [{g['items']} items]", g["pipeline_over_encoder_throughput"],
             ">= 0.9"),
        ]
    print()
    for name, value, target in rows:
        print(f"{name:<75} {value:9.3f}  {target}")
    if "store" in out:
        s = out["store"]
        print(f"\n{s['points']:,} points x ({s['dim']} + {s['dim']}) dims: Edge upsert {s['edge_upsert_s']:.1f} s, "
              f"optimize {s['edge_optimize_s']:.1f} s; local-mode upsert {s['local_upsert_s']:.1f} s")
    out["rows"] = [[name, value, target] for name, value, target in rows]  # read by run_all.py
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
