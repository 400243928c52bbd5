"""The gen backfill of staged ingestion: gen vectors for points stored with ``gen="later"``.

``add(..., gen="later")`` stores each item's disc vector (one forward pass) and marks the point
``gen_status: "pending"``; ``backfill_gen`` finds those points, makes each item again (a PDF
page re-rendered from its file and locator, a text-only in-memory item from its payload),
checks it is still the content that was indexed (its content hash), reasons, and writes the
gen vector into the point.

Order: newest ingest first (what was just added is what users search for next), and within
one ingest by source and locator (a PDF is opened once per window, its pages in order).

Safety: each point is written whole (``VectorStore.fill_vectors``: the disc vector and payload
kept, the gen vector and reasoning added, the pending mark removed) in one atomic point write,
so a backfill killed at any moment loses only the window in flight and redoes no finished
point; running it again is a no-op once nothing is pending; searches see a point pending or
complete, never half. A point deleted meanwhile (its file changed and was re-indexed) is not
re-created. A file that changed since it was indexed is left pending and reported ``changed``
(``add`` replaces its points); one that cannot be read, or whose item the model fails on, is
marked ``gen_status: "failed"`` with the reason in ``gen_error`` (``retry_failed=True`` tries
again). Native decodes are journalled as during ingest, so a file that crashes the decoder is
quarantined rather than crashing every backfill.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import InputError
from .faults import fault_point
from .inputs import decode_guard
from .inputs.item import Item
from .inputs.loaders import FileLoadError, file_hash, load_locator
from .ingest_journal import IngestJournal
from .inputs.loaders import LoaderConfig
from .model.protocol import EncoderLike
from .store import GEN, GEN_FAILED, GEN_PENDING, GEN_STATUS, StoredPoint, VectorStore


class Backfillable(Protocol):
    """What a backfill needs of an index (``UMEIndex`` has it)."""

    store: VectorStore
    encoder: EncoderLike
    journal: IngestJournal
    loader: LoaderConfig
    batch_size: int
    flush_batches: int
    write_lock: Any

    def pending_gen(self) -> int: ...

logger = logging.getLogger(__name__)

# Payload fields of a pending point that the backfill reads.
_FIELDS = ["source", "locator", "content_hash", "file_hash", "text", "instruction", "ingested_at", "gen_from"]
GEN_FROM_PAYLOAD = "payload"  # ``gen_from`` of an in-memory text item: remade from its payload


@dataclass
class BackfillEntry:
    id: str
    source: str
    locator: str
    reason: str


@dataclass
class BackfillReport:
    """What one ``backfill_gen`` call did. ``int(report)`` is the number of gen vectors filled."""

    filled: int = 0
    failed: list[BackfillEntry] = field(default_factory=list)  # marked gen_status "failed", with why
    changed: list[BackfillEntry] = field(default_factory=list)  # content changed since ingest: re-run add
    remaining: int = 0  # still pending after this call
    stopped: bool = False  # stopped early on request (``stop`` was set)
    seconds: float = 0.0

    def __int__(self) -> int:
        return self.filled

    def summary(self) -> str:
        lines = [f"gen filled {self.filled}, failed {len(self.failed)}, changed {len(self.changed)}, "
                 f"still pending {self.remaining} in {self.seconds:.1f}s" + (" (stopped)" if self.stopped else "")]
        for what, entries in (("failed", self.failed), ("changed", self.changed)):
            for e in entries:
                lines.append(f"  {what}: {e.source}{' ' + e.locator if e.locator else ''}: {e.reason}")
        return "\n".join(lines)


class _Changed(Exception):
    """The item's content is not what was indexed any more."""


def backfill_gen(
    index: Backfillable, *, limit: int | None = None, show_progress: bool = False, retry_failed: bool = False,
    batch_size: int | None = None, stop: threading.Event | None = None,
) -> BackfillReport:
    """Compute the pending gen vectors of ``index`` (at most ``limit``), in windows of
    ``batch_size * index.flush_batches`` points; ``stop`` (an event) ends it between windows."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    started = time.perf_counter()
    report = BackfillReport()
    todo = pending_points(index, limit, retry_failed)
    batch = batch_size or index.batch_size
    window = batch * index.flush_batches
    index.journal.recover()
    from tqdm.auto import tqdm

    windows = [todo[start:start + window] for start in range(0, len(todo), window)]
    with decode_guard.watching(index.journal), tqdm(total=len(todo), desc="gen backfill", unit="item",
                                                    disable=not show_progress) as bar, \
            ThreadPoolExecutor(1, thread_name_prefix="ume-backfill-load") as loader:
        # the next window is read and rendered while the model reasons over this one
        ahead = loader.submit(remake_window, index, windows[0]) if windows else None
        for n, chunk in enumerate(windows):
            if stop is not None and stop.is_set():
                report.stopped = True
                break
            made = ahead.result()
            ahead = loader.submit(remake_window, index, windows[n + 1]) if n + 1 < len(windows) else None
            _fill_window(index, made, batch, report)
            bar.update(len(chunk))
        if ahead is not None:
            ahead.cancel()
    report.remaining = index.pending_gen()
    report.seconds = time.perf_counter() - started
    logger.info("backfill: %s", report.summary())
    return report


def pending_points(index: Backfillable, limit: int | None, retry_failed: bool) -> list[tuple[str, dict[str, Any]]]:
    """The points a backfill fills, in its order: newest ingest first, then by source and locator."""
    statuses = [GEN_PENDING] + ([GEN_FAILED] if retry_failed else [])
    todo = sorted(index.store.scroll({"kind": "item", GEN_STATUS: statuses}, _FIELDS), key=_place)
    todo.sort(key=lambda record: str(record[1].get("ingested_at") or ""), reverse=True)  # stable: newest first
    return todo if limit is None else todo[:limit]


def _place(record: tuple[str, dict[str, Any]]) -> tuple[str, tuple[str, float]]:
    _, p = record
    return str(p.get("source")), _locator_key(str(p.get("locator") or ""))


def _locator_key(locator: str) -> tuple[str, float]:
    name, _, value = locator.partition("=")
    try:
        return name, float(value.split("-")[0])
    except ValueError:
        return name, 0.0


@dataclass
class _Window:
    """One window's items made again, and what could not be."""

    items: list[tuple[str, dict[str, Any], Item]] = field(default_factory=list)
    changed: list[BackfillEntry] = field(default_factory=list)
    failed: list[BackfillEntry] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)


