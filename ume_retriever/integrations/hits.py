"""What a framework document/node carries for a hit: one mapping for LangChain and LlamaIndex."""

from __future__ import annotations

from typing import Any

from ..index import Hit

# Payload fields that are bookkeeping of the index, not something a RAG app shows or filters on.
_INTERNAL = {"kind", "content_hash", "file_hash", "vectors", "ingested_at", "text", "reasoning", "gen_outcome"}


def hit_metadata(hit: Hit, preview: str | None = None) -> dict[str, Any]:
    """Source, page, modality, the fused score and each vector's score, the reasoning, the
    preview image path (for pages, images and videos), and the item's own metadata."""
    payload = hit.payload
    meta = {k: v for k, v in payload.items() if k not in _INTERNAL}
    meta.update({
        "id": hit.id,
        "source": payload.get("source"),
        "page": payload.get("page"),
        "modality": payload.get("modality"),
        "score": hit.score,
        "disc_score": hit.disc_score,
        "gen_score": hit.gen_score,
        "reasoning": hit.reasoning,
        "gen_outcome": payload.get("gen_outcome"),
    })
    if preview is not None:
        meta["image_path"] = preview
    return meta


def hit_text(hit: Hit) -> str:
    """The text a language model reads for a hit: the item's text (a page's extracted text, a
    text chunk), else the model's reasoning about it, else a description of the source."""
    payload = hit.payload
    for key in ("text", "reasoning"):
        if payload.get(key):
            return str(payload[key])
    where = f" page {payload['page']}" if payload.get("page") else ""
    return f"{payload.get('modality', 'item')} {payload.get('source', hit.id)}{where}"
