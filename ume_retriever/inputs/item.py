"""``Item``: one thing to embed (text, image(s), video, or a mix), plus coercion from plain values."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

from ..errors import InputError

if TYPE_CHECKING:  # PIL is only needed when images are actually read
    import numpy as np
    from PIL import Image as PILImage

    ImageLike = Union["PILImage.Image", str, os.PathLike, bytes]
    VideoLike = Union[str, os.PathLike, Sequence[ImageLike], "np.ndarray"]

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpeg", ".mpg", ".flv", ".wmv"}


@dataclass(eq=False)
class Item:
    """One input to embed.

    - ``text``: the text part (may be combined with media).
    - ``image``: a PIL image, a path, or encoded bytes. ``images``: several of them.
    - ``video``: a video file path (read with decord, frames sampled uniformly) or a list
      of frames (PIL images, paths or bytes) or a uint8 array of shape (T, H, W, 3).
    - ``video_start`` / ``video_end``: seconds; restrict a video file to that clip.
    - ``instruction``: the task instruction put before the text (MMEB-V2 style, e.g.
      "Find a document image that matches the given query:").
    - ``metadata``: carried along untouched (loaders put source/page here).
    """

    text: str | None = None
    image: "ImageLike | None" = None
    images: "Sequence[ImageLike] | None" = None
    video: "VideoLike | None" = None
    instruction: str | None = None
    video_start: float | None = None
    video_end: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("text", "instruction"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InputError(f"Item {name}", f"{name} must be a str, got {type(value).__name__}")
        if self.images is not None and not isinstance(self.images, (list, tuple)):
            raise InputError("Item images", f"images must be a list, got {type(self.images).__name__} "
                             "(use image= for a single image)")
        for name in ("video_start", "video_end"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (int, float)):
                raise InputError(f"Item {name}", f"{name} must be seconds (a number), got {value!r}")
        if (self.video_start is not None or self.video_end is not None) and not isinstance(self.video, (str, os.PathLike)):
            raise InputError("Item video", "video_start/video_end select a clip of a video FILE; "
                             "with frames, pass only the frames you want")

    def all_images(self) -> list["ImageLike"]:
        """``image`` then ``images``, in that order."""
        out: list[Any] = [] if self.image is None else [self.image]
        if self.images is not None:
            out.extend(self.images)
        return out

    @property
    def has_media(self) -> bool:
        return self.image is not None or bool(self.images) or self.video is not None

    def describe(self) -> str:
        """A short human description used in error messages."""
        parts = []
        if self.text is not None:
            shown = self.text if len(self.text) <= 40 else self.text[:37] + "..."
            parts.append(f"text {shown!r}")
        for img in self.all_images():
            parts.append(f"image {describe_source(img)}")
        if self.video is not None:
            parts.append(f"video {describe_source(self.video)}")
        return ", ".join(parts) or "empty item"


InputLike = Union[Item, str, os.PathLike, bytes, "PILImage.Image", dict]


def describe_source(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return repr(os.fspath(src))
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    size = getattr(src, "size", None)
    if hasattr(src, "mode") and size is not None:
        return f"<PIL image {size[0]}x{size[1]}>"
    shape = getattr(src, "shape", None)
    if shape is not None:
        return f"<array {tuple(shape)}>"
    if isinstance(src, (list, tuple)):
        return f"<{len(src)} frames>"
    return f"<{type(src).__name__}>"


def as_item(value: InputLike) -> Item:
    """Coerce a plain value to an ``Item``.

    ``str`` is always text (never guessed to be a path); ``pathlib.Path`` is a file, a video
    when its suffix is a video suffix, an image otherwise; ``bytes`` and PIL images are
    images; a ``dict`` holds ``Item`` fields.
    """
    if isinstance(value, Item):
        return value
    if isinstance(value, str):
        return Item(text=value)
    if isinstance(value, os.PathLike):
        path = Path(value)
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return Item(video=path)
        return Item(image=path)
    if isinstance(value, (bytes, bytearray)):
        return Item(image=bytes(value))
    if isinstance(value, dict):
        try:
            return Item(**value)
        except TypeError as exc:
            raise InputError(f"dict with keys {sorted(value)}", f"not an Item: {exc}") from None
    if hasattr(value, "mode") and hasattr(value, "size") and hasattr(value, "convert"):
        return Item(image=value)
    raise InputError(
        describe_source(value),
        f"unsupported input type {type(value).__name__}; pass text (str), an image "
        "(PIL image, pathlib.Path, bytes), or an Item",
    )
