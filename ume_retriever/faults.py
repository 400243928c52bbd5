"""Fault injection for crash tests: die at a named point of the ingest, deterministically.

Test-only. ``UME_FAULT=POINT[:N[:ACTION]]`` makes the N-th time (default 1) this process
reaches ``fault_point(POINT)`` kill it with SIGKILL (``kill``, default) or abort it with
SIGABRT (``abort``: a crash as a native library's would be, which faulthandler sees). With the
variable unset, ``fault_point`` is one dictionary lookup.

Points: ``after_item_upsert``, ``after_stale_delete``, ``before_manifest_write``,
``inside_store_creation``, ``inside_video_decode``.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "UME_FAULT"
_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    count, _, action = rest.partition(":")
    _reached[name] += 1
    if _reached[name] != int(count or 1):
        return
    if action == "abort":
        os.abort()
    os.kill(os.getpid(), signal.SIGKILL)
