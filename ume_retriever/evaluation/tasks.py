"""Evaluation tasks: queries with their positives, and candidate pools (global or per query).

Formats (JSON lines; relative media paths are read from the file's folder, or ``media_root``):

- ``ume`` (ours): one object per line, ``"type": "candidate"`` or ``"type": "query"``.
  Both take ``id`` and ``Item`` fields: ``text``, ``image``, ``images``, ``video``,
  ``instruction``, and ``pdf`` + ``page`` (1-based) for a PDF page. A query adds
  ``positives`` (candidate ids) and optionally ``candidates`` (its own pool; default: every
  candidate of the file).
- ``mmeb`` (MMEB-V2 style rows): ``qry_text`` (+ ``qry_inst``), ``qry_img_path``,
  ``tgt_text`` and ``tgt_img_path`` (lists; the FIRST target is the positive, the list is the
  query's pool), optional ``tgt_inst``. VLM2Vec's ``<|image_1|>`` placeholders are dropped.
- ``pairs``: the training pair records (``inputs/records.py``: ``query``/``target`` sides, or
  the published flat ``qry_*``/``pos_*`` fields): every target is a candidate; a query's
  positive is its target.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import InputError
from ..inputs.item import Item

TaskFormat = Literal["ume", "mmeb", "pairs"]
_ITEM_FIELDS = ("text", "image", "images", "video", "instruction")


@dataclass
class EvalQuery:
    id: str
    item: Item
    positives: set[str]
    candidates: list[str] | None = None  # its own pool; None: every candidate of the task


@dataclass
class EvalTask:
    name: str
    queries: list[EvalQuery]
    candidates: dict[str, Item] = field(default_factory=dict)

    def pool(self, query: EvalQuery) -> list[str]:
        return query.candidates if query.candidates is not None else list(self.candidates)

    def validate(self) -> None:
        """Every positive and pool id names a candidate; every query has a positive in its pool."""
        problems = []
        for q in self.queries:
            pool = set(self.pool(q))
            unknown = (pool | q.positives) - set(self.candidates)
            if unknown:
                problems.append(f"query {q.id}: unknown candidate ids {sorted(unknown)[:5]}")
            elif not q.positives & pool:
                problems.append(f"query {q.id}: no positive in its candidate pool")
        if not self.queries:
            problems.append("no queries")
        if problems:
            raise ValueError(f"task {self.name!r}: " + "; ".join(problems[:10]))


def load_task(path: str | os.PathLike, fmt: TaskFormat = "ume", *, name: str | None = None,
              media_root: str | os.PathLike | None = None, pdf_max_pixels: int | None = None) -> EvalTask:
    """Read a task file; errors name the file and line."""
    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    name = name or path.stem
    if fmt == "pairs":
        task = _from_pairs(path, name, root, pdf_max_pixels)
    else:
        task = EvalTask(name, [])
        for lineno, row in _rows(path):
            try:
                if fmt == "ume":
                    _add_ume_row(task, row, root, pdf_max_pixels)
                elif fmt == "mmeb":
                    _add_mmeb_row(task, row, root, lineno)
                else:
                    raise ValueError(f"format must be 'ume', 'mmeb' or 'pairs', got {fmt!r}")
            except (KeyError, TypeError, ValueError, InputError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
    task.validate()
    return task


def _rows(path: Path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not JSON ({exc.msg})") from None


def _media(value: Any, root: Path) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [_media(v, root) for v in value]
    return root / value


def _item(row: dict, root: Path, pdf_max_pixels: int | None) -> Item:
    fields = {k: row[k] for k in _ITEM_FIELDS if row.get(k) is not None}
    for key in ("image", "images", "video"):
        if key in fields:
            fields[key] = _media(fields[key], root)
    if row.get("pdf"):
        from ..inputs.loaders import render_pdf_page

        fields["image"] = render_pdf_page(root / row["pdf"], int(row.get("page", 1)), 144, pdf_max_pixels)
    item = Item(**fields)
    if item.text is None and not item.has_media:
        raise ValueError("empty item: give text, image(s), video or pdf")
    return item


def _add_ume_row(task: EvalTask, row: dict, root: Path, pdf_max_pixels: int | None) -> None:
    kind, rid = row.get("type"), str(row["id"])
    if kind == "candidate":
        if rid in task.candidates:
            raise ValueError(f"candidate id {rid!r} appears twice")
        task.candidates[rid] = _item(row, root, pdf_max_pixels)
    elif kind == "query":
        positives = {str(p) for p in row["positives"]}
        if not positives:
            raise ValueError("a query needs at least one positive")
        pool = [str(c) for c in row["candidates"]] if row.get("candidates") is not None else None
        task.queries.append(EvalQuery(rid, _item(row, root, pdf_max_pixels), positives, pool))
    else:
        raise ValueError(f"type must be 'candidate' or 'query', got {kind!r}")


def _clean(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.replace("<|image_1|>", "").strip()
    return text or None


def _add_mmeb_row(task: EvalTask, row: dict, root: Path, lineno: int) -> None:
    texts, images = row.get("tgt_text") or [], row.get("tgt_img_path") or []
    n = max(len(texts), len(images))
    if n == 0:
        raise ValueError("no targets (tgt_text / tgt_img_path)")
    pool = []
    for i in range(n):
        text = _clean(texts[i]) if i < len(texts) else None
        image = images[i] if i < len(images) and images[i] else None
        item = Item(text=text, image=root / image if image else None, instruction=_clean(row.get("tgt_inst")))
        cid = hashlib.blake2b(f"{text}|{image}|{row.get('tgt_inst')}".encode(), digest_size=8).hexdigest()
        task.candidates.setdefault(cid, item)
        pool.append(cid)
    query = Item(text=_clean(row.get("qry_text")), instruction=_clean(row.get("qry_inst")),
                 image=root / row["qry_img_path"] if row.get("qry_img_path") else None)
    task.queries.append(EvalQuery(f"q{lineno}", query, {pool[0]}, pool))


def _from_pairs(path: Path, name: str, root: Path, pdf_max_pixels: int | None) -> EvalTask:
    from ..inputs.records import read_records

    records = read_records(path, media_root=root, require_reasoning=False).records
    task = EvalTask(name, [])
    for i, record in enumerate(records):
        cid = f"t{i}"
        # PDF pages rendered within the encoder's pixel cap, as training and indexing render them
        task.candidates[cid] = record.target.to_item(pdf_max_pixels=pdf_max_pixels)
        task.queries.append(EvalQuery(f"q{i}", record.query.to_item(pdf_max_pixels=pdf_max_pixels), {cid}))
    return task
