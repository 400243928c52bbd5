"""Reading images and videos into RGB PIL frames, with clear per-input errors.

Large images are never decoded blindly: the header is read first, JPEGs above the decode
limit are decoded at a reduced scale (``Image.draft``), other formats above it are refused.
The processor's own pixel caps then decide the resolution the model sees.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from ..faults import fault_point
from .decode_guard import decoding
from .item import describe_source

logger = logging.getLogger(__name__)

# ~192 MB as RGB: far above what any Qwen2-VL processor keeps (its cap is ~12.8 MP).
DEFAULT_MAX_DECODE_PIXELS = 64_000_000
DEFAULT_NUM_FRAMES = 8


def _open_source(src: Any, what: str) -> Image.Image:
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise InputError(what, "file not found")
        if path.is_dir():
            raise InputError(what, "is a directory, not an image file")
        if path.stat().st_size == 0:
            raise InputError(what, "file is empty (0 bytes)")
        fp: Any = path
    elif isinstance(src, (bytes, bytearray)):
        if len(src) == 0:
            raise InputError(what, "image bytes are empty")
        fp = io.BytesIO(src)
    else:
        raise InputError(what, f"unsupported image type {type(src).__name__}")
    try:
        with warnings.catch_warnings():
            # PIL warns between 89M and 179M pixels; our own limit below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise InputError(what, f"image too large to decode safely ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(what, f"not a readable image ({exc})") from None


def load_image(src: Any, max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> Image.Image:
    """Return ``src`` (PIL image, path or bytes) as a fully decoded RGB PIL image."""
    what = f"image {describe_source(src)}"
    img = src if isinstance(src, Image.Image) else _open_source(src, what)
    width, height = img.size
    if width * height > max_decode_pixels:
        if img.format == "JPEG" and not isinstance(src, Image.Image):
            # draft() picks the smallest 1/2^n scale at least as large as asked: asking for
            # half the target per side lands in [target/2, target), i.e. within the limit.
            scale = 0.5 * (max_decode_pixels / (width * height)) ** 0.5
            img.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
        if img.size[0] * img.size[1] > max_decode_pixels:
            raise InputError(
                what,
                f"image is {width}x{height} = {width * height:,} pixels, above the decode "
                f"limit of {max_decode_pixels:,}; downscale it or raise max_decode_pixels",
            )
        logger.info("decoding %s at reduced scale %s", what, img.size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            if img.size[0] == 0 or img.size[1] == 0:
                raise InputError(what, f"image has no pixels ({img.size[0]}x{img.size[1]})")
            out = _to_rgb(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(what, f"truncated or corrupt image data ({exc})") from None
    finally:
        if not isinstance(src, Image.Image):
            img.close()  # our own file handle; the decoded copy lives on
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy; transparent areas become white (as qwen-vl-utils does), not black."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.split()[3])
        return canvas
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


def uniform_indices(total: int, num: int) -> list[int]:
    """``num`` frame indices spread evenly over ``total`` frames, first and last included."""
    if total <= 0:
        return []
    if total <= num:
        return list(range(total))
    return [int(round(x)) for x in np.linspace(0, total - 1, num)]


def load_video(
    src: Any,
    num_frames: int = DEFAULT_NUM_FRAMES,
    start: float | None = None,
    end: float | None = None,
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
) -> list[Image.Image]:
    """Return ``num_frames`` uniformly sampled RGB frames of a video.

    ``src`` is a video file (read with decord; ``start``/``end`` in seconds select a clip),
    a sequence of frames (PIL images, paths or bytes), or a uint8 array (T, H, W, 3).
    Sequences longer than ``num_frames`` are sampled uniformly too.
    """
    what = f"video {describe_source(src)}"
    if isinstance(src, (str, os.PathLike)):
        return _read_video_file(Path(src), what, num_frames, start, end, max_decode_pixels)
    if isinstance(src, np.ndarray):
        if src.ndim != 4 or src.shape[-1] != 3:
            raise InputError(what, f"expected a (T, H, W, 3) array, got shape {src.shape}")
        frames: Sequence[Any] = [Image.fromarray(np.ascontiguousarray(f).astype(np.uint8)) for f in src]
    elif isinstance(src, (list, tuple)):
        frames = src
    else:
        raise InputError(what, f"unsupported video type {type(src).__name__}")
    if len(frames) == 0:
        raise InputError(what, "video has zero frames")
    picked = [frames[i] for i in uniform_indices(len(frames), num_frames)]
    out = []
    for i, frame in enumerate(picked):
        try:
            out.append(load_image(frame, max_decode_pixels))
        except InputError as exc:
            raise InputError(what, f"frame {i}: {exc.reason}") from None
    return out


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's headers say, read without decoding a frame."""

    width: int
    height: int
    frames: int
    fps: float

    @property
    def duration(self) -> float:
        return self.frames / self.fps


