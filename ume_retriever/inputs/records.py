"""Pair records: query/target pairs with media and reasoning, read from JSON or JSONL files.

Training reads them (``ume_train``) and so does evaluation (``ume-eval``'s ``pairs`` format):
the format lives here, below both. Two formats are read (docs/training.md):

- ``ume`` (ours): one JSON object per line, ``{"query": SIDE, "target": SIDE}`` where SIDE has
  ``text``, ``image`` | ``images`` | ``video`` (a file or a list of frame files) | ``pdf`` +
  ``page`` (1-based), ``instruction`` and ``reasoning`` (the assistant answer, e.g.
  ``<think>...</think><answer> summary <gen_emb>``).
- ``ume-r1`` (the published flat records): ``qry_text``, ``qry_image`` | ``qry_video``,
  ``pos_text``, ``pos_image`` | ``pos_video``, ``dataset_name``, and for SFT the reasoning of
  both sides in the fields named by ``query_reasoning_field`` / ``target_reasoning_field``.
  VLM2Vec-style ``<|image_1|>`` placeholders in the texts are removed (media come first).

A file may be JSONL or a JSON list. Media paths are relative to ``media_root`` (default: the
file's folder). A bad record is reported with file and line; it is skipped only while the
number of bad records stays within ``max_bad_records``, and every skip is logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .item import Item

logger = logging.getLogger(__name__)

FORMATS = ("auto", "ume", "ume-r1")
_PLACEHOLDER = re.compile(r"<\|(image|video)_\d+\|>\s*")


class RecordError(ValueError):
    """A record that cannot be used; ``where`` is ``file:line``."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


class TooManyBadRecords(ValueError):
    """More bad records than the user allowed; the message lists them."""


@dataclass
class Side:
    """One side (query or target) of a training pair."""

    text: str | None = None
    images: list[str] = field(default_factory=list)
    video: str | list[str] | None = None
    pdf: str | None = None
    page: int | None = None  # 1-based, with ``pdf``
    instruction: str | None = None
    reasoning: str | None = None

    def to_item(self, pdf_dpi: int = 144, pdf_max_pixels: int | None = None) -> Item:
        images: list[Any] = list(self.images)
        if self.pdf is not None:
            from .loaders import render_pdf_page

            images.insert(0, render_pdf_page(Path(self.pdf), self.page or 0, pdf_dpi, pdf_max_pixels))
        return Item(text=self.text or None, images=images or None, video=self.video, instruction=self.instruction)

    def media(self) -> list[str]:
        out = list(self.images)
        if isinstance(self.video, str):
            out.append(self.video)
        elif isinstance(self.video, list):
            out.extend(self.video)
        if self.pdf is not None:
            out.append(self.pdf)
        return out


@dataclass
class PairRecord:
    query: Side
    target: Side
    where: str  # file:line, for error messages
    dataset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unread fields (e.g. RL ``solution``)


@dataclass
class ReadReport:
    records: list[PairRecord]
    bad: list[RecordError]

    def summary(self) -> str:
        return f"{len(self.records)} records read, {len(self.bad)} bad records skipped"


