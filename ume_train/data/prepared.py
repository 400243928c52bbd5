"""Records prepared on access, with a bad one replaced deterministically.

A record can pass reading (its JSON is fine, its files exist) and still fail when it is
prepared: a corrupt image, a PDF page past the end, more tokens than ``max_length``. Training
and the dry run (``ume-train ... --dry-run``) prepare records with the same code, so the dry
run finds every such record before a GPU is touched.

At run time ``PreparedRecords`` does not raise on such a record: it returns another record in
its place and reports the one it skipped (``(file:line, reason)`` under ``"skipped"``). The
trainer counts those against ``max_bad_records`` together with the reading errors, logs each
with its file and line, and stops with the list once the budget is spent
(``UMETrainerMixin.note_bad_records``). The stand-in is chosen by a hash of (index, attempt),
so it is the same in every process, on every run and after a resume; every index still
yields one pair, so the batches of all processes keep their size (InfoNCE and the embedding
reward gather them). This is what ``datasets.Dataset.filter`` gives HF users ahead of time,
done lazily: a full preparation pass over millions of multimodal records before step 1 would
cost hours, and the dry run is where that pass belongs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from ume_retriever.inputs.loaders import FileLoadError
from ume_retriever.inputs.records import (
    PairRecord,
    RecordError,
    Side,
    TooManyBadRecords,
)
from ume_retriever.model.preprocess import InputPreparer, PreparedInput

SkippedRecord = tuple[str, str]  # (file:line, reason)
# What preparing one record may raise because of the record (missing/corrupt media, bad
# pages, processor refusals: InputError is a ValueError). Anything else is a bug and raises.
PREPARE_ERRORS = (ValueError, OSError, FileLoadError)


def replacement_index(index: int, attempt: int, size: int) -> int:
    """The record that stands in for record ``index`` at try ``attempt`` (1, 2, ...): spread
    over the whole dataset (a neighbour would often share the batch), the same everywhere."""
    digest = hashlib.blake2b(f"{index}|{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % size


def too_many_bad_records(bad: dict[str, str], max_bad_records: int) -> TooManyBadRecords:
    """The error that stops a run whose bad records exceed the budget; it lists them."""
    shown = "\n  ".join(f"{where}: {reason}" for where, reason in list(bad.items())[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    return TooManyBadRecords(
        f"{len(bad)} bad training records (max_bad_records={max_bad_records} allows {max_bad_records}):\n  "
        f"{shown}{more}\nFix them, or raise max_bad_records to skip them.")


class PreparedRecords(torch.utils.data.Dataset):
    """``prepare(record)`` on access (in DataLoader workers when there are any).

    Item ``i`` is ``{**prepare(record), "record": record, "skipped": [(where, reason), ...]}``
    where ``record`` is record ``i`` or, when that one fails, its stand-in. At most
    ``max_bad_records + 1`` bad records are tried for one item; if they all fail the budget is
    spent anyway and ``TooManyBadRecords`` is raised here (as it is when stand-ins keep landing
    on records already known to be bad). ``cache=True`` keeps every prepared
    item in memory after first use (small datasets, many epochs).
    """

    def __init__(self, records: list[PairRecord], prepare: Callable[[PairRecord], dict[str, Any]], *,
                 max_bad_records: int = 0, cache: bool = False):
        if not records:
            raise ValueError("no training records")
        self.records = records
        self.prepare = prepare
        self.max_bad_records = max_bad_records
        self._cache: dict[int, dict[str, Any]] | None = {} if cache else None
        self._bad: dict[int, SkippedRecord] = {}  # known bad in this process: never prepared twice

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        skipped: list[SkippedRecord] = []
        index, attempt = i, 0
        while True:
            if index not in self._bad:
                record = self.records[index]
                try:
                    item = {**self.prepare(record), "record": record, "skipped": skipped}
                    break
                except RecordError as err:
                    self._bad[index] = (err.where, err.reason)
            if self._bad[index] not in skipped:
                skipped.append(self._bad[index])
            attempt += 1
            # Past the budget (or drawing only known bad stand-ins, in a dataset mostly bad): stop.
            if len(skipped) > self.max_bad_records or attempt > self.max_bad_records + 32:
                raise too_many_bad_records(dict(skipped), self.max_bad_records)
            index = replacement_index(i, attempt, len(self.records))
        if self._cache is not None:
            self._cache[i] = item
        return item


class PromptPreparer:
    """GRPO: both sides of a record as the prompts the policy samples from, prepared by the
    encoder's ``InputPreparer`` (one definition for training and serving). A prompt longer
    than ``max_length`` tokens is a bad record (its rollouts would run past it)."""

    def __init__(self, preparer: InputPreparer, *, max_length: int, pdf_dpi: int = 144):
        self.preparer = preparer
        self.max_length = max_length
        self.pdf_dpi = pdf_dpi

    def side(self, side: Side, where: str, name: str) -> PreparedInput:
        try:
            prompt = self.preparer.prepare(side.to_item(self.pdf_dpi))
        except PREPARE_ERRORS as exc:
            raise RecordError(where, f"{name}: {exc}") from None
        if len(prompt) > self.max_length:
            raise RecordError(where, f"{name}: the prompt is {len(prompt)} tokens, above max_length={self.max_length}")
        return prompt

    def pair(self, record: PairRecord) -> dict[str, PreparedInput]:
        """Both prompts of ``record``; ``RecordError`` (naming its file and line) when one fails."""
        return {"query": self.side(record.query, record.where, "query"),
                "target": self.side(record.target, record.where, "target")}


class ReportSkipped:
    """Wraps a collate function: the batch also carries ``"skipped"``, the bad records its items
    stood in for, so the trainer (in the main process, whatever the DataLoader workers) counts them."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.collate(items), "skipped": [s for item in items for s in item["skipped"]]}


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """GRPO batches: the records and their prepared prompts, per side."""
    return {"records": [item["record"] for item in items],
            "prompts": {side: [item[side] for item in items] for side in ("query", "target")}}
