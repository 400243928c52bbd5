"""What goes over HTTP: request bodies (pydantic), JSON views of results, and API errors.

Pure functions and models, no Ray and no model: the app, the client-facing tests and the
benchmark all read these.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..inputs.item import Item

# OpenAI error types, by HTTP status (clients such as `openai` map the status to an exception).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               422: "invalid_request_error", 500: "server_error", 503: "service_unavailable",
               504: "timeout_error"}


class APIError(Exception):
    """An error the service answers with ``{"error": {"message", "type", "param"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": None}}


# -- requests -------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored


class InputObject(_Body):
    """One embedding input beyond plain text: text, an image (data URL or base64), or both."""

    text: str | None = None
    image: str | None = Field(default=None, description="data:image/png;base64,... or plain base64")
    instruction: str | None = None


class EmbeddingsRequest(_Body):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    input: Union[str, list[Union[str, InputObject]], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # extensions
    mode: Literal["disc", "gen"] = "disc"
    instruction: str | None = Field(default=None, description="put before every text input")
    on_error: Literal["fail", "report"] = Field(
        default="fail", description="fail: a bad input fails the request (400); report: its entry carries 'error'")


class SearchRequest(_Body):
    query: str | None = None
    image: str | None = None
    k: int = Field(default=10, ge=1)
    fusion: str | None = None
    filter: dict[str, Any] | None = None
    gen_samples: int = Field(default=1, ge=1)
    instruction: str | None = None


class IndexRequest(_Body):
    paths: list[str] = Field(min_length=1)
    gen: Literal["now", "later"] = "now"
    prune: bool = False


class DeleteRequest(_Body):
    source: str = Field(min_length=1)

    @field_validator("source")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("source is blank")
        return v


# -- inputs -----------------------------------------------------------------------------------

_DATA_URL = re.compile(r"data:[^,]*;base64,", re.ASCII)  # the media type is not trusted: PIL reads the bytes


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


def decode_image(value: str, where: str, limits: ImageLimits) -> bytes:
    """The encoded image bytes of a data URL (or bare base64), checked against the caps.

    Only the header is read here (size); decoding the pixels is the encoder's job, which
    reports a corrupt image on that input alone."""
    from PIL import Image, UnidentifiedImageError

    match = _DATA_URL.match(value)
    payload = value[match.end():] if match else value
    if match is None and value.startswith(("http://", "https://", "file:")):
        raise APIError(400, f"{where}: image URLs are not fetched; send the image as a data URL "
                            "(data:image/png;base64,...)", where)
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise APIError(413, f"{where}: the image is over {limits.max_bytes} bytes", where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: not base64 image data (expected data:image/...;base64,...)", where) from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise APIError(400, f"{where}: not an image ({exc})", where) from None
    if width * height > limits.max_pixels:
        raise APIError(413, f"{where}: the image has {width}x{height} pixels, over the {limits.max_pixels} cap", where)
    return data


def embedding_items(req: EmbeddingsRequest, limits: ImageLimits, max_inputs: int) -> list[Item | APIError]:
    """The request's inputs as ``Item``s, in order; an input that cannot be one (empty, an
    undecodable or oversized image) is its ``APIError`` instead, so the others still go on."""
    raw = req.input
    if isinstance(raw, str):
        raw = [raw]
    if raw and all(isinstance(v, int) for v in raw) or any(isinstance(v, list) for v in raw):
        raise APIError(400, "token-id inputs are not supported: send text (or input objects with text/image)",
                       "input")
    if not raw:
        raise APIError(400, "input is empty", "input")
    if len(raw) > max_inputs:
        raise APIError(413, f"{len(raw)} inputs in one request; at most {max_inputs}", "input")
    items: list[Item | APIError] = []
    for i, value in enumerate(raw):
        where = f"input[{i}]"
        try:
            if isinstance(value, str):
                if not value.strip():
                    raise APIError(400, f"{where} is empty text", where)
                items.append(Item(text=value, instruction=req.instruction))
                continue
            if value.text is None and value.image is None:
                raise APIError(400, f"{where} has neither text nor image", where)
            image = decode_image(value.image, f"{where}.image", limits) if value.image is not None else None
            items.append(Item(text=value.text, image=image, instruction=value.instruction or req.instruction))
        except APIError as exc:
            items.append(exc)
    return items


def query_item(req: SearchRequest, limits: ImageLimits) -> Item:
    if req.query is None and req.image is None:
        raise APIError(400, "a search needs a query, an image, or both", "query")
    image = decode_image(req.image, "image", limits) if req.image is not None else None
    return Item(text=req.query, image=image)


# -- results ----------------------------------------------------------------------------------


def vector_json(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or base64 of little-endian float32."""
    v = np.asarray(vector, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(v.tobytes()).decode("ascii")
    return v.tolist()


def hit_json(hit: Any) -> dict[str, Any]:
    payload = hit.payload
    return {"id": hit.id, "score": hit.score, "disc_score": hit.disc_score, "gen_score": hit.gen_score,
            "source": payload.get("source"), "page": payload.get("page"), "modality": payload.get("modality"),
            "reasoning": payload.get("reasoning"), "reasoned": hit.reasoned, "query_reasoning": hit.query_reasoning,
            "gen_pending": payload.get("gen_status") is not None, "payload": payload}


def report_json(report: Any, points: int | None = None, pending: int | None = None) -> dict[str, Any]:
    """An ``IngestReport`` as JSON: every entry, and the counts of each status."""
    entries = [dict(e.__dict__) for e in report.entries]
    counts = {s: len(getattr(report, s)) for s in ("indexed", "unchanged", "failed", "skipped", "removed")}
    out = {"entries": entries, **counts, "stale_removed": report.deleted_stale, "seconds": report.seconds,
           "optimized": report.optimized, "gen_pending": report.gen_pending,
           "gen_now": [dict(e.__dict__) for e in report.gen_now]}
    if points is not None:
        out["points"] = points
    if pending is not None:
        out["pending_in_index"] = pending
    return out
