"""What the optimize step at the end of a large ingest buys: fused query latency in the embedded
Qdrant Edge store before and after its HNSW indexes are built, side by side in one run, and
what the build costs (the first time, and again after a further batch of points).

    python benchmarks/hnsw_after_ingest.py                      # 20k points, 1536 dims (UME-R1-2B)
    python benchmarks/hnsw_after_ingest.py --points 5000 --dim 256

Vectors are clustered like real embeddings (index_bench.clustered), queries near stored ones.
Prints one JSON object; the ratio is brute-force p50 / HNSW p50 (higher: the optimize pays).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid

import numpy as np
from index_bench import clustered, near, p50  # the index benchmark's data shape and timer (this folder)

from ume_retriever.fusion import Fusion
from ume_retriever.store import StoredPoint, StoreSchema, VectorQuery
from ume_retriever.store.edge import EdgeStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--more", type=int, default=1_000, help="points added after the first optimize")
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, dim = args.points, args.dim

    # vectors shaped like real embeddings (topic clusters), queries near stored ones
    disc, gen = clustered(n + args.more, dim, rng), clustered(n + args.more, dim, rng)

    def points(start: int, count: int) -> list[StoredPoint]:
        return [StoredPoint(str(uuid.UUID(int=i)), {"disc": disc[i], "gen": gen[i]},
                            {"kind": "item", "source": f"s{i % 100}"}) for i in range(start, start + count)]

    picked = rng.integers(0, n, args.queries)
    queries = np.stack([near(disc[picked], rng), near(gen[picked], rng)], axis=1)
    qi = iter(range(10**9))
    rrf = Fusion("rrf")
    with tempfile.TemporaryDirectory() as tmp:
        store = EdgeStore(tmp, StoreSchema(vector_size=dim, model="bench"))
        for s in range(0, n, 1000):
            store.upsert(points(s, min(1000, n - s)))

        def fused():
            q = queries[next(qi) % len(queries)]
            return store.query([VectorQuery("disc", q[0]), VectorQuery("gen", q[1])], rrf, 10, 40)

        for _ in range(5):
            fused()
        brute = p50(fused, args.queries)
        t0 = time.perf_counter()
        store.optimize()
        first_build = time.perf_counter() - t0
        for _ in range(5):
            fused()
        indexed = p50(fused, args.queries)
        store.upsert(points(n, args.more))
        t0 = time.perf_counter()
        store.optimize()
        second_build = time.perf_counter() - t0
        info = store._shard.info()
        store.close()
    print(json.dumps({
        "points": n, "dim": dim, "fused_p50_ms_before_optimize": round(brute * 1e3, 2),
        "fused_p50_ms_after_optimize": round(indexed * 1e3, 2), "before_over_after": round(brute / indexed, 2),
        "first_optimize_s": round(first_build, 1), f"optimize_after_{args.more}_more_s": round(second_build, 1),
        "indexed_vectors": info.indexed_vectors_count, "segments": info.segments_count,
    }, indent=2))


if __name__ == "__main__":
    main()
