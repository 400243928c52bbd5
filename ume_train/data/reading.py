"""Reading a trainer config's record files, and preparing their records, the same way for
training, evaluation and dry runs."""

from __future__ import annotations

import logging
import time
from typing import Any

from ume_retriever.inputs.records import (
    PairRecord,
    ReadReport,
    RecordError,
    read_records,
)

from .prepared import too_many_bad_records

logger = logging.getLogger(__name__)


def read_config_records(args: Any, files: list[str], *, require_reasoning: bool) -> ReadReport:
    """The records of ``files`` as ``args`` (a ``TrainConfig``) says to read them; logs the summary."""
    if not files:
        raise ValueError("no training data: pass train_dataset= or set train_files in the config")
    report = read_records(files, fmt=args.data_format, media_root=args.media_root,
                          require_reasoning=require_reasoning, max_bad_records=args.max_bad_records,
                          query_reasoning_field=args.query_reasoning_field,
                          target_reasoning_field=args.target_reasoning_field)
    logger.info("%s: %s", ", ".join(map(str, files)), report.summary())
    return report


def record_preparer(args: Any, preparer: Any) -> Any:
    """What turns a record into a training example for ``args``' trainer (``.pair(record)``,
    ``RecordError`` when it cannot): SFT tokenises both sides with their answers
    (``SideTokenizer``), GRPO prepares both prompts (``PromptPreparer``). ``preparer`` is the
    encoder's ``InputPreparer``. The trainers and the dry run both build it here."""
    from .pairs import SideTokenizer
    from .prepared import PromptPreparer

    cls = SideTokenizer if args.trains_on_reasoning else PromptPreparer
    return cls(preparer, max_length=args.max_length, pdf_dpi=args.pdf_dpi)


def check_records_prepare(records: list[PairRecord], prepare: Any, bad: dict[str, str],
                          max_bad_records: int) -> list[PairRecord]:
    """Run every record through ``prepare`` (``record_preparer(...).pair``); the ones that fail
    join ``bad`` (file:line -> reason, logged as reading errors are). Raises
    ``TooManyBadRecords`` listing them all when ``bad`` ends up above ``max_bad_records``;
    returns the records that prepared."""
    good: list[PairRecord] = []
    start = last_report = time.monotonic()
    for n, record in enumerate(records, start=1):
        try:
            prepare(record)
            good.append(record)
        except RecordError as err:
            bad[err.where] = err.reason
            logger.warning("bad record %s", err)
        if time.monotonic() - last_report > 30:
            last_report = time.monotonic()
            logger.info("prepared %d of %d records (%.0f/s), %d bad", n, len(records),
                        n / (last_report - start), len(bad))
    if len(bad) > max_bad_records:
        raise too_many_bad_records(bad, max_bad_records)
    return good
