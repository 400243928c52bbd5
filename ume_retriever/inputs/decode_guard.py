"""Marks the moments a native library (decord, PyAV, pymupdf) decodes a file, for the ingest
journal: a file that crashes the decoder (a segfault, an abort) kills the process, and the
next ingest must know which file it was so that it does not crash on it again and again.

The index installs one ``DecodeWatcher`` for the length of an ingest; with none installed,
``decoding`` costs one attribute lookup.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Protocol


class DecodeWatcher(Protocol):
    def begin(self, source: str) -> None: ...

    def end(self, source: str) -> None: ...


_watcher: DecodeWatcher | None = None


def install(watcher: DecodeWatcher | None) -> DecodeWatcher | None:
    """Set the watcher (None removes it); returns the one it replaces."""
    global _watcher
    previous, _watcher = _watcher, watcher
    return previous


@contextmanager
def decoding(source: str | os.PathLike) -> Iterator[None]:
    """The body decodes ``source`` with a native library."""
    watcher = _watcher
    if watcher is None:
        yield
        return
    name = os.fspath(source)
    watcher.begin(name)
    try:
        yield
    finally:
        watcher.end(name)
