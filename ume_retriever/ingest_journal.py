"""The ingest journal: which files a native decoder was reading when an ingest died, so that
a file that crashes the process is quarantined instead of crashing every later run.

A JSON file next to the embedded store (``<store>/ingest_journal.json``), or in the cache
folder for a server store. While an ingest runs, every native decode of a file (a video's
headers or frames, a PDF's pages) is written to it before it starts and removed when it ends
(atomic replace, no fsync: it must survive the process, not the machine). An ingest that finds
entries of a process that no longer runs moves them to ``quarantined``; a quarantined file is
reported as failed, with how to retry, until it changes or the caller asks to retry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

JOURNAL_FILE = "ingest_journal.json"


def journal_path(location: str, collection: str) -> Path | None:
    """Where the journal of a store lives; None for an in-memory store (nothing survives it)."""
    if location == ":memory:":
        return None
    if os.path.isdir(location):
        return Path(location) / JOURNAL_FILE
    base = os.environ.get("UME_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ume")
    key = hashlib.blake2b(f"{location}|{collection}".encode(), digest_size=8).hexdigest()
    return Path(base).expanduser() / "ingest" / f"{key}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class IngestJournal:
    """The journal of one store; a ``DecodeWatcher`` while an ingest runs (thread-safe)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._active: Counter[str] = Counter()  # sources being decoded now, by this process
        self._hashes: dict[str, str] = {}  # source -> the file hash its coming decodes read
        self.decoding: dict[str, dict[str, Any]] = {}
        self.quarantined: dict[str, dict[str, Any]] = {}
        self._read()

    def _read(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            self.decoding = dict(data.get("decoding", {}))
            self.quarantined = dict(data.get("quarantined", {}))
        except (OSError, ValueError, AttributeError) as exc:
            logger.warning("ingest journal %s is unreadable (%s): starting a new one", self.path, exc)

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"decoding": self.decoding, "quarantined": self.quarantined}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".journal-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, self.path)

    def recover(self) -> list[str]:
        """Move the decodes of dead processes to quarantine; returns their sources."""
        with self._lock:
            dead = {s: e for s, e in self.decoding.items() if not _alive(int(e.get("pid", 0)))}
            for source, entry in dead.items():
                del self.decoding[source]
                self.quarantined[source] = {
                    "file_hash": entry.get("file_hash"), "since": entry.get("since"),
                    "reason": f"the ingest of {entry.get('since')} (pid {entry.get('pid')}) died while decoding it",
                }
            if dead:
                self._write()
                logger.warning("quarantined %d file(s) that were being decoded when an ingest died: %s",
                               len(dead), ", ".join(sorted(dead)))
            return sorted(dead)

    def quarantine_reason(self, source: str, file_hash: str) -> str | None:
        """Why ``source`` is quarantined, or None (never was, or changed since)."""
        with self._lock:
            entry = self.quarantined.get(source)
            if entry is None:
                return None
            if entry.get("file_hash") not in (None, file_hash):  # replaced since: try it again
                del self.quarantined[source]
                self._write()
                return None
            return str(entry.get("reason"))

    def release(self, source: str) -> None:
        """Forget a quarantine (the caller retries the file)."""
        with self._lock:
            if self.quarantined.pop(source, None) is not None:
                self._write()

    def set_file_hash(self, source: str, file_hash: str) -> None:
        """The content a coming decode of ``source`` reads (kept with its journal entry)."""
        with self._lock:
            self._hashes[source] = file_hash

    # -- DecodeWatcher ------------------------------------------------------------------------

    def begin(self, source: str) -> None:
        with self._lock:
            self._active[source] += 1
            if self._active[source] == 1:
                self.decoding[source] = {"pid": os.getpid(), "since": datetime.now(timezone.utc).isoformat(),
                                         "file_hash": self._hashes.get(source)}
                self._write()

    def end(self, source: str) -> None:
        with self._lock:
            self._active[source] -= 1
            if self._active[source] <= 0:
                del self._active[source]
                self.decoding.pop(source, None)
                self._write()
