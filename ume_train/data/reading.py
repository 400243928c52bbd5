"""Reading a trainer config's record files, the same way for training, evaluation and dry runs."""

from __future__ import annotations

import logging
from typing import Any

from ume_retriever.inputs.records import ReadReport, read_records

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