def remake_window(index: Backfillable, chunk: list[tuple[str, dict[str, Any]]]) -> _Window:
    out = _Window()
    file_hashes: dict[str, str | Exception] = {}
    for pid, payload in chunk:
        entry = BackfillEntry(pid, str(payload.get("source")), str(payload.get("locator") or ""), "")
        try:
            out.items.append((pid, payload, _remake(index, payload, file_hashes, out.sources)))
        except _Changed as exc:
            entry.reason = str(exc)
            out.changed.append(entry)
        except (FileLoadError, InputError, OSError, ValueError) as exc:
            entry.reason = getattr(exc, "reason", None) or str(exc)
            out.failed.append(entry)
        except Exception as exc:  # noqa: BLE001 - one item's surprise must not lose the window
            logger.warning("remaking %s %s failed", entry.source, entry.locator, exc_info=True)
            entry.reason = f"unexpected {type(exc).__name__} while reading it again: {exc}"
            out.failed.append(entry)
    return out


def _fill_window(index: Backfillable, made: _Window, batch: int, report: BackfillReport) -> None:
    items, sources = made.items, made.sources
    report.changed += made.changed
    report.failed += made.failed
    updates: list[StoredPoint] = [failure_update(e.id, e.reason) for e in made.failed]
    results = index.encoder.encode([item for _, _, item in items], mode="gen", batch_size=batch) if items else []
    for (pid, payload, _), res in zip(items, results):
        update, failed = gen_update(pid, payload, res)
        updates.append(update)
        if failed is not None:
            report.failed.append(failed)
    with index.write_lock:
        written = index.store.fill_vectors(updates)
    report.filled += sum(1 for u in updates if u.id in written and GEN in u.vectors)
    index.journal.settle(sorted(sources))
    fault_point("after_backfill_window")


def gen_update(pid: str, payload: dict[str, Any], res: Any) -> tuple[StoredPoint, BackfillEntry | None]:
    """The write that completes a pending point from its gen encode result, and the failure
    entry when the result is an error or a non-finite vector (the point is marked failed)."""
    reason = None
    if res.error is not None:
        reason = res.error.reason if isinstance(res.error, InputError) else str(res.error)
    elif res.gen is None or not np.isfinite(np.asarray(res.gen)).all():
        reason = "the model gave a non-finite (NaN/inf) gen vector"
    if reason is not None:
        entry = BackfillEntry(pid, str(payload.get("source")), str(payload.get("locator") or ""), reason)
        return failure_update(pid, reason), entry
    return StoredPoint(id=pid, vectors={GEN: res.gen}, payload={
        GEN_STATUS: None, "gen_error": None, "gen_from": None, "reasoning": res.reasoning,
        "gen_outcome": res.gen_outcome.value if res.gen_outcome else None,
        "gen_filled_at": datetime.now(timezone.utc).isoformat()}), None


def failure_update(pid: str, reason: str) -> StoredPoint:
    """The write that marks a pending point's backfill failed."""
    return StoredPoint(id=pid, vectors={}, payload={GEN_STATUS: GEN_FAILED, "gen_error": reason})


def _remake(index: Backfillable, payload: dict[str, Any], file_hashes: dict[str, str | Exception],
            sources: set[str]) -> Item:
    """The item a pending point was made from, checked against its stored content hash."""
    if payload.get("gen_from") == GEN_FROM_PAYLOAD:
        return Item(text=payload.get("text"), instruction=payload.get("instruction"))
    source = str(payload.get("source"))
    if source not in file_hashes:
        try:
            file_hashes[source] = file_hash(Path(source))
        except OSError as exc:
            file_hashes[source] = exc
    fhash = file_hashes[source]
    if isinstance(fhash, Exception):
        if isinstance(fhash, FileNotFoundError):
            raise _Changed("the file no longer exists (add(..., prune=True) removes its points)")
        raise FileLoadError(f"cannot read file ({getattr(fhash, 'strerror', None) or fhash})")
    if fhash != payload.get("file_hash"):
        raise _Changed("the file changed since it was indexed (add it again to replace its points)")
    quarantined = index.journal.quarantine_reason(source, fhash)
    if quarantined is not None:
        raise FileLoadError(f"quarantined: {quarantined}")
    if source not in sources:
        index.journal.set_file_hash(source, fhash)
        sources.add(source)
    loaded = load_locator(Path(source), str(payload.get("locator") or ""), index.loader, fhash)
    if loaded.content_hash != payload.get("content_hash"):
        raise _Changed("the item reads differently now (another loader setting?): add the file again")
    return loaded.item
