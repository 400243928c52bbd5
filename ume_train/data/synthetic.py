"""Synthetic multimodal retrieval data that needs nothing from the internet.

Scenes of one coloured shape drawn with PIL: as images (shape, colour, quadrant), as short mp4
videos (the shape moving in one of four directions) and as PDF pages made with pymupdf (a
heading line plus the drawing). Each scene has a text query describing it and templated
UME-R1 reasoning for both sides. Combinations of attributes are split into seen and held-out
ones: the held-out combinations never appear in training, every single attribute value does.

    python -m ume_train.data.synthetic ./shapes --modalities image,video,pdf
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 230),
    "yellow": (235, 200, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
}
# Colours of the reasoning task's second vocabulary (ume_train.data.reasoning_task); the
# scenes here use COLOURS only.
EXTRA_COLOURS = {
    "pink": (240, 110, 180), "brown": (120, 70, 30), "cyan": (20, 200, 210), "black": (20, 20, 20),
    "grey": (128, 128, 128), "lime": (150, 230, 40),
}
PALETTE = {**COLOURS, **EXTRA_COLOURS}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
MOTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
MODALITIES = ("image", "video", "pdf")
_QUERY_TEMPLATES = ("a {colour} {shape} in the {where}", "the {where} has a {colour} {shape}",
                    "find a {colour} {shape} at the {where}")
_VIDEO_TEMPLATES = ("a {colour} {shape} moving from {where}", "a video of a {colour} {shape} going {where}")
_INSTRUCTIONS = {"image": "Find the matching image: ", "video": "Find the matching video: ",
                 "pdf": "Find the matching page: "}


@dataclass(frozen=True)
class Scene:
    """One combination of attributes; ``where`` is a position (image, pdf) or a motion (video)."""

    shape: str
    colour: str
    where: str
    modality: str = "image"

    @property
    def key(self) -> str:
        return f"{self.modality}:{self.colour} {self.shape} {self.where}"

    def summary(self) -> str:
        return f"{self.colour} {self.shape} {self.where}"

    def query_text(self, rng: random.Random) -> str:
        templates = _VIDEO_TEMPLATES if self.modality == "video" else _QUERY_TEMPLATES
        return rng.choice(templates).format(colour=self.colour, shape=self.shape, where=self.where)

    def query_reasoning(self) -> str:
        kind = {"image": "an image", "video": "a video", "pdf": "a page"}[self.modality]
        return (f"<think>The query asks for {kind} of a {self.colour} {self.shape} {self._where_phrase()}.</think>"
                f"<answer> {self.summary()} <gen_emb>")

    def target_reasoning(self) -> str:
        kind = {"image": "image", "video": "video", "pdf": "page"}[self.modality]
        return (f"<think>The {kind} shows a {self.colour} {self.shape} {self._where_phrase()}.</think>"
                f"<answer> {self.summary()} <gen_emb>")

    def _where_phrase(self) -> str:
        return f"moving from {self.where}" if self.modality == "video" else f"in the {self.where}"


def all_scenes(modality: str = "image") -> list[Scene]:
    wheres = MOTIONS if modality == "video" else POSITIONS
    return [Scene(s, c, w, modality) for s, c, w in itertools.product(SHAPES, COLOURS, wheres)]


def split_scenes(scenes: list[Scene], heldout_fraction: float, seed: int) -> tuple[list[Scene], list[Scene]]:
    """Seen and held-out combinations; every shape, colour and position stays in the seen part."""
    rng = random.Random(seed)
    order = scenes[:]
    rng.shuffle(order)
    want = round(len(scenes) * heldout_fraction)
    heldout: list[Scene] = []
    for scene in order:
        if len(heldout) == want:
            break
        rest = [s for s in scenes if s not in heldout and s != scene]
        covered = all({getattr(s, a) for s in rest} >= {getattr(x, a) for x in scenes} for a in ("shape", "colour", "where"))
        if covered:
            heldout.append(scene)
    seen = [s for s in scenes if s not in heldout]
    return seen, heldout


# -- drawing --------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    elif shape == "star":  # five points
        pts = [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(pts, fill=fill)
    elif shape == "hexagon":
        draw.polygon([(cx + r * math.cos(i * math.pi / 3), cy + r * math.sin(i * math.pi / 3)) for i in range(6)],
                     fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(r * 0.35)))
    elif shape == "bar":  # a wide, flat rectangle
        draw.rectangle((cx - r, cy - r * 0.3, cx + r, cy + r * 0.3), fill=fill)
    elif shape == "arrow":  # pointing right
        draw.polygon([(cx - r, cy - r * 0.25), (cx, cy - r * 0.25), (cx, cy - r * 0.7), (cx + r, cy),
                      (cx, cy + r * 0.7), (cx, cy + r * 0.25), (cx - r, cy + r * 0.25)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_scene(scene: Scene, size: int, rng: random.Random, centre: tuple[float, float] | None = None,
               radius: float | None = None) -> Image.Image:
    """The shape in its quadrant of a white ``size`` x ``size`` image, with random jitter."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    quarter = size / 4
    if centre is None:
        col = 1 if "left" in scene.where else 3
        row = 1 if "top" in scene.where else 3
        centre = (col * quarter + rng.uniform(-0.15, 0.15) * quarter, row * quarter + rng.uniform(-0.15, 0.15) * quarter)
    radius = quarter * rng.uniform(0.7, 0.9) if radius is None else radius
    jitter = tuple(max(0, min(255, v + rng.randint(-15, 15))) for v in PALETTE[scene.colour])
    _draw_shape(ImageDraw.Draw(img), scene.shape, centre[0], centre[1], radius, jitter)
    return img


