"""Errors users see. Each names the input and what is wrong with it."""

from __future__ import annotations


class UMEError(Exception):
    """Base class for errors raised by ume_retriever."""


class InputError(UMEError, ValueError):
    """One input cannot be encoded (missing file, corrupt image, empty text, ...).

    ``encode`` does not raise it for a batch: it is stored on that input's result
    (``result.error``) and every other input is still encoded.
    """

    def __init__(self, what: str, reason: str, index: int | None = None):
        self.what = what
        self.reason = reason
        self.index = index
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"input {self.index} " if self.index is not None else ""
        return f"{where}({self.what}): {self.reason}"

    def __reduce__(self):  # pickled by its fields (results cross process boundaries: Ray, workers)
        return (InputError, (self.what, self.reason, self.index))

    def at(self, index: int) -> "InputError":
        """The same error, located at position ``index`` of a batch."""
        return InputError(self.what, self.reason, index)


class CheckpointError(UMEError):
    """A checkpoint lacks something a UME-R1 checkpoint must have."""


class BatchEncodeError(UMEError):
    """Some inputs of a call that must return one vector per input (a framework's
    ``embed_documents``) failed. Every input was still encoded: ``results`` holds all of them
    (failed ones with their ``error``), ``failed`` the failures."""

    def __init__(self, results: list, failed: list):
        self.results = results
        self.failed = failed
        shown = "; ".join(str(r.error) for r in failed[:5]) + (f"; ... ({len(failed) - 5} more)" if len(failed) > 5 else "")
        super().__init__(f"{len(failed)} of {len(results)} inputs could not be embedded: {shown}")
