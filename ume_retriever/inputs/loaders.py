"""Files to items: PDF pages, images, videos (whole or in clips), text/markdown (whole or chunked).

``walk`` lists paths (folders recursively, sorted, symlink loops safe); ``load_file`` yields a
file's ``LoadedItem``s lazily (a 2,000-page PDF is rendered page by page as consumed) or
raises ``FileLoadError`` with the reason. Nothing is skipped silently: what is not indexed is
a ``LoadFailure`` (cannot be read) or a ``Skipped`` entry (not followed or not a regular file:
symbolic links out of the folder, FIFOs, sockets, devices), each with its reason.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from ..errors import InputError
from .decode_guard import decoding
from .item import VIDEO_SUFFIXES, Item
from .media import probe_video

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
    per video; a number splits it into clips of that length (at least ``MIN_CLIP_SECONDS``).
    text_chunk_overlap: None is 200 characters, or a fifth of the chunk when that is smaller.
    follow_symlinks: inside a folder, symbolic links that lead out of it are skipped (and
    reported) unless this is True; a link named directly is always followed.
    Impossible settings raise ``ValueError`` naming the field when the config is built.
    """

    pdf_dpi: int = 144
    pdf_max_pixels: int | None = None
    text_chunk_chars: int | None = None
    text_chunk_overlap: int | None = None
    video_clip_seconds: float | None = None
    follow_symlinks: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pdf_dpi, int) or self.pdf_dpi <= 0:
            raise ValueError(f"pdf_dpi must be a positive integer, got {self.pdf_dpi!r}")
        if self.pdf_max_pixels is not None and self.pdf_max_pixels < 28 * 28:
            raise ValueError(f"pdf_max_pixels must be at least {28 * 28} (one visual token), got {self.pdf_max_pixels!r}")
        if self.text_chunk_chars is not None and self.text_chunk_chars <= 0:
            raise ValueError(f"text_chunk_chars must be > 0 (or None: one item per file), got {self.text_chunk_chars!r}")
        if self.text_chunk_overlap is None:
            size = self.text_chunk_chars
            object.__setattr__(self, "text_chunk_overlap", 200 if size is None else min(200, size // 5))
        elif self.text_chunk_overlap < 0:
            raise ValueError(f"text_chunk_overlap must be >= 0, got {self.text_chunk_overlap!r}")
        if self.text_chunk_chars is not None and self.text_chunk_overlap >= self.text_chunk_chars:
            raise ValueError(f"text_chunk_overlap ({self.text_chunk_overlap}) must be below text_chunk_chars "
                             f"({self.text_chunk_chars})")
        clip = self.video_clip_seconds
        if clip is not None and not (math.isfinite(clip) and clip >= MIN_CLIP_SECONDS):
            raise ValueError(f"video_clip_seconds must be at least {MIN_CLIP_SECONDS} (or None: one item per "
                             f"video), got {clip!r}")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide a file's items (kept in each file's manifest)."""
        return {"pdf_dpi": self.pdf_dpi, "pdf_max_pixels": self.pdf_max_pixels, "text_chunk_chars": self.text_chunk_chars,
                "text_chunk_overlap": self.text_chunk_overlap, "video_clip_seconds": self.video_clip_seconds}


# A clip shorter than this holds a frame or two: it would not describe anything.
MIN_CLIP_SECONDS = 0.5
# A video cut into more clips than this is refused (a clip length far too short for the video).
MAX_CLIPS_PER_VIDEO = 100_000


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
    in_memory: bool = False  # given as an item, not read from a file: nothing to read it again from


@dataclass
class LoadFailure:
    source: str
    reason: str


@dataclass
class Skipped:
    """A path deliberately not indexed (a link out of the folder, a FIFO, ...), with why."""

    source: str
    reason: str


def printable_path(path: str | os.PathLike) -> str:
    """The path as text, undecodable bytes of its name shown as U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def _name_problem(path: Path) -> str | None:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (the index stores names as text); rename the file to index it"
    return None


def _special_kind(mode: int) -> str | None:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return None


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


def item_hash(item: Item) -> str:
    """A content hash of an in-memory item (text, instruction, image and video bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (item.instruction or "", item.text or ""):
        h.update(part.encode())
        h.update(b"\x00")
    media = list(item.all_images()) + ([] if item.video is None else
                                        (item.video if isinstance(item.video, (list, tuple)) else [item.video]))
    for src in media:
        if isinstance(src, (str, os.PathLike)):
            h.update(file_hash(Path(src)).encode() if Path(src).is_file() else os.fspath(src).encode())
        elif isinstance(src, (bytes, bytearray)):
            h.update(src)
        elif hasattr(src, "tobytes"):
            h.update(src.tobytes())
        h.update(b"\x01")
    h.update(f"{item.video_start}-{item.video_end}".encode())
    return h.hexdigest()


def walk(paths: Iterable[str | os.PathLike], follow_symlinks: bool = False) -> Iterator[Path | LoadFailure | Skipped]:
    """Regular files under ``paths`` in sorted order (folders recursively, each real folder
    once), and a ``LoadFailure`` or ``Skipped`` entry for everything else met on the way."""
    seen_dirs: set[str] = set()
    for raw in paths:
        path = Path(raw).expanduser().absolute()
        problem = _name_problem(path)
        if problem:
            yield LoadFailure(printable_path(path), problem)
        elif not path.exists():
            yield LoadFailure(str(path), "path does not exist")
        elif path.is_dir():
            yield from _walk_dir(path, seen_dirs, os.path.realpath(path), follow_symlinks)
        else:
            yield _regular_file(path)


def _regular_file(path: Path) -> Path | LoadFailure | Skipped:
    """``path`` if it is a regular file (after links), else why not; never opens it."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return LoadFailure(str(path), f"cannot stat file ({exc.strerror or exc})")
    kind = _special_kind(mode)
    if kind is not None:
        return Skipped(str(path), f"{kind}, not a regular file: never opened")
    return path


def _walk_dir(folder: Path, seen: set[str], root: str, follow: bool) -> Iterator[Path | LoadFailure | Skipped]:
    real = os.path.realpath(folder)
    if real in seen:  # a symlink loop or a folder reached twice
        return
    seen.add(real)
    try:
        entries = sorted(folder.iterdir(), key=lambda p: os.fsencode(p.name))
    except OSError as exc:
        yield LoadFailure(str(folder), f"cannot list folder ({exc.strerror or exc})")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        problem = _name_problem(entry)
        if problem:
            yield LoadFailure(printable_path(entry), problem)
            continue
        if entry.is_symlink():
            target = os.path.realpath(entry)
            if not os.path.exists(target):
                yield LoadFailure(str(entry), "broken symbolic link")
                continue
            if not follow and os.path.commonpath([root, target]) != root:
                yield Skipped(str(entry), f"symbolic link to {printable_path(target)}, outside {printable_path(root)}: "
                                          "not followed (follow_symlinks=True / --follow-symlinks to index it)")
                continue
        if entry.is_dir():
            yield from _walk_dir(entry, seen, root, follow)
        else:
            yield _regular_file(entry)


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


def load_locator(path: Path, locator: str, config: LoaderConfig, fhash: str) -> LoadedItem:
    """The one item at ``locator`` of a file, as ``load_file`` makes it (same content hash):
    a PDF renders only that page, a video reads only that clip's headers. ``FileLoadError``
    when the file cannot give it (changed, shorter, unreadable)."""
    kind = modality_of(path)
    if kind is None:
        raise FileLoadError(f"unsupported file type {path.suffix or '(no suffix)'!r}")
    name, _, value = locator.partition("=")
    if kind == "pdf" and name == "page" and value.isdigit():
        number = int(value)
        with decoding(path):
            doc = open_pdf(path)
        with doc:
            if not 1 <= number <= doc.page_count:
                raise FileLoadError(f"page {number} does not exist ({doc.page_count} pages)")
            return _pdf_page_item(doc, path, number, config, fhash)
    if kind == "video" and name == "clip":
        start, _, end = value.partition("-")
        try:
            bounds = float(start), float(end)
        except ValueError:
            raise FileLoadError(f"not a clip locator: {locator!r}") from None
        return _clip_item(path, *bounds, fhash)
    for loaded in load_file(path, config, fhash):  # an image, a text chunk: cheap to load whole
        if loaded.locator == locator:
            return loaded
    raise FileLoadError(f"the file has no item {locator!r} any more")


def render_page(page: Any, dpi: int, max_pixels: int | None) -> Image.Image:
    """One pymupdf page as an RGB image at ``dpi``, scaled down to fit ``max_pixels``."""
    import pymupdf

    zoom = dpi / 72
    width, height = page.rect.width * zoom, page.rect.height * zoom
    if max_pixels and width * height > max_pixels:
        # pymupdf rounds the pixmap outward (up to a row and a column more): the largest zoom z
        # with (w z + 2)(h z + 2) <= max_pixels keeps even the rounded pixmap within the cap
        w, h = page.rect.width, page.rect.height
        zoom = (-(w + h) + math.sqrt((w + h) ** 2 - w * h * (4 - max_pixels))) / (w * h)
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
    with decoding(path):
        doc = open_pdf(path)
    with doc:
        for number in range(1, doc.page_count + 1):
            yield _pdf_page_item(doc, path, number, config, fhash)


def _pdf_page_item(doc: Any, path: Path, number: int, config: LoaderConfig, fhash: str) -> LoadedItem:
    """Page ``number`` (1-based) of an open PDF, rendered, with its text and content hash."""
    try:
        with decoding(path):
            page = doc.load_page(number - 1)
            image = render_page(page, config.pdf_dpi, config.pdf_max_pixels)
            text = page.get_text().strip()
        chash = _hash(image.tobytes(), str(image.width), str(image.height))
    except Exception as exc:  # noqa: BLE001
        raise FileLoadError(f"page {number}: cannot render ({exc})") from None
    return LoadedItem(Item(image=image), str(path), f"page={number}", "pdf_page", content_hash=chash,
                      file_hash=fhash, text=text, fields={"page": number, "pages": doc.page_count})


def clip_bounds(duration: float, clip_seconds: float | None) -> list[tuple[float, float]]:
    """(start, end) seconds of each clip of a video of ``duration`` seconds (one clip if None)."""
    if not (math.isfinite(duration) and duration > 0):
        raise FileLoadError(f"video duration is {duration!r} seconds: nothing to index")
    step = clip_seconds or duration
    if duration / step > MAX_CLIPS_PER_VIDEO:
        raise FileLoadError(f"{duration:.1f}s in clips of {step}s is more than {MAX_CLIPS_PER_VIDEO:,} clips")
    bounds, start = [], 0.0
    while start < duration - 1e-6:
        end = min(duration, start + step)
        bounds.append((start, end))
        start = end
    return bounds


def _video_clips(path: Path, config: LoaderConfig, fhash: str) -> Iterator[LoadedItem]:
    try:
        info = probe_video(path)
    except InputError as exc:
        raise FileLoadError(exc.reason) from None
    for start, end in clip_bounds(info.duration, config.video_clip_seconds):
        yield _clip_item(path, start, end, fhash)


def _clip_item(path: Path, start: float, end: float, fhash: str) -> LoadedItem:
    return LoadedItem(
        Item(video=path, video_start=start, video_end=end), str(path), f"clip={start:.3f}-{end:.3f}", "video",
        content_hash=_hash(fhash, f"{start:.3f}-{end:.3f}"), file_hash=fhash,
        fields={"clip_start": round(start, 3), "clip_end": round(end, 3)},
    )


def _text_chunks(path: Path, config: LoaderConfig, fhash: str) -> Iterator[LoadedItem]:
    data = path.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:  # valid UTF-8 can hold NULs, text files do not: binary data with a text suffix
        raise FileLoadError(f"not text: binary data (a NUL byte at byte {nul})")
    try:
        text = data.decode("utf-8")
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