def probe_video(path: Path, what: str | None = None) -> VideoInfo:
    """Size, frame count and frame rate from the container (PyAV), decoding nothing.

    ``InputError`` when the file cannot be opened, has no video stream, or its frame rate,
    frame count or size is missing, zero, or not a number.
    """
    import av

    what = what or f"video {describe_source(path)}"
    try:
        with decoding(path), av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(what, "no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else float("nan")
            frames = int(stream.frames or 0)
            if frames == 0 and math.isfinite(fps):  # some containers do not count frames: from the duration
                seconds = (float(stream.duration * stream.time_base) if stream.duration
                           else (container.duration or 0) / 1_000_000)
                frames = int(round(seconds * fps))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV raises its own error types for broken files
        raise InputError(what, f"cannot decode video (headers unreadable: {type(exc).__name__}: {exc})") from None
    if not (math.isfinite(fps) and fps > 0):
        raise InputError(what, f"frame rate is {fps!r}: not a usable video")
    if frames <= 0:
        raise InputError(what, "video has zero frames (zero duration)")
    if width <= 0 or height <= 0:
        raise InputError(what, f"video frames are {width}x{height}")
    return VideoInfo(width, height, frames, fps)


def capped_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most ``max_pixels``; unchanged if within."""
    if width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(2, int(width * scale)), max(2, int(height * scale))


def _read_video_file(
    path: Path, what: str, num_frames: int, start: float | None, end: float | None,
    max_decode_pixels: int,
) -> list[Image.Image]:
    if not path.exists():
        raise InputError(what, "file not found")
    if path.stat().st_size == 0:
        raise InputError(what, "file is empty (0 bytes)")
    try:
        import decord  # noqa: F401 - only to say clearly when it is missing
    except ImportError:
        raise InputError(what, "reading video files needs decord (pip install decord)") from None
    info = probe_video(path, what)  # the size from the headers: frames are decoded within the cap
    with decoding(path):
        fault_point("inside_video_decode")
        return _decode_frames(path, what, info, num_frames, start, end, max_decode_pixels)


def _decode_frames(path: Path, what: str, info: VideoInfo, num_frames: int, start: float | None, end: float | None,
                   max_decode_pixels: int) -> list[Image.Image]:
    import decord

    try:
        width, height = capped_size(info.width, info.height, max_decode_pixels)
        size = {} if (width, height) == (info.width, info.height) else {"width": width, "height": height}
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, **size)
        total = len(reader)
        if total == 0:
            raise InputError(what, "video has zero frames")
        first, last = 0, total - 1
        if start is not None or end is not None:
            fps = reader.get_avg_fps()
            first = max(0, int(round((start or 0.0) * fps)))
            last = min(total - 1, int(round(end * fps)) if end is not None else total - 1)
            if last < first:
                raise InputError(what, f"clip {start}-{end}s holds no frames (video has {total / fps:.2f}s)")
        indices = [first + i for i in uniform_indices(last - first + 1, num_frames)]
        batch = reader.get_batch(indices).asnumpy()  # (T, H, W, 3) uint8
    except InputError:
        raise
    except Exception as exc:  # decord raises its own DECORDError and RuntimeErrors
        raise InputError(what, f"cannot decode video ({type(exc).__name__}: {exc})") from None
    return [Image.fromarray(frame) for frame in batch]


def blank_image() -> Image.Image:
    """The white 28x28 image UME-R1 attaches to text-only inputs."""
    return Image.new("RGB", (28, 28), (255, 255, 255))