def video_frames(scene: Scene, size: int, rng: random.Random, frames: int = 16) -> list[Image.Image]:
    """The shape crossing the frame in the scene's direction (``where`` is a motion)."""
    start, end = {"left to right": ((0.2, 0.5), (0.8, 0.5)), "right to left": ((0.8, 0.5), (0.2, 0.5)),
                  "top to bottom": ((0.5, 0.2), (0.5, 0.8)), "bottom to top": ((0.5, 0.8), (0.5, 0.2))}[scene.where]
    offset = rng.uniform(-0.08, 0.08)
    seed = rng.random()
    out = []
    for i in range(frames):
        a = i / (frames - 1)
        x = (start[0] + a * (end[0] - start[0]) + (offset if start[0] == end[0] else 0)) * size
        y = (start[1] + a * (end[1] - start[1]) + (offset if start[1] == end[1] else 0)) * size
        out.append(draw_scene(scene, size, random.Random(seed), centre=(x, y)))  # same size/colour each frame
    return out


def write_mp4(frames: list[Image.Image], path: Path, fps: int = 8) -> None:
    import av  # PyAV (the ``train`` extra): writes real H.264 mp4 files that decord reads

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_pdf_page(scene: Scene, path: Path, size: int, rng: random.Random, number: int) -> None:
    """A one-page PDF: a heading line of text above the scene's drawing."""
    import pymupdf

    doc = pymupdf.open()
    add_pdf_page(doc, scene, size, rng, number)
    doc.save(str(path))
    doc.close()


def add_pdf_page(doc: Any, scene: Scene, size: int, rng: random.Random, number: int, heading: str | None = None) -> None:
    """Append a page to a pymupdf document: a heading (default "Figure N") above the scene's drawing."""
    import io

    import pymupdf

    page = doc.new_page(width=300, height=340)
    page.insert_text((20, 28), heading or f"Figure {number}", fontsize=16)
    buf = io.BytesIO()
    draw_scene(scene, size, rng).save(buf, format="PNG")
    page.insert_image(pymupdf.Rect(20, 40, 280, 300), stream=buf.getvalue())


# -- datasets -------------------------------------------------------------------------------


@dataclass
class SyntheticData:
    root: Path
    train: Path  # train.jsonl: pairs over seen combinations only
    eval: Path  # eval.jsonl: one fresh pair per combination; "dataset" is "seen" or "unseen"
    seen: list[Scene]
    heldout: list[Scene]


def _side(text: str | None, media: dict[str, Any], instruction: str | None, reasoning: str) -> dict[str, Any]:
    return {"text": text, **media, "instruction": instruction, "reasoning": reasoning}


def make_dataset(
    root: str | Path,
    *,
    modalities: tuple[str, ...] = ("image",),
    image_size: int = 28,
    train_per_scene: int = 8,
    heldout_fraction: float = 0.2,
    video_frames_per_clip: int = 8,
    seed: int = 0,
) -> SyntheticData:
    """Write images/videos/PDFs and ``train.jsonl`` / ``eval.jsonl`` (our record format) under ``root``."""
    root = Path(root)
    media_dir = root / "media"
    media_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen_all, heldout_all, train, evals = [], [], [], []
    for modality in modalities:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; choose from {MODALITIES}")
        seen, heldout = split_scenes(all_scenes(modality), heldout_fraction, seed)
        seen_all += seen
        heldout_all += heldout
        plan = [(s, "train", i) for s in seen for i in range(train_per_scene)]
        plan += [(s, "seen" if s in seen else "unseen", 0) for s in seen + heldout]
        for n, (scene, split, i) in enumerate(plan):
            stem = f"{modality}-{split}-{scene.summary().replace(' ', '_')}-{i}"
            if modality == "image":
                path = media_dir / f"{stem}.png"
                draw_scene(scene, image_size, rng).save(path)
                media = {"image": str(path.relative_to(root))}
            elif modality == "video":
                path = media_dir / f"{stem}.mp4"
                write_mp4(video_frames(scene, image_size, rng, video_frames_per_clip), path)
                media = {"video": str(path.relative_to(root))}
            else:
                path = media_dir / f"{stem}.pdf"
                write_pdf_page(scene, path, image_size * 2, rng, n)
                media = {"pdf": str(path.relative_to(root)), "page": 1}
            record = {
                "query": _side(scene.query_text(rng), {}, _INSTRUCTIONS[modality], scene.query_reasoning()),
                "target": _side(None, media, None, scene.target_reasoning()),
                "dataset": split if split != "train" else f"train-{modality}",
                "scene": scene.key,
            }
            (train if split == "train" else evals).append(record)
    rng.shuffle(train)
    paths = {}
    for name, rows in (("train", train), ("eval", evals)):
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    logger.info("synthetic data in %s: %d train pairs, %d eval pairs (%d held-out combinations)",
                root, len(train), len(evals), len(heldout_all))
    return SyntheticData(root, paths["train"], paths["eval"], seen_all, heldout_all)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the synthetic shape-scene dataset (offline).")
    ap.add_argument("root")
    ap.add_argument("--modalities", default="image", help="comma-separated: image,video,pdf")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--train-per-scene", type=int, default=8)
    ap.add_argument("--heldout-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_dataset(args.root, modalities=tuple(args.modalities.split(",")), image_size=args.image_size,
                 train_per_scene=args.train_per_scene, heldout_fraction=args.heldout_fraction, seed=args.seed)


if __name__ == "__main__":
    main()
