"""Multimodal document search with UME-R1, end to end, offline on a CPU.

    python examples/demo.py                                # trains the small demo model on first run
    python examples/demo.py --model zhibinlan/UME-R1-2B    # the published model instead (GPU advised)

1. writes a small corpus: a 3-page PDF report, images, two short mp4 videos, two text notes;
2. gets a model that works on it: the demo model (a tiny Qwen2-VL trained from scratch by
   ``ume_train`` on synthetic shape scenes, ~8 minutes on a 2-core CPU, cached in
   ~/.cache/ume or $UME_CACHE) or the model you name;
3. indexes the corpus into the embedded store (disc + gen vectors; re-runs skip what is indexed);
4. runs text queries and an image query, prints the hits with the model's reasoning, checks that
   each query's top hit is the item it asks for, and writes a picture of the top hits per query.

Exit status 0 when every query finds its item at rank 1 (fused), 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ume_retriever.cli import first_words  # noqa: E402
from ume_retriever.previews import preview_path  # noqa: E402
from ume_retriever.retriever import UMERetriever  # noqa: E402
from ume_train.demo.corpus import QUERIES, DemoQuery, write_demo_corpus  # noqa: E402

logger = logging.getLogger("demo")


def is_expected(hit, query: DemoQuery, corpus: Path) -> bool:
    name, page = query.expected
    return hit.source == str((corpus / name).absolute()) and hit.page == page


def run_query(retriever: UMERetriever, query: DemoQuery, root: Path, fusion: str, k: int):
    image = root / query.image if query.image else None
    return retriever.retrieve(query.text, k=k, image=image, fusion=fusion, instruction=query.instruction)


def draw_results(rows: list[tuple[DemoQuery, list, bool]], corpus: Path, root: Path, out: Path) -> None:
    """One row per query: the query (image or text), then the top hits with their scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    k = max(len(hits) for _, hits, _ in rows)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(2.4 * (k + 1), 2.5 * len(rows)), squeeze=False)
    for r, (query, hits, _) in enumerate(rows):
        ax = axes[r][0]
        if query.image:
            ax.imshow(Image.open(root / query.image), interpolation="nearest")
            ax.set_title("query (image)", fontsize=8)
        else:
            ax.text(0.5, 0.5, query.text, ha="center", va="center", wrap=True, fontsize=9)
            ax.set_title("query", fontsize=8)
        ax.axis("off")
        for c in range(k):
            ax = axes[r][c + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(hits):
                ax.axis("off")
                continue
            hit = hits[c]
            preview = preview_path(hit.payload)
            if preview:
                ax.imshow(Image.open(preview).convert("RGB"), interpolation="nearest")
            else:
                ax.text(0.5, 0.5, (hit.payload.get("text") or "")[:80], ha="center", va="center", wrap=True, fontsize=7)
            where = Path(hit.source).name + (f" p{hit.page}" if hit.page else "")
            ax.set_title(f"#{c + 1} {where}\nfused {hit.score:.3f} disc {hit.disc_score:.2f} gen {hit.gen_score:.2f}",
                         fontsize=7)
            right = is_expected(hit, query, corpus)
            for spine in ax.spines.values():
                spine.set_edgecolor("green" if right else "lightgray")
                spine.set_linewidth(3 if right else 1)
    fig.suptitle("UME-R1 search: top hits per query (green: the item the query asks for)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a UME-R1 checkpoint (default: the demo model, trained on first use)")
    ap.add_argument("--workdir", default="ume-demo", help="corpus, index and picture go here (default ./ume-demo)")
    ap.add_argument("--train-minutes", type=float, default=8.0, help="training budget of the demo model")
    ap.add_argument("--retrain", action="store_true", help="train the demo model again")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, help="cap on the reasoning length (default: the encoder's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "ume_train.sft", "ume_train.data.synthetic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars: the demo reports its own steps
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    started = time.perf_counter()
    root = Path(args.workdir).absolute()
    corpus = write_demo_corpus(root)
    logger.info("corpus in %s", corpus)

    model = args.model
    if model is None:
        from ume_train.demo.model import default_cache, demo_model

        if not (default_cache() / "ume_demo_model.json").is_file() or args.retrain:
            logger.info("no cached demo model: training one (%.0f minutes on this CPU, once)", args.train_minutes)
        model = str(demo_model(minutes=args.train_minutes, retrain=args.retrain))
    logger.info("model %s", model)

    encoder_kwargs = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    with UMERetriever.from_pretrained(model, store=root / "index", k=args.k, encoder_kwargs=encoder_kwargs) as retriever:
        report = retriever.add(corpus, show_progress=True)
        logger.info("index: %s", report.summary())
        rows, found = [], 0
        for query in QUERIES:
            hits = run_query(retriever, query, root, "rrf", args.k)
            top1 = {f: is_expected(run_query(retriever, query, root, f, 1)[0], query, corpus) for f in ("disc", "gen")}
            right = bool(hits) and is_expected(hits[0], query, corpus)
            found += right
            rows.append((query, hits, right))
            expects = query.expected[0] + (f" page {query.expected[1]}" if query.expected[1] else "")
            title = (f"{'OK ' if right else 'MISS'} {query.describe()!r}  (expects {expects}; top-1 by disc "
                     f"{'right' if top1['disc'] else 'wrong'}, by gen {'right' if top1['gen'] else 'wrong'})")
            table = Table(title=escape(title), title_justify="left")
            for col in ("#", "item", "fused", "disc", "gen", "reasoning (gen)"):
                table.add_column(col, overflow="fold")
            for rank, hit in enumerate(hits, start=1):
                where = str(Path(hit.source).relative_to(corpus)) + (f" p{hit.page}" if hit.page else "")
                mark = " <-" if is_expected(hit, query, corpus) else ""
                table.add_row(escape(str(rank)), escape(where + mark), f"{hit.score:.3f}", f"{hit.disc_score:.3f}",
                              f"{hit.gen_score:.3f}", escape(first_words(hit.reasoning, 14)))
            console.print(table)
    picture = root / "results.png"
    draw_results(rows, corpus, root, picture)
    console.print(f"\n{found}/{len(QUERIES)} queries found the item they ask for at rank 1 (fused, rrf). "
                  f"Picture of the top hits: {picture}  ({time.perf_counter() - started:.0f} s in all)")
    return 0 if found == len(QUERIES) else 1


if __name__ == "__main__":
    sys.exit(main())
