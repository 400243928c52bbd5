"""The demo's small multimodal corpus (a 3-page PDF, images, videos, text notes) and its queries,
each with the item it must find.

Every scene is a combination the demo model saw in training (fresh renders, not training
files); the text notes describe other scenes and act as distractors. Files that already exist
are left as they are, so a re-run finds its index up to date (images and the PDF come out
byte-identical anyway; libx264 does not always).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..data.synthetic import Scene, add_pdf_page, draw_scene, video_frames, write_mp4

IMAGE_SIZE = 28  # the demo model's image size: one visual token per image


@dataclass(frozen=True)
class DemoQuery:
    text: str | None
    instruction: str | None
    expected: tuple[str, int | None]  # (file name relative to the corpus, page or None)
    image: str | None = None  # relative path of a query image (an image query)

    def describe(self) -> str:
        return self.text if self.text else f"[image {self.image}]"


IMAGES = {"red_circle.png": Scene("circle", "red", "top left"),
          "yellow_triangle.png": Scene("triangle", "yellow", "bottom right"),
          "purple_cross.png": Scene("cross", "purple", "top right"),
          "green_circle.png": Scene("circle", "green", "bottom left")}
PAGES = [Scene("square", "blue", "top left", "pdf"), Scene("diamond", "orange", "bottom left", "pdf"),
         Scene("triangle", "green", "top right", "pdf")]
VIDEOS = {"yellow_circle.mp4": Scene("circle", "yellow", "left to right", "video"),
          "purple_diamond.mp4": Scene("diamond", "purple", "top to bottom", "video")}
NOTES = {"notes.txt": "Meeting notes: the red square goes in the bottom left of the poster.",
         "todo.md": "# To do\n- draw a blue cross in the bottom right\n- send the report"}

QUERIES = [
    DemoQuery("a red circle in the top left", "Find the matching image: ", ("images/red_circle.png", None)),
    DemoQuery("find a yellow triangle at the bottom right", "Find the matching image: ",
              ("images/yellow_triangle.png", None)),
    DemoQuery("the top left has a blue square", "Find the matching page: ", ("report.pdf", 1)),
    DemoQuery("a orange diamond in the bottom left", "Find the matching page: ", ("report.pdf", 2)),
    DemoQuery("a yellow circle moving from left to right", "Find the matching video: ",
              ("videos/yellow_circle.mp4", None)),
    DemoQuery(None, None, ("images/purple_cross.png", None), image="query/purple_cross_photo.png"),
]


def write_demo_corpus(root: str | Path, seed: int = 1) -> Path:
    """Write the corpus under ``root/corpus`` (and the query image under ``root/query``)."""
    import pymupdf

    root = Path(root)
    corpus = root / "corpus"
    for sub in ("images", "videos"):
        (corpus / sub).mkdir(parents=True, exist_ok=True)
    (root / "query").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)  # drawn in a fixed order: every file's content is fixed by the seed
    for name, scene in IMAGES.items():
        image = draw_scene(scene, IMAGE_SIZE, rng)
        _keep_or_write(corpus / "images" / name, image.save)
    doc = pymupdf.open()
    for number, scene in enumerate(PAGES, start=1):
        add_pdf_page(doc, scene, IMAGE_SIZE * 2, rng, number, heading=f"Report, figure {number}")
    doc.set_metadata({})  # no creation date: the same bytes on every run
    _keep_or_write(corpus / "report.pdf", lambda p: doc.save(str(p), no_new_id=True))
    doc.close()
    for name, scene in VIDEOS.items():
        frames = video_frames(scene, IMAGE_SIZE, rng, 8)
        _keep_or_write(corpus / "videos" / name, lambda p: write_mp4(frames, p))
    for name, text in NOTES.items():
        _keep_or_write(corpus / name, lambda p: p.write_text(text + "\n"))
    # A new render of the purple cross (other jitter): the image query.
    query = draw_scene(IMAGES["purple_cross.png"], IMAGE_SIZE, rng)
    _keep_or_write(root / "query" / "purple_cross_photo.png", query.save)
    return corpus


def _keep_or_write(path: Path, write) -> None:
    if not path.is_file():
        write(path)
