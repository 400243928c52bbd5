"""The ingest journal: which files a native decoder was reading when an ingest died, so that
a file that crashes the process is quarantined instead of crashing every later run.

A JSON file next to the embedded store (``<store>/ingest_journal.json``), or in the cache
folder for a server store. While an ingest runs, every native decode of a file (a video's
headers or frames, a PDF's pages) is written to it before it starts and removed when it ends
(atomic replace, no fsync: it must survive the process, not the machine). An ingest that finds
entries of a process that no longer runs counts a strike against each; a file that was being
decoded when two runs died is quarantined (one death may be a ``kill -9`` or another thread's
crash: an innocent file must not pay for it). A quarantined file is reported as failed, with
how to retry, until it changes or the caller asks to retry. A journal that cannot be written
(a read-only cache folder) is kept in memory, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

JOURNAL_FILE = "ingest_journal.json"
STRIKES_TO_QUARANTINE = 2
_RUN = uuid.uuid4().hex  # this process's identity: a restarted process may get the same pid


def journal_path(location: str, collection: str) -> Path | None:
    """Where the journal of a store lives; None for an in-memory store (nothing survives it)."""
    if location == ":memory:":
        return None
    if os.path.isdir(location):
        return Path(location) / JOURNAL_FILE
    base = os.environ.get("UME_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ume")
    key = hashlib.blake2b(f"{location}|{collection}".encode(), digest_size=8).hexdigest()
    return Path(base).expanduser() / "ingest" / f"{key}.json"


def _alive(pid: int, run: str | None) -> bool:
    if pid == os.getpid():
        return run == _RUN
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
        self.strikes: dict[str, dict[str, Any]] = {}  # source -> {"count", "file_hash"}: runs that died on it
        self._unwritable = False
        self._read()

    def _read(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            self.decoding = dict(data.get("decoding", {}))
            self.quarantined = dict(data.get("quarantined", {}))
            self.strikes = dict(data.get("strikes", {}))
        except (OSError, ValueError, AttributeError) as exc:
            logger.warning("ingest journal %s is unreadable (%s): starting a new one", self.path, exc)

    def _write(self) -> None:
        if self.path is None or self._unwritable:
            return
        data = json.dumps({"decoding": self.decoding, "strikes": self.strikes, "quarantined": self.quarantined},
                          indent=1)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".journal-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.replace(tmp, self.path)
        except OSError as exc:
            self._unwritable = True
            logger.warning("ingest journal %s cannot be written (%s): kept in memory; a file that crashes the "
                           "decoder will not be quarantined", self.path, exc)

    def recover(self) -> list[str]:
        """Count a strike for each decode a dead process left; quarantine the files with
        ``STRIKES_TO_QUARANTINE``. Returns the newly quarantined sources."""
        with self._lock:
            dead = {s: e for s, e in self.decoding.items()
                    if not _alive(int(e.get("pid", 0)), e.get("run"))}
            newly = []
            for source, entry in dead.items():
                del self.decoding[source]
                strike = self.strikes.get(source, {})
                count = (strike.get("count", 0) if strike.get("file_hash") == entry.get("file_hash") else 0) + 1
                self.strikes[source] = {"count": count, "file_hash": entry.get("file_hash")}
                if count >= STRIKES_TO_QUARANTINE:
                    del self.strikes[source]
                    newly.append(source)
                    self.quarantined[source] = {
                        "file_hash": entry.get("file_hash"), "since": entry.get("since"),
                        "reason": f"{count} ingests died while decoding it (the last: {entry.get('since')}, "
                                  f"pid {entry.get('pid')})",
                    }
            if dead:
                self._write()
                logger.warning("ingests died while decoding %s; quarantined: %s", ", ".join(sorted(dead)),
                               ", ".join(newly) or "none yet (a file is quarantined at its second such death)")
            return sorted(newly)

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
                self.decoding[source] = {"pid": os.getpid(), "run": _RUN,
                                         "since": datetime.now(timezone.utc).isoformat(),
                                         "file_hash": self._hashes.get(source)}
                self._write()

    def end(self, source: str) -> None:
        with self._lock:
            self._active[source] -= 1
            if self._active[source] <= 0:
                del self._active[source]
                self.decoding.pop(source, None)
                self._write()

    def settle(self, sources: list[str]) -> None:
        """These files were ingested (or failed cleanly) to the end: earlier deaths were not theirs."""
        with self._lock:
            if any(self.strikes.pop(s, None) is not None for s in list(sources)):
                self._write()
