"""UME-R1 multimodal embeddings for retrieval.

``import ume_retriever`` is light: torch and transformers load when an encoder is first used.

    from ume_retriever import UMEEncoder, Item
    enc = UMEEncoder.from_pretrained("zhibinlan/UME-R1-2B")
    res = enc.encode([Item(text="a red circle"), Item(image="page.png")], mode="both")
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, InputError, UMEError
from .inputs.item import Item

__version__ = "0.1.0"

_LAZY = {
    "UMEEncoder": ".model.encoder",
    "EncodeResult": ".results",
    "GenSample": ".results",
    "GenOutcome": ".results",
    "build_tiny_checkpoint": ".model.tiny",
    "UMEIndex": ".index",
    "Hit": ".index",
    "IngestReport": ".index",
    "Fusion": ".fusion",
    "UMERetriever": ".retriever",
}

if TYPE_CHECKING:
    from .model.encoder import UMEEncoder
    from .model.tiny import build_tiny_checkpoint
    from .fusion import Fusion
    from .retriever import UMERetriever
    from .index import Hit, IngestReport, UMEIndex
    from .results import EncodeResult, GenOutcome, GenSample

__all__ = ["Item", "UMEError", "InputError", "CheckpointError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'ume_retriever' has no attribute {name!r}")
