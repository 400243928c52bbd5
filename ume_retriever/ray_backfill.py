"""The gen backfill of staged ingestion on Ray Data: ``index.backfill_gen(ray=ADDRESS, encoders=N)``.

The same backfill as in process (``ume_retriever.backfill``: the same points in the same
order, the same checks and writes), with the pipeline of ``ray_ingest``: the driver picks the
pending points and settles quarantined files; load tasks make the items again (a file's pages
re-rendered, at most one window of them per task) and decode their media; encoder actors
reason and build each point's write; the driver writes them into the embedded store, or the
actors write them straight to a Qdrant server. A point whose task or batch is lost past Ray's
retries stays pending (reported failed with the reason; the next backfill tries it again).
"""

from __future__ import annotations

import functools
import logging
import pickle
import time
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Iterator

from .backfill import BackfillEntry, BackfillReport, failure_update, gen_update, pending_points, remake_window
from .errors import InputError
from .ingest_journal import IngestJournal
from .inputs.loaders import LoaderConfig
from .ray_ingest import LOST, RayOptions, output_batch, data_context, MediaCaps, encode_pipeline, pipeline_row, connected, recipe_of
from .store import GEN

logger = logging.getLogger(__name__)

_CHUNK, _REMADE, _CHANGED, _FAILED, _UPDATE = "chunk", "remade", "changed", "failed", "update"


def ray_backfill(index: Any, *, limit: int | None, show_progress: bool, retry_failed: bool,
                 batch_size: int | None, options: RayOptions) -> BackfillReport:
    """The body of ``UMEIndex.backfill_gen`` on Ray."""
    started = time.perf_counter()
    report = BackfillReport()
    recipe = recipe_of(index.encoder)
    index.journal.recover()
    window = (batch_size or index.batch_size) * index.flush_batches
    rows, quarantined = _plan(index, pending_points(index, limit, retry_failed), window)
    if quarantined:
        report.failed += quarantined
        with index.write_lock:
            index.store.fill_vectors([failure_update(e.id, e.reason) for e in quarantined])
    if rows:
        with connected(options) as ray, data_context(ray):
            load = functools.partial(_remake_rows, loader=index.loader, media=MediaCaps.of(index.encoder))
            ds = encode_pipeline(ray, index, rows, recipe, options, load, _FillJob(batch_size or index.batch_size))
            _consume(index, ds, rows, report, show_progress)
    report.remaining = index.pending_gen()
    report.seconds = time.perf_counter() - started
    logger.info("backfill (ray): %s", report.summary())
    return report


def _plan(index: Any, todo: list[tuple[str, dict[str, Any]]], window: int) -> tuple[list[dict], list[BackfillEntry]]:
    """Rows of at most ``window`` points of one source each (in backfill order), and the
    points of quarantined files (failed here, as the in-process backfill fails them)."""
    rows, quarantined = [], []
    for source, records in groupby(todo, key=lambda record: str(record[1].get("source"))):
        records = list(records)
        keep = []
        for pid, payload in records:
            reason = None
            if payload.get("gen_from") is None and payload.get("file_hash"):
                reason = index.journal.quarantine_reason(source, str(payload["file_hash"]))
            if reason is not None:
                quarantined.append(BackfillEntry(pid, source, str(payload.get("locator") or ""),
                                                 f"quarantined: {reason}"))
            else:
                keep.append((pid, payload))
        for start in range(0, len(keep), window):
            rows.append(pipeline_row(_CHUNK, source, keep[start:start + window]))
    return rows, quarantined


@dataclass
class _RemakeContext:
    """What ``remake_window`` needs of an index, in a load task (quarantine is the driver's)."""

    loader: LoaderConfig
    journal: IngestJournal


def _remake_rows(batch: dict[str, Any], *, loader: LoaderConfig, media: MediaCaps) -> Iterator[dict[str, list]]:
    """Load task: one chunk of pending points in; each point's item (media decoded), or why not."""
    context = _RemakeContext(loader, IngestJournal(None))
    for source, blob in zip(batch["source"], batch["blob"]):
        made = remake_window(context, pickle.loads(blob))
        for entry in made.changed:
            yield output_batch(_CHANGED, source, pickle.dumps(entry))
        for entry in made.failed:
            yield output_batch(_FAILED, source, pickle.dumps(entry))
        for pid, payload, item in made.items:
            try:
                item = media.decoded_item(item)
            except InputError as exc:
                entry = BackfillEntry(pid, source, str(payload.get("locator") or ""), exc.reason)
                yield output_batch(_FAILED, source, pickle.dumps(entry))
                continue
            yield output_batch(_REMADE, source, pickle.dumps((pid, payload, item), protocol=pickle.HIGHEST_PROTOCOL))


@dataclass(frozen=True)
class _FillJob:
    """Remade items -> the writes that complete their points (to a server store here, else
    sent to the driver)."""

    batch_size: int
    takes: str = _REMADE

    def run(self, encoder: Any, todo: list[tuple[str, dict[str, Any], Any]], store: Any) -> list[tuple[str, str, Any]]:
        results = encoder.encode([item for _, _, item in todo], mode="gen", batch_size=self.batch_size)
        made = [(payload, *gen_update(pid, payload, res)) for (pid, payload, _), res in zip(todo, results)]
        written = store.fill_vectors([update for _, update, _ in made]) if store is not None else None
        return [(_UPDATE, str(payload.get("source")), (update, failed, written)) for payload, update, failed in made]


def _consume(index: Any, ds: Any, rows: list[dict[str, Any]], report: BackfillReport, show_progress: bool) -> None:
    from tqdm.auto import tqdm

    waiting = {pid: (str(payload.get("source")), str(payload.get("locator") or ""))
               for row in rows for pid, payload in pickle.loads(row["blob"])}
    error: Exception | None = None
    with tqdm(total=len(waiting), desc="gen backfill (ray)", unit="item", disable=not show_progress) as bar:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                updates = []
                for kind, blob in zip(batch["kind"], batch["blob"]):
                    details = pickle.loads(blob)
                    if kind == _CHANGED:
                        report.changed.append(details)
                        waiting.pop(details.id, None)
                    elif kind == _FAILED:
                        report.failed.append(details)
                        updates.append(failure_update(details.id, details.reason))
                        waiting.pop(details.id, None)
                    elif kind == _UPDATE:
                        update, failed, written = details
                        waiting.pop(update.id, None)
                        if failed is not None:
                            report.failed.append(failed)
                        if written is None:  # the embedded store: the driver writes
                            updates.append(update)
                        elif update.id in written and GEN in update.vectors:
                            report.filled += 1
                    bar.update(1)
                if updates:
                    with index.write_lock:
                        written = index.store.fill_vectors(updates)
                    report.filled += sum(1 for u in updates if u.id in written and GEN in u.vectors)
        except Exception as exc:  # noqa: BLE001 - Ray's error; every unfinished point is reported with it
            logger.warning("the Ray backfill pipeline failed", exc_info=True)
            error = exc
    reason = LOST.format(f"{type(error).__name__}: {error}" if error else "see the Ray logs") + "; it is still pending"
    report.failed += [BackfillEntry(pid, source, locator, reason) for pid, (source, locator) in waiting.items()]
