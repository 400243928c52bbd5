"""A viewable image file for a search hit: the image itself, a rendered PDF page, a video frame.

Framework nodes (LlamaIndex ``ImageNode.image_path``), the demo's result picture and the
notebook all need a picture of what was found. Pages and video frames are rendered once into
a cache folder (named by content hash, so a changed file never shows a stale preview).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from PIL import Image

logger = logging.getLogger(__name__)

PREVIEW_DPI = 96


def default_cache_dir() -> Path:
    base = os.environ.get("UME_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ume")
    return Path(base).expanduser() / "previews"


def preview_path(payload: Mapping[str, Any], cache_dir: str | os.PathLike | None = None) -> str | None:
    """A PNG/JPEG path showing the hit, or None (text, an item without a file, a missing file).

    Images are returned as they are; PDF pages and videos (middle frame of the clip) are
    rendered into ``cache_dir`` (default ``$UME_CACHE/previews`` or ``~/.cache/ume/previews``).
    """
    source, modality = payload.get("source"), payload.get("modality")
    if not source or not Path(source).is_file():
        return None
    if modality == "image":
        return source
    if modality not in ("pdf_page", "video"):
        return None
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tag = payload.get("content_hash") or payload.get("file_hash") or "x"
    target = cache / f"{tag}-{payload.get('locator') or 'whole'}.png".replace("=", "-")
    if target.is_file():
        return str(target)
    try:
        if modality == "pdf_page":
            from .inputs.loaders import render_pdf_page

            image = render_pdf_page(Path(source), int(payload["page"]), PREVIEW_DPI, None)
        else:
            image = _video_frame(source, payload)
    except Exception as exc:  # noqa: BLE001 - a preview is a convenience: log, never fail a search
        logger.warning("no preview for %s %s: %s", source, payload.get("locator", ""), exc)
        return None
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp.png")
    image.save(tmp)
    os.replace(tmp, target)  # atomic: a concurrent reader never sees half a file
    return str(target)


def _video_frame(source: str, payload: Mapping[str, Any]) -> Image.Image:
    import decord

    reader = decord.VideoReader(source)
    fps = float(reader.get_avg_fps()) or 1.0
    start = float(payload.get("clip_start") or 0.0)
    end = float(payload.get("clip_end") or len(reader) / fps)
    index = min(len(reader) - 1, max(0, int((start + end) / 2 * fps)))
    return Image.fromarray(reader[index].asnumpy())
