"""Marks the moments a native library (decord, PyAV, pymupdf) decodes a file, for the ingest
journal: a file that crashes the decoder (a segfault, an abort) kills the process, and the
next ingest must know which file it was so that it does not crash on it again and again.

Each running ingest registers its journal (``watching``) for its length; with none registered,
``decoding`` costs a list copy.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator, Protocol


class DecodeWatcher(Protocol):
    def begin(self, source: str) -> None: ...

    def end(self, source: str) -> None: ...


_watchers: list[DecodeWatcher] = []  # one per running ingest (several indexes may ingest at once)
_lock = threading.Lock()


@contextmanager
def watching(watcher: DecodeWatcher) -> Iterator[None]:
    """Tell ``watcher`` about every native decode in this process while the body runs."""
    with _lock:
        _watchers.append(watcher)
    try:
        yield
    finally:
        with _lock:
            _watchers.remove(watcher)


@contextmanager
def decoding(source: str | os.PathLike) -> Iterator[None]:
    """The body decodes ``source`` with a native library."""
    watchers = list(_watchers)
    if not watchers:
        yield
        return
    name = os.fspath(source)
    for w in watchers:
        w.begin(name)
    try:
        yield
    finally:
        for w in watchers:
            w.end(name)
