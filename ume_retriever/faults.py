"""Fault injection for crash tests: die at a named point of the ingest, deterministically.

Test-only. ``UME_FAULT=POINT[:N[:ACTION]]`` (several, comma-separated) makes the N-th time
(default 1) this process reaches ``fault_point(POINT)`` kill it with SIGKILL (``kill``, default)
or abort it with SIGABRT (``abort``: a crash as a native library's would be, which faulthandler
sees). ``kill-once``/``abort-once`` fire only once across all processes that share the folder
``UME_FAULT_ONCE_DIR`` (a marker file per point): a Ray actor that is killed and restarted,
or a retried task, then runs through. With the variable unset, ``fault_point`` is one
dictionary lookup.

Points: ``after_item_upsert``, ``after_stale_delete``, ``before_manifest_write``,
``inside_store_creation``, ``inside_video_decode``, ``ray_encoder_batch`` (an encoder actor
of a Ray ingest, before each batch).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

ENV = "UME_FAULT"
ONCE_DIR_ENV = "UME_FAULT_ONCE_DIR"
_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for one in spec.split(","):
        point, _, rest = one.partition(":")
        if point == name:
            _maybe_fire(name, rest)


def _maybe_fire(name: str, rest: str) -> None:
    count, _, action = rest.partition(":")
    _reached[name] += 1
    if _reached[name] != int(count or 1):
        return
    action, once, _ = action.partition("-once")
    if once and not _first_anywhere(name):
        return
    if action == "abort":
        os.abort()
    os.kill(os.getpid(), signal.SIGKILL)


def _first_anywhere(name: str) -> bool:
    """True for the first process to get here (creates the point's marker file)."""
    folder = os.environ.get(ONCE_DIR_ENV)
    if not folder:
        raise RuntimeError(f"{ENV}: a '-once' fault needs {ONCE_DIR_ENV} (a folder shared by the processes)")
    try:
        fd = os.open(Path(folder) / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True
