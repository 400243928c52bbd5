"""What our store API costs over the bare Qdrant Edge engine, and which HNSW ``ef`` it needs:
a recall curve and side-by-side latency ratios in one run.

    python benchmarks/store_overhead.py                  # 20k and 100k points (8 minutes on 2 busy cores,
                                                         # 100k upsert + optimize 5 of them)
    python benchmarks/store_overhead.py --points 5000    # quick check

Data: 1536-d disc and gen vectors clustered like real embeddings (index_bench.clustered),
queries near stored ones (index_bench.near), payloads shaped like an ingested item's (source,
locator, modality, kind="item", a 300-character text, a content hash). Per size N the Edge
store is built through ``EdgeStore.upsert`` (batches of 1000) and ``optimize()``; then, for
each ``hnsw_ef`` (None = the engine's default, 100):

- recall@10 against exact numpy, of disc-only search and of fused RRF (k=60, prefetch 40;
  the exact answer is ``fusion.fuse_reference`` with the same prefetch; a returned point
  counts as right when its exact fused score reaches the exact 10th score, since RRF ties);
- p50 of our store's fused query (``EdgeStore.query``: one batched nearest call, fusion in
  Python, payloads, exact scores when needed) and of the bare engine's fused query on the same
  shard (``EdgeShard.query`` with two Nearest prefetches and ``Fusion.Rrf``, payloads), at
  the engine's default ef and at the same ef, interleaved query by query so machine noise
  hits all sides alike; ratios store / bare.

Then: the smallest ef whose fused and disc recall@10 are >= 0.99 at every N; whether two
threads querying one store (and the bare shard) get more throughput than one, at that ef on
the largest N; and, at the smallest N, qdrant-client local mode (exact brute force: hnsw_ef
does not apply) as a check that it runs and agrees. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index_bench import clustered, near  # noqa: E402 - the index benchmark's data shape (this folder)

from ume_retriever.fusion import Fusion, fuse_reference  # noqa: E402
from ume_retriever.store import StoredPoint, StoreSchema, VectorQuery  # noqa: E402
from ume_retriever.store.edge import EdgeStore  # noqa: E402
from ume_retriever.store.qdrant import QdrantStore  # noqa: E402

K, PREFETCH, RRF_K = 10, 40, 60
ENGINE_DEFAULT_EF = 100  # Qdrant's hnsw_config.ef default, what params=None searches with
TARGET = 0.99
TEXT = ("Quarterly figures and notes: revenue grew in the north region while costs held steady; the "
        "appendix lists each product line with its margin, the staff count per site and the open risks. ")


def effective(ef: int | None) -> int:
    return ENGINE_DEFAULT_EF if ef is None else ef


def payload(i: int) -> dict:
    return {"source": f"/data/docs/report{i % 500:03d}.pdf", "locator": f"page {i % 40 + 1}", "modality": "image",
            "kind": "item", "text": (f"Section {i}. " + TEXT * 2)[:300], "content_hash": f"{i:064x}"}


def build_points(disc: np.ndarray, gen: np.ndarray, start: int, count: int) -> list[StoredPoint]:
    return [StoredPoint(str(uuid.UUID(int=i)), {"disc": disc[i], "gen": gen[i]}, payload(i))
            for i in range(start, start + count)]


def index_of(pid: str) -> int:
    return uuid.UUID(pid).int


def exact_answers(disc: np.ndarray, gen: np.ndarray, qd: np.ndarray, qg: np.ndarray, rrf: Fusion):
    """Per query: the exact disc top-10 (a set of indices) and the exact fused scores with the
    10th fused score (a point scoring at least that is a right answer: RRF ties)."""
    out = []
    all_d, all_g = disc @ qd.T, gen @ qg.T  # one matrix product each (n x queries)
    for j in range(len(qd)):
        sd, sg = all_d[:, j], all_g[:, j]
        top = set(np.argsort(-sd, kind="stable")[:K].tolist())
        fused = dict(fuse_reference(np.stack([sd, sg]), ["disc", "gen"], rrf, PREFETCH, 2 * PREFETCH))
        kth = sorted(fused.values(), reverse=True)[K - 1]
        out.append((top, fused, kth))
    return out


def disc_recall(got: list[int], exact_top: set[int]) -> float:
    return len(exact_top & set(got)) / K


def fused_recall(got: list[int], fused: dict[int, float], kth: float) -> float:
    return sum(fused.get(i, 0.0) >= kth - 1e-12 for i in got) / K


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


class Bare:
    """The bare engine's fused RRF query (payloads, no vectors) on a store's shard."""

    def __init__(self, store: EdgeStore):
        import qdrant_edge as qe

        self.qe, self.shard = qe, store._shard

    def request(self, q: np.ndarray, g: np.ndarray, ef: int | None):
        qe = self.qe
        params = qe.SearchParams(hnsw_ef=ef) if ef else None
        return qe.QueryRequest(
            prefetches=[qe.Prefetch(limit=PREFETCH, query=qe.Query.Nearest(q.tolist(), using="disc"), params=params),
                        qe.Prefetch(limit=PREFETCH, query=qe.Query.Nearest(g.tolist(), using="gen"), params=params)],
            query=qe.Fusion.Rrf(k=RRF_K, weights=None), limit=K, with_payload=True, with_vector=False)

    def query(self, q: np.ndarray, g: np.ndarray, ef: int | None) -> list:
        # the request is built inside the timed call, as our store builds its own
        return self.shard.query(self.request(q, g, ef))


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def edge_curve(store: EdgeStore, efs: list[int | None], qd: np.ndarray, qg: np.ndarray, exact, warmup: int) -> list[dict]:
    import qdrant_edge as qe

    rrf, disc_only = Fusion("rrf"), Fusion("disc")
    bare = Bare(store)

    def api_fused(q, g):
        return store.query([VectorQuery("disc", q), VectorQuery("gen", g)], rrf, K, PREFETCH)

    rows = []
    for ef in efs:
        store._search_params = qe.SearchParams(hnsw_ef=ef) if ef else None
        for i in range(warmup):
            api_fused(qd[i], qg[i]), bare.query(qd[i], qg[i], None), bare.query(qd[i], qg[i], ef)
        t_api, t_bare_default, t_bare_same, t_disc = [], [], [], []
        rec_disc, rec_fused, rec_bare = [], [], []
        for i, (q, g) in enumerate(zip(qd, qg)):
            top, fused, kth = exact[i]
            # interleaved, the order rotating per query: noise and cache state hit every side alike
            sides = [("api", partial(api_fused, q, g)), ("bare_default", partial(bare.query, q, g, None)),
                     ("bare_same", partial(bare.query, q, g, ef))]
            r = i % 3
            for name, fn in sides[r:] + sides[:r]:
                dt, hits = timed(fn)
                if name == "api":
                    t_api.append(dt)
                    rec_fused.append(fused_recall([index_of(h.id) for h in hits], fused, kth))
                elif name == "bare_default":
                    t_bare_default.append(dt)
                else:
                    t_bare_same.append(dt)
                    rec_bare.append(fused_recall([index_of(str(p.id)) for p in hits], fused, kth))
            dt, hits = timed(store.query, [VectorQuery("disc", q)], disc_only, K, PREFETCH)
            t_disc.append(dt)
            rec_disc.append(disc_recall([index_of(h.id) for h in hits], top))
        api, bd, bs = median_ms(t_api), median_ms(t_bare_default), median_ms(t_bare_same)
        rows.append({
            "ef": ef, "recall10_disc": float(np.mean(rec_disc)), "recall10_fused": float(np.mean(rec_fused)),
            "recall10_bare_fused": float(np.mean(rec_bare)),
            "api_fused_p50_ms": api, "bare_fused_p50_ms_default_ef": bd, "bare_fused_p50_ms_same_ef": bs,
            "api_disc_p50_ms": median_ms(t_disc),
            "api_over_bare_default_ef": api / bd, "api_over_bare_same_ef": api / bs,
        })
        print(f"  ef={ef!s:>4}: recall@10 disc {rows[-1]['recall10_disc']:.4f} fused "
              f"{rows[-1]['recall10_fused']:.4f}; api fused {api:.2f} ms, bare {bd:.2f} ms (default ef) "
              f"{bs:.2f} ms (same ef)", flush=True)
    return rows


def thread_ratio(fn, queries: int, repeats: int = 3) -> float:
    """Throughput of two threads (each half of ``queries`` calls of ``fn(i)``) over one thread
    (all of them), median over ``repeats`` interleaved tries: 2.0 is perfect scaling."""
    ratios = []

    def run(start: int, count: int) -> None:
        for i in range(start, start + count):
            fn(i)

    for _ in range(repeats):
        t0 = time.perf_counter()
        run(0, queries)
        one = time.perf_counter() - t0
        threads = [threading.Thread(target=run, args=(s, queries // 2)) for s in (0, queries // 2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        two = time.perf_counter() - t0
        ratios.append(one / two * (2 * (queries // 2)) / queries)
    return statistics.median(ratios)


def thread_check(store: EdgeStore, qd: np.ndarray, qg: np.ndarray, ef: int | None, queries: int) -> dict:
    """Two threads / one thread throughput of fused queries, through our store and on the bare shard."""
    import qdrant_edge as qe

    store._search_params = qe.SearchParams(hnsw_ef=ef) if ef else None
    bare, rrf, m = Bare(store), Fusion("rrf"), len(qd)

    def api(i: int) -> None:
        store.query([VectorQuery("disc", qd[i % m]), VectorQuery("gen", qg[i % m])], rrf, K, PREFETCH)

    def raw(i: int) -> None:
        bare.query(qd[i % m], qg[i % m], ef)

    out = {"ef": ef, "api_two_over_one_thread": thread_ratio(api, queries),
           "bare_two_over_one_thread": thread_ratio(raw, queries)}
    print(f"  two threads / one thread throughput at ef={ef}: store {out['api_two_over_one_thread']:.2f}, "
          f"bare shard {out['bare_two_over_one_thread']:.2f}", flush=True)
    return out


def local_check(disc: np.ndarray, gen: np.ndarray, qd: np.ndarray, qg: np.ndarray, exact, queries: int) -> dict:
    """qdrant-client local mode on the same data: it runs, and (exact search) agrees."""
    n = len(disc)
    rrf = Fusion("rrf")
    store = QdrantStore(StoreSchema(vector_size=disc.shape[1], model="bench"), location=":memory:")
    t0 = time.perf_counter()
    for s in range(0, n, 1000):
        store.upsert(build_points(disc, gen, s, min(1000, n - s)))
    upsert_s = time.perf_counter() - t0
    times, rec_fused, rec_disc = [], [], []
    for i in range(min(queries, len(qd))):
        top, fused, kth = exact[i]
        dt, hits = timed(store.query, [VectorQuery("disc", qd[i]), VectorQuery("gen", qg[i])], rrf, K, PREFETCH)
        times.append(dt)
        rec_fused.append(fused_recall([index_of(h.id) for h in hits], fused, kth))
        hits = store.query([VectorQuery("disc", qd[i])], Fusion("disc"), K, PREFETCH)
        rec_disc.append(disc_recall([index_of(h.id) for h in hits], top))
    store.close()
    return {"points": n, "upsert_s": upsert_s, "queries": len(times), "fused_p50_ms": median_ms(times),
            "recall10_disc": float(np.mean(rec_disc)), "recall10_fused": float(np.mean(rec_fused))}


def chosen_ef(sizes: list[dict], efs: list[int | None]) -> int | None | str:
    """The smallest ef (None counted as the engine's 100) meeting the target at every size;
    "none" when no ef does."""
    for ef in sorted(efs, key=effective):
        if all(r["recall10_disc"] >= TARGET and r["recall10_fused"] >= TARGET
               for s in sizes for r in s["curve"] if r["ef"] == ef):
            return ef
    return "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=200, help="queries per size (recall and latency)")
    ap.add_argument("--efs", default="none,32,64,128,256,512", help="hnsw_ef values ('none': the engine's default)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--thread-queries", type=int, default=200)
    ap.add_argument("--local-points", type=int, help="qdrant-client local-mode size (default: the smallest --points)")
    ap.add_argument("--local-queries", type=int, default=5, help="local mode is slow: ~0.6 s a fused query at 5k")
    ap.add_argument("--skip-local", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/store_overhead.json")
    args = ap.parse_args()
    started = time.perf_counter()
    efs: list[int | None] = [None if e.strip().lower() in ("none", "default") else int(e) for e in args.efs.split(",")]
    sizes_n = sorted(args.points)
    local_n = args.local_points or sizes_n[0]
    if local_n not in sizes_n:
        sizes_n = sorted({*sizes_n, local_n})  # local mode reuses that size's data
    rrf = Fusion("rrf")
    sizes, local, threads = [], None, None
    for n in sizes_n:
        t_size = time.perf_counter()
        rng = np.random.default_rng(0)
        disc, gen = clustered(n, args.dim, rng), clustered(n, args.dim, rng)
        picked = rng.integers(0, n, args.queries)
        qd, qg = near(disc[picked], rng), near(gen[picked], rng)
        exact = exact_answers(disc, gen, qd, qg, rrf)
        data_s = time.perf_counter() - t_size
        edge_size = n in args.points
        if edge_size:
            print(f"N={n:,}: data {data_s:.1f} s", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                store = EdgeStore(tmp, StoreSchema(vector_size=args.dim, model="bench"))
                t0 = time.perf_counter()
                for s in range(0, n, 1000):
                    store.upsert(build_points(disc, gen, s, min(1000, n - s)))
                upsert_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                store.optimize()
                optimize_s = time.perf_counter() - t0
                print(f"  upsert {upsert_s:.1f} s, optimize {optimize_s:.1f} s", flush=True)
                curve = edge_curve(store, efs, qd, qg, exact, min(args.warmup, len(qd)))
                sizes.append({"points": n, "data_s": data_s, "upsert_s": upsert_s, "optimize_s": optimize_s,
                              "curve": curve})
                if n == max(args.points):  # the last size: every size's curve is known
                    ef = chosen_ef(sizes, efs)
                    threads = thread_check(store, qd, qg, None if ef == "none" else ef, args.thread_queries)
                    threads["points"] = n
                store.close()
            sizes[-1]["size_s"] = time.perf_counter() - t_size
        if n == local_n and not args.skip_local:
            local = local_check(disc, gen, qd, qg, exact, args.local_queries)
            print(f"  qdrant-client local mode at N={n:,}: upsert {local['upsert_s']:.1f} s, fused p50 "
                  f"{local['fused_p50_ms']:.1f} ms, recall@10 disc {local['recall10_disc']:.3f} fused "
                  f"{local['recall10_fused']:.3f}", flush=True)
        del disc, gen
    ef = chosen_ef(sizes, efs)
    wall_s = time.perf_counter() - started

    print(f"\nrecall@10 vs exact numpy (k={K}, prefetch {PREFETCH}, RRF k={RRF_K}), {args.queries} queries; "
          "p50 ms; ratios store API fused / bare engine fused")
    head = (f"{'N':>7} {'ef':>6} {'disc':>6} {'fused':>6} {'bare':>6} {'api ms':>7} {'bare100':>7} {'bareEF':>7} "
            f"{'api/bare100':>11} {'api/bareEF':>10}")
    print(head)
    print("-" * len(head))
    for s in sizes:
        for r in s["curve"]:
            ef_txt = "def" if r["ef"] is None else str(r["ef"])
            print(f"{s['points']:>7} {ef_txt:>6} {r['recall10_disc']:>6.4f} {r['recall10_fused']:>6.4f} "
                  f"{r['recall10_bare_fused']:>6.4f} {r['api_fused_p50_ms']:>7.2f} "
                  f"{r['bare_fused_p50_ms_default_ef']:>7.2f} {r['bare_fused_p50_ms_same_ef']:>7.2f} "
                  f"{r['api_over_bare_default_ef']:>11.2f} {r['api_over_bare_same_ef']:>10.2f}")
    print("(disc, fused: our store; bare: the engine's own RRF at the same ef; bare100: the engine at its default "
          "ef; bareEF: at the same ef; def = engine default ef 100)")
    for s in sizes:
        print(f"N={s['points']:,}: data {s['data_s']:.1f} s, upsert {s['upsert_s']:.1f} s, optimize "
              f"{s['optimize_s']:.1f} s, whole size {s['size_s']:.1f} s")
    if threads:
        print(f"two threads / one thread throughput (N={threads['points']:,}, ef={threads['ef']}): store "
              f"{threads['api_two_over_one_thread']:.2f}, bare shard {threads['bare_two_over_one_thread']:.2f} "
              "(2.0 = perfect scaling, 1.0 = serialised)")
    if local:
        print(f"qdrant-client local mode, N={local['points']:,}: runs; recall@10 disc {local['recall10_disc']:.3f} "
              f"fused {local['recall10_fused']:.3f}; fused p50 {local['fused_p50_ms']:.1f} ms (exact search, "
              "hnsw_ef does not apply)")
    ef_txt = "none meets it" if ef == "none" else ("None (engine default 100)" if ef is None else str(ef))
    print(f"smallest hnsw_ef with disc and fused recall@10 >= {TARGET} at every N: {ef_txt}")
    print(f"wall {wall_s:.1f} s")
    from ume_retriever.store.edge import EdgeStore as _Edge
    import inspect

    default_ef = inspect.signature(_Edge.__init__).parameters["hnsw_ef"].default
    rows = []  # for run_all.py: at the store's default ef
    for s in sizes:
        for r in s["curve"]:
            if r["ef"] == default_ef:
                rows += [(f"store API fused p50 / bare engine fused p50, {s['points']:,} points, ef {default_ef}",
                          r["api_over_bare_default_ef"], "<= 1.5"),
                         (f"recall@10 fused, {s['points']:,} points, ef {default_ef}", r["recall10_fused"], ">= 0.99")]
    out = {"dim": args.dim, "queries": args.queries, "k": K, "prefetch": PREFETCH, "sizes": sizes,
           "threads": threads, "local": local, "chosen_ef": ef, "wall_s": wall_s, "rows": rows}
    print(json.dumps(out))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