def read_records(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    fmt: str = "auto",
    media_root: str | os.PathLike | None = None,
    require_reasoning: bool = True,
    max_bad_records: int = 0,
    query_reasoning_field: str = "qry_reasoning",
    target_reasoning_field: str = "pos_reasoning",
) -> ReadReport:
    """Read pair records from JSON/JSONL files.

    Raises ``TooManyBadRecords`` (listing them) when more than ``max_bad_records`` are bad.
    ``require_reasoning`` is on for SFT (both sides need their reasoning), off for RL.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown record format {fmt!r}; choose one of {FORMATS}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records: list[PairRecord] = []
    bad: list[RecordError] = []
    for path in map(Path, paths):
        root = Path(media_root) if media_root is not None else path.parent
        for where, raw in _raw_records(path):
            try:
                if isinstance(raw, RecordError):
                    raise raw
                record = _parse(raw, where, fmt, root, query_reasoning_field, target_reasoning_field)
                _check(record, require_reasoning)
                records.append(record)
            except RecordError as err:
                bad.append(err)
                if len(bad) > max_bad_records:
                    shown = "\n  ".join(str(e) for e in bad[:20])
                    raise TooManyBadRecords(
                        f"{len(bad)} bad training records (max_bad_records={max_bad_records} allows "
                        f"{max_bad_records}):\n  {shown}\nFix them, or raise max_bad_records to skip them."
                    ) from None
                logger.warning("skipping bad record %s", err)
    return ReadReport(records, bad)


def _raw_records(path: Path) -> Iterator[tuple[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"training data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}:{exc.lineno}", f"the JSON list is broken ({exc.msg})") from None
        for i, obj in enumerate(items):
            yield f"{path}[{i}]", obj
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{path}:{lineno}", RecordError(f"{path}:{lineno}", f"not valid JSON ({exc.msg})")


def _parse(raw: Any, where: str, fmt: str, root: Path, q_field: str, t_field: str) -> PairRecord:
    if not isinstance(raw, dict):
        raise RecordError(where, f"a record must be a JSON object, got {type(raw).__name__}")
    if fmt == "auto":
        fmt = "ume" if "query" in raw or "target" in raw else "ume-r1"
    if fmt == "ume":
        for key in ("query", "target"):
            if not isinstance(raw.get(key), dict):
                raise RecordError(where, f"missing or malformed '{key}' (an object with text/image/video/reasoning)")
        extra = {k: v for k, v in raw.items() if k not in ("query", "target", "dataset")}
        return PairRecord(_side(raw["query"], where, "query", root), _side(raw["target"], where, "target", root),
                          where, raw.get("dataset"), extra)
    if "qry_text" not in raw and "qry_image" not in raw and "qry_video" not in raw:
        raise RecordError(where, "not a UME-R1 record: no qry_text, qry_image or qry_video field")
    sides = []
    for prefix, reasoning_field, name in (("qry", q_field, "query"), ("pos", t_field, "target")):
        sides.append(_side({
            "text": raw.get(f"{prefix}_text"), "image": raw.get(f"{prefix}_image"),
            "video": raw.get(f"{prefix}_video"), "reasoning": raw.get(reasoning_field),
        }, where, name, root, strip_placeholders=True))
    used = {f"{p}_{k}" for p in ("qry", "pos") for k in ("text", "image", "video")} | {q_field, t_field, "dataset_name"}
    extra = {k: v for k, v in raw.items() if k not in used}
    return PairRecord(sides[0], sides[1], where, raw.get("dataset_name"), extra)


def _side(raw: dict[str, Any], where: str, name: str, root: Path, strip_placeholders: bool = False) -> Side:
    def path_of(value: Any, what: str) -> str:
        if not isinstance(value, str) or not value:
            raise RecordError(where, f"{name} {what} must be a file path, got {value!r}")
        p = Path(value)
        return str(p if p.is_absolute() else root / p)

    text = raw.get("text")
    if text is not None and not isinstance(text, str):
        raise RecordError(where, f"{name} text must be a string, got {type(text).__name__}")
    if text and strip_placeholders:
        text = _PLACEHOLDER.sub("", text)
    images = raw.get("images") or []
    if raw.get("image"):
        images = [raw["image"], *images]
    if not isinstance(images, list):
        raise RecordError(where, f"{name} images must be a list of paths")
    video = raw.get("video")
    if video is not None and video != []:
        video = [path_of(v, "video frame") for v in video] if isinstance(video, list) else path_of(video, "video")
    else:
        video = None
    pdf, page = raw.get("pdf"), raw.get("page")
    if pdf is not None:
        pdf = path_of(pdf, "pdf")
        if not isinstance(page, int) or page < 1:
            raise RecordError(where, f"{name} pdf needs a 1-based integer 'page', got {page!r}")
    reasoning = raw.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        raise RecordError(where, f"{name} reasoning must be a string")
    instruction = raw.get("instruction")
    return Side(text=text, images=[path_of(i, "image") for i in images], video=video, pdf=pdf, page=page,
                instruction=instruction if isinstance(instruction, str) else None, reasoning=reasoning)


def _check(record: PairRecord, require_reasoning: bool) -> None:
    for name, side in (("query", record.query), ("target", record.target)):
        if not (side.text and side.text.strip()) and not side.media():
            raise RecordError(record.where, f"{name} has neither text nor media")
        for path in side.media():
            if not os.path.isfile(path):
                raise RecordError(record.where, f"{name} media file not found: {path}")
        if require_reasoning and not (side.reasoning and side.reasoning.strip()):
            raise RecordError(record.where, f"{name} has no reasoning (SFT trains on both sides' reasoning)")
