"""A viewable image file for a search hit: the image itself, a rendered PDF page, a video frame.

Framework nodes (LlamaIndex ``ImageNode.image_path``), the demo's result picture and the
notebook all need a picture of what was found. Pages and video frames are rendered once into
a cache folder (named by content hash, so a changed file never shows a stale preview).

What a payload says is not trusted: it comes from a store, which may be shared or old.
The cache name is built only from hex digests (``content_hash``, else ``file_hash``) and a
locator of the shape the loaders write (anything else is hashed), and the final path must lie
inside the cache folder. Renders are capped at ``PREVIEW_MAX_PIXELS`` (a 14,400 pt page at
96 dpi would otherwise be a 1 GiB pixmap). Each render is written to its own temporary file
(``tempfile.mkstemp`` in the cache folder) and renamed into place, so any number of threads or
processes may ask for the same preview at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

from PIL import Image

logger = logging.getLogger(__name__)

PREVIEW_DPI = 96
# 2048 x 2048: an A4 page at 96 dpi is 0.9 MP and keeps its size; an A0 poster (14 MP) is
# scaled down to 4.2 MP (1,722 x 2,435), still sharp on a screen; at most 12 MiB of RGB.
PREVIEW_MAX_PIXELS = 2048 * 2048

_HEX_DIGEST = re.compile(r"[0-9a-f]{16,128}")  # blake2b/sha digests as the loaders write them
_LOCATOR = re.compile(r"(page|clip|chunk)=[0-9][0-9.\-]{0,40}")  # "page=3", "clip=0.000-8.000"


def default_cache_dir() -> Path:
    base = os.environ.get("UME_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ume")
    return Path(base).expanduser() / "previews"


def preview_path(payload: Mapping[str, Any], cache_dir: str | os.PathLike | None = None) -> str | None:
    """A PNG/JPEG path showing the hit, or None (text, an item without a file, a missing file).

    Images are returned as they are; PDF pages and videos (middle frame of the clip) are
    rendered into ``cache_dir`` (default ``$UME_CACHE/previews`` or ``~/.cache/ume/previews``)
    within ``PREVIEW_MAX_PIXELS``. Never raises: a preview that cannot be made (a bad
    payload, an unreadable file, an unwritable cache) is logged and gives None.
    """
    try:
        return _preview(payload, cache_dir)
    except Exception as exc:  # noqa: BLE001 - a preview is a convenience: log, never fail a search
        where = payload.get("source") if isinstance(payload, Mapping) else None
        logger.warning("no preview for %r: %s: %s", where, type(exc).__name__, exc)
        return None


def _preview(payload: Mapping[str, Any], cache_dir: str | os.PathLike | None) -> str | None:
    source, modality = payload.get("source"), payload.get("modality")
    if not source or not isinstance(source, str) or not Path(source).is_file():
        return None
    if modality == "image":
        return source
    if modality not in ("pdf_page", "video"):
        return None
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).resolve()
    name = _cache_name(payload)
    if name is None:
        logger.warning("no preview for %s: the payload has no hex content_hash/file_hash", source)
        return None
    target = cache / name
    if target.parent != cache:  # cannot happen with the name checks above; kept as the last guard
        logger.warning("no preview for %s: %s is outside the cache %s", source, target, cache)
        return None
    if target.is_file():
        return str(target)
    if modality == "pdf_page":
        from .inputs.loaders import render_pdf_page

        image = render_pdf_page(Path(source), int(payload["page"]), PREVIEW_DPI, PREVIEW_MAX_PIXELS)
    else:
        image = _video_frame(source, payload)
    # pymupdf rounds the pixmap outward (up to a row and a column over the cap): trim to the cap
    size = _fit(image.width, image.height, PREVIEW_MAX_PIXELS)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp.png", dir=cache)  # unique per call
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, target)  # atomic: a reader sees no file or the whole file, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(target)


def _cache_name(payload: Mapping[str, Any]) -> str | None:
    """``<hex digest>-<locator>.png``, or None when the payload has no usable digest."""
    tag = payload.get("content_hash") or payload.get("file_hash")
    if not isinstance(tag, str) or not _HEX_DIGEST.fullmatch(tag):
        return None
    locator = payload.get("locator") or "whole"
    if not isinstance(locator, str):
        locator = repr(locator)
    if locator != "whole" and not _LOCATOR.fullmatch(locator):
        locator = hashlib.blake2b(locator.encode("utf-8", "replace"), digest_size=8).hexdigest()
    return f"{tag}-{locator.replace('=', '-')}.png"


def _fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most ``max_pixels``."""
    if width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def _video_frame(source: str, payload: Mapping[str, Any]) -> Image.Image:
    """The middle frame of the clip, decoded within ``PREVIEW_MAX_PIXELS`` (the size comes from
    the video's headers, as at ingest)."""
    import decord

    from .inputs.media import capped_size, probe_video

    info = probe_video(Path(source))
    width, height = capped_size(info.width, info.height, PREVIEW_MAX_PIXELS)
    size = {} if (width, height) == (info.width, info.height) else {"width": width, "height": height}
    reader = decord.VideoReader(source, ctx=decord.cpu(0), num_threads=1, **size)
    if len(reader) == 0:
        raise ValueError("video has zero frames")
    fps = float(reader.get_avg_fps()) or 1.0
    start = float(payload.get("clip_start") or 0.0)
    end = float(payload.get("clip_end") or len(reader) / fps)
    index = min(len(reader) - 1, max(0, int((start + end) / 2 * fps)))
    return Image.fromarray(reader[index].asnumpy())  # scaled to the cap by the caller
