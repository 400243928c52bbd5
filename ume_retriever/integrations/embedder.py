"""Encoder loading and "one vector per input, as python floats" for the framework embeddings."""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

from ..errors import BatchEncodeError
from ..model.protocol import EncoderLike

_LOADED: dict[tuple, Any] = {}
_LOADING = threading.Lock()


def shared_encoder(model: Any, encoder_kwargs: dict[str, Any] | None = None, *, base_url: str | None = None,
                   api_key: str | None = None) -> EncoderLike:
    """An ``UMEEncoder`` for ``model`` (a hub name, a folder, or an encoder, returned as is),
    or, with ``base_url``, a ``UMEClient`` of that ``ume serve`` service (``model``: the
    served name, None: the one it serves).

    Loaded checkpoints are shared within the process: frameworks build embedding objects
    freely (a LangChain chain, a LlamaIndex ``Settings`` copy) and each must not load 2B
    weights again.
    """
    if base_url is not None:
        from ..client import UMEClient

        return UMEClient(base_url, api_key, model=None if model is None else os.fspath(model))  # type: ignore[return-value]
    if model is None:
        raise ValueError("give a model (hub name, checkpoint folder or UMEEncoder) or the base_url of a service")
    if not isinstance(model, (str, os.PathLike)):
        return model
    kwargs = dict(encoder_kwargs or {})
    key = (os.fspath(model), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    with _LOADING:
        if key not in _LOADED:
            from ..model.encoder import UMEEncoder

            _LOADED[key] = UMEEncoder.from_pretrained(model, **kwargs)
        return _LOADED[key]


def embed_as_floats(encoder: EncoderLike, inputs: Sequence[Any], mode: str, batch_size: int | None) -> list[list[float]]:
    """One python-float vector per input (disc or gen), in order. If any input fails, all are
    still encoded and ``BatchEncodeError`` lists the failures (with every result attached)."""
    if mode not in ("disc", "gen"):
        raise ValueError(f"mode must be 'disc' or 'gen', got {mode!r}")
    if not inputs:
        return []
    results = encoder.encode(list(inputs), mode=mode, batch_size=batch_size, output="list")
    failed = [r for r in results if r.error is not None]
    if failed:
        raise BatchEncodeError(results, failed)
    return [list(map(float, r.disc if mode == "disc" else r.gen)) for r in results]
