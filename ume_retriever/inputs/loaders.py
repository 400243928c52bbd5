"""Files to items: PDF pages, images, videos (whole or in clips), text/markdown (whole or chunked).

``load_paths`` walks paths (folders recursively, sorted, symlink loops safe) and yields, per
file, either ``LoadedItem``s (lazily: a 2,000-page PDF is rendered page by page as consumed)
or one ``LoadFailure`` with the reason. Nothing is skipped silently.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from .item import VIDEO_SUFFIXES, Item

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".tif", ".tiff", ".bmp"}
TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
PDF_SUFFIXES = {".pdf"}


@dataclass(frozen=True)
class LoaderConfig:
    """How files become items.

    pdf_dpi: render resolution; pages are scaled down further to fit ``pdf_max_pixels``
    (default: the model's image pixel cap, set by the index). text_chunk_chars: None keeps one
    item per text file; a number splits into chunks of about that many characters (cut at
    whitespace) overlapping by ``text_chunk_overlap``. video_clip_seconds: None keeps one item
    per video; a number splits it into clips of that length.
    """

    pdf_dpi: int = 144
    pdf_max_pixels: int | None = None
    text_chunk_chars: int | None = None
    text_chunk_overlap: int = 200
    video_clip_seconds: float | None = None


@dataclass
class LoadedItem:
    """One item from a file, with what the index stores about it."""

    item: Item
    source: str  # absolute path of the file
    locator: str  # "" for whole files, "page=3", "clip=0.000-8.000", "chunk=2"
    modality: str  # "pdf_page" | "image" | "video" | "text"
    content_hash: str
    file_hash: str
    text: str | None = None  # text kept in the payload (the page's extracted text, the chunk)
    fields: dict[str, Any] = field(default_factory=dict)  # page, clip_start, clip_end, chunk


@dataclass
class LoadFailure:
    source: str
    reason: str


def file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x00")
    return h.hexdigest()


def walk(paths: Iterable[str | os.PathLike]) -> Iterator[Path | LoadFailure]:
    """Files under ``paths`` in sorted order; folders recursively; each real folder once."""
    seen_dirs: set[str] = set()
    for raw in paths:
        path = Path(raw).expanduser().absolute()
        if not path.exists():
            yield LoadFailure(str(path), "path does not exist")
        elif path.is_dir():
            yield from _walk_dir(path, seen_dirs)
        else:
            yield path


def _walk_dir(folder: Path, seen: set[str]) -> Iterator[Path | LoadFailure]:
    real = os.path.realpath(folder)
    if real in seen:  # a symlink loop or a folder reached twice
        return
    seen.add(real)
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        yield LoadFailure(str(folder), f"cannot list folder ({exc.strerror or exc})")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk_dir(entry, seen)
        elif entry.is_file():
            yield entry
        elif entry.is_symlink():
            yield LoadFailure(str(entry), "broken symbolic link")


def modality_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        return "pdf"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return None


class FileLoadError(Exception):
    """A whole file cannot be loaded (raised while iterating its items)."""


def load_file(path: Path, config: LoaderConfig, fhash: str | None = None) -> Iterator[LoadedItem]:
    """The items of one file. Raises ``FileLoadError`` with a reason when the file is unusable."""
    kind = modality_of(path)
    if kind is None:
        raise FileLoadError(f"unsupported file type {path.suffix or '(no suffix)'!r}")
    try:
        if path.stat().st_size == 0:
            raise FileLoadError("file is empty (0 bytes)")
        fhash = fhash or file_hash(path)
    except OSError as exc:
        raise FileLoadError(f"cannot read file ({exc.strerror or exc})") from None
    source = str(path)
    if kind == "pdf":
        yield from _pdf_pages(path, config, fhash)
    elif kind == "image":
        yield LoadedItem(Item(image=path), source, "", "image", content_hash=fhash, file_hash=fhash)
    elif kind == "video":
        yield from _video_clips(path, config, fhash)
    else:
        yield from _text_chunks(path, config, fhash)


def render_page(page: Any, dpi: int, max_pixels: int | None) -> Image.Image:
    """One pymupdf page as an RGB image at ``dpi``, scaled down to fit ``max_pixels``."""
    import pymupdf

    zoom = dpi / 72
    width, height = page.rect.width * zoom, page.rect.height * zoom
    if max_pixels and width * height > max_pixels:
        zoom *= (max_pixels / (width * height)) ** 0.5
    pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
    return Image.frombytes("RGB", (pix.width, pix.height), pix.samples)


def render_pdf_page(path: Path, page: int, dpi: int, max_pixels: int | None) -> Image.Image:
    """Page ``page`` (1-based) of the PDF at ``path``, rendered as ``render_page`` does.

    ``FileLoadError`` when the PDF cannot be read, ``ValueError`` when it has no such page.
    """
    with open_pdf(Path(path)) as doc:
        if not 1 <= page <= doc.page_count:
            raise ValueError(f"page {page} of {path} does not exist ({doc.page_count} pages)")
        return render_page(doc.load_page(page - 1), dpi, max_pixels)


def open_pdf(path: Path) -> Any:
    """Open a PDF for reading pages; ``FileLoadError`` says why it cannot be read."""
    import pymupdf

    try:
        doc = pymupdf.open(path)
    except Exception as exc:  # noqa: BLE001 - pymupdf raises several types for broken files
        raise FileLoadError(f"not a readable PDF ({exc})") from None
    if doc.needs_pass:
        doc.close()
        raise FileLoadError("PDF is encrypted (password required)")
    if doc.page_count == 0:
        doc.close()
        raise FileLoadError("PDF has zero pages")
    return doc


def _pdf_pages(path: Path, config: LoaderConfig, fhash: str) -> Iterator[LoadedItem]:
    with open_pdf(path) as doc:
        for number in range(doc.page_count):
            try:
                page = doc.load_page(number)
                image = render_page(page, config.pdf_dpi, config.pdf_max_pixels)
                text = page.get_text().strip()
                chash = _hash(image.tobytes(), str(image.width), str(image.height))
            except Exception as exc:  # noqa: BLE001
                raise FileLoadError(f"page {number + 1}: cannot render ({exc})") from None
            yield LoadedItem(
                Item(image=image), str(path), f"page={number + 1}", "pdf_page", content_hash=chash,
                file_hash=fhash, text=text, fields={"page": number + 1, "pages": doc.page_count},
            )


def _video_clips(path: Path, config: LoaderConfig, fhash: str) -> Iterator[LoadedItem]:
    try:
        import decord

        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        frames, fps = len(reader), reader.get_avg_fps()
        del reader
    except Exception as exc:  # noqa: BLE001
        raise FileLoadError(f"cannot decode video ({type(exc).__name__}: {exc})") from None
    if frames == 0 or fps <= 0:
        raise FileLoadError("video has zero frames")
    duration = frames / fps
    step = config.video_clip_seconds or duration
    start = 0.0
    while start < duration - 1e-6:
        end = min(duration, start + step)
        yield LoadedItem(
            Item(video=path, video_start=start, video_end=end), str(path), f"clip={start:.3f}-{end:.3f}", "video",
            content_hash=_hash(fhash, f"{start:.3f}-{end:.3f}"), file_hash=fhash,
            fields={"clip_start": round(start, 3), "clip_end": round(end, 3)},
        )
        start = end


def _text_chunks(path: Path, config: LoaderConfig, fhash: str) -> Iterator[LoadedItem]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FileLoadError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise FileLoadError("text file holds only whitespace")
    chunks = [text] if not config.text_chunk_chars else chunk_text(text, config.text_chunk_chars,
                                                                   config.text_chunk_overlap)
    for i, chunk in enumerate(chunks):
        locator = "" if len(chunks) == 1 and not config.text_chunk_chars else f"chunk={i}"
        yield LoadedItem(Item(text=chunk), str(path), locator, "text", content_hash=_hash(chunk), file_hash=fhash,
                         text=chunk, fields={"chunk": i} if locator else {})


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Chunks of at most ``size`` characters, cut at whitespace when possible, overlapping."""
    if size <= overlap:
        raise ValueError(f"text_chunk_chars ({size}) must exceed text_chunk_overlap ({overlap})")
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind(" ", start + size // 2, end)
            end = cut if cut > start else end
        chunk = text[start:end].strip()
        if chunk:
            chunks.append(chunk)
        if end >= len(text):
            break
        start = max(end - overlap, start + 1)
    return chunks
