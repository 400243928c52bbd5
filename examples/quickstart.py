"""Encode text, an image, a PDF page and a video with UME-R1: disc and gen vectors side by side.

    python examples/quickstart.py                                # a tiny random model, offline
    python examples/quickstart.py --model zhibinlan/UME-R1-2B    # the published model (GPU advised)

With the tiny random model the similarities mean nothing (its weights are random and it never
learned to write <gen_emb>); the run shows the pipeline end to end. With a real checkpoint the
reasoning and the similarities are the model's.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ume_retriever import Item, UMEEncoder
from ume_retriever.model.tiny import build_tiny_checkpoint


def make_corpus(folder: Path) -> list[tuple[str, Item]]:
    """A red-circle image, a PDF page rendered with pymupdf, a moving-square video, and text."""
    import pymupdf

    img = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(img).ellipse((50, 50, 170, 170), fill="red")
    img_path = folder / "red_circle.png"
    img.save(img_path)

    doc = pymupdf.open()
    page = doc.new_page(width=300, height=400)
    page.insert_text((30, 60), "Quarterly report: revenue grew 12%", fontsize=14)
    page.draw_rect(pymupdf.Rect(30, 100, 270, 300), color=(0, 0, 1), fill=(0.6, 0.7, 1.0))
    page_png = folder / "report_page1.png"
    page.get_pixmap(dpi=72).save(str(page_png))

    frames = []
    for t in range(8):  # a blue square moving right
        frame = Image.new("RGB", (160, 120), "white")
        ImageDraw.Draw(frame).rectangle((10 + 15 * t, 40, 50 + 15 * t, 80), fill="blue")
        frames.append(frame)

    return [
        ("text", Item(text="A red circle on a white background.")),
        ("image", Item(image=img_path)),
        ("pdf page", Item(image=page_png, text="Quarterly report: revenue grew 12%")),
        ("video", Item(video=frames)),
        ("query", Item(text="a round red shape", instruction="Find an image that matches the given text: ")),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="hub name or directory of a UME-R1 checkpoint (default: a tiny random one)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = args.model or str(build_tiny_checkpoint(folder / "tiny-ume"))
        encoder = UMEEncoder.from_pretrained(model, max_new_tokens=args.max_new_tokens)
        corpus = make_corpus(folder)
        results = encoder.encode([item for _, item in corpus], mode="both", show_progress=True)

    print(f"\nmodel: {model}  (embedding size {encoder.embedding_dim})\n")
    print(f"{'input':<10} {'gen outcome':<12} reasoning")
    for (name, _), r in zip(corpus, results):
        if r.error:
            print(f"{name:<10} ERROR {r.error}")
            continue
        reasoning = " ".join(r.reasoning.split())[:70]
        print(f"{name:<10} {r.gen_outcome.value:<12} {reasoning!r}")
    disc = np.stack([r.disc for r in results])
    gen = np.stack([r.gen for r in results])
    names = [n for n, _ in corpus]
    for label, vecs in (("disc", disc), ("gen", gen)):
        sims = vecs[-1] @ vecs[:-1].T  # the query against the four documents
        ranked = sorted(zip(names[:-1], sims), key=lambda x: -x[1])
        print(f"\nquery vs documents ({label} cosine): " + ", ".join(f"{n} {s:.3f}" for n, s in ranked))


if __name__ == "__main__":
    main()
