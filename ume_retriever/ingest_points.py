"""From loaded items to store points: encode, check, build the payload. One definition for every
ingest path (in process, and the encoder actors of the Ray path), so both store the same thing.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Sequence

import numpy as np

from .errors import InputError
from .inputs.item import Item
from .inputs.loaders import LoadedItem, item_hash
from .model.checkpoint import pixel_caps
from .model.protocol import EncoderLike
from .backfill import GEN_FROM_PAYLOAD
from .store import DISC, GEN, GEN_PENDING, GEN_STATUS, StoredPoint

Status = Literal["indexed", "unchanged", "failed", "skipped", "removed"]
# Payload text kept per point (the full text is still what the model embeds): a 10 MB text
# file must not become a 10 MB payload (a Qdrant server refuses requests above 32 MB).
MAX_PAYLOAD_TEXT_CHARS = 16_384
# Points per upsert are cut so that one request stays well under a Qdrant server's 32 MB limit.
MAX_UPSERT_BYTES = 8 * 1024 * 1024
NAMESPACE = uuid.UUID("6f1d3c52-8a4e-4b7e-9a55-3f2f6c1e9b10")  # of point and manifest ids
# e.g. a video whose headers promise nothing: never "indexed" as empty
NO_ITEMS = "the file gave no items to index"
NOT_REREADABLE = ("an in-memory item with images or video, or text longer than the payload keeps, "
                  "cannot be read again later")


@dataclass
class IngestEntry:
    source: str
    locator: str
    status: Status
    reason: str | None = None
    id: str | None = None


@dataclass
class BuiltPoint:
    """One encoded item: its report entry, and its point unless it failed."""

    entry: IngestEntry
    id: str  # the item's point id (also when it failed)
    point: StoredPoint | None
    deferred: bool = False  # stored with gen pending (staged ingestion)
    gen_now: bool = False  # gen="later" asked, but the item cannot be read again: gen computed now


@dataclass
class PointBuilder:
    """Encodes loaded items into the points of an index of ``vectors`` (see ``UMEIndex``)."""

    vectors: tuple[str, ...]
    model: str
    revision: str | None
    gen_later: bool = False

    @property
    def mode(self) -> str:
        return "both" if len(self.vectors) == 2 else self.vectors[0]

    def build(self, encoder: EncoderLike, todo: Sequence[tuple[LoadedItem, str]], batch_size: int) -> list[BuiltPoint]:
        """Encode ``todo`` (loaded item, point id) and build each item's point or failure."""
        later = [self.gen_later and rereadable(loaded) for loaded, _ in todo]
        results: list = [None] * len(todo)
        for defer, mode in ((True, DISC), (False, self.mode)):
            at = [i for i, d in enumerate(later) if d is defer]
            if at:
                encoded = encoder.encode([todo[i][0].item for i in at], mode=mode, batch_size=batch_size)
                for i, res in zip(at, encoded):
                    results[i] = res
        now = datetime.now(timezone.utc).isoformat()
        built = []
        for (loaded, pid), res, deferred in zip(todo, results, later):
            if res.error is not None:
                reason = res.error.reason if isinstance(res.error, InputError) else str(res.error)
                built.append(BuiltPoint(IngestEntry(loaded.source, loaded.locator, "failed", reason), pid, None))
                continue
            vectors = {}
            if res.disc is not None:
                vectors[DISC] = res.disc
            if res.gen is not None:
                vectors[GEN] = res.gen
            bad = [name for name, v in vectors.items() if not np.isfinite(v).all()]
            if bad:  # a broken checkpoint or an fp16 overflow: never store a vector no query can find
                reason = f"the model gave a non-finite (NaN/inf) {' and '.join(bad)} vector"
                built.append(BuiltPoint(IngestEntry(loaded.source, loaded.locator, "failed", reason), pid, None))
                continue
            text, truncated = payload_text(loaded.text)
            payload = {
                **{k: v for k, v in loaded.item.metadata.items() if k not in ("source", "locator")},
                **loaded.fields,
                "kind": "item", "source": loaded.source, "locator": loaded.locator, "modality": loaded.modality,
                "text": text, **({"text_truncated": True} if truncated else {}), "reasoning": res.reasoning,
                "gen_outcome": res.gen_outcome.value if res.gen_outcome else None,
                "content_hash": loaded.content_hash, "file_hash": loaded.file_hash,
                "model": self.model, "revision": self.revision, "vectors": list(self.vectors),
                "ingested_at": now,
            }
            if deferred:
                payload[GEN_STATUS] = GEN_PENDING
                if loaded.in_memory:  # the backfill makes the item again from its payload
                    payload["gen_from"] = GEN_FROM_PAYLOAD
                    if loaded.item.instruction:
                        payload["instruction"] = loaded.item.instruction
            built.append(BuiltPoint(IngestEntry(loaded.source, loaded.locator, "indexed", id=pid), pid,
                                    StoredPoint(id=pid, vectors=vectors, payload=payload),
                                    deferred=deferred, gen_now=self.gen_later and not deferred))
        return built


def upsert_batches(points: Sequence[StoredPoint]) -> list[list[StoredPoint]]:
    """``points`` cut into upserts of at most ``MAX_UPSERT_BYTES`` (as JSON, roughly) each."""
    batches: list[list[StoredPoint]] = []
    batch: list[StoredPoint] = []
    size = 0
    for point in points:
        cost = point_bytes(point)
        if batch and size + cost > MAX_UPSERT_BYTES:
            batches.append(batch)
            batch, size = [], 0
        batch.append(point)
        size += cost
    if batch:
        batches.append(batch)
    return batches


def point_bytes(point: StoredPoint) -> int:
    """A point's size in a JSON upsert request, from above: at most ~24 bytes per float, its payload."""
    floats = sum(len(v) for v in point.vectors.values())
    return 24 * floats + len(json.dumps(point.payload, default=str)) + 64


def payload_text(text: str | None) -> tuple[str | None, bool]:
    """The text kept in a payload, and whether it was cut to ``MAX_PAYLOAD_TEXT_CHARS``."""
    if text is None or len(text) <= MAX_PAYLOAD_TEXT_CHARS:
        return text, False
    return text[:MAX_PAYLOAD_TEXT_CHARS], True


def rereadable(loaded: LoadedItem) -> bool:
    """Whether a backfill can make this item again: a file's item from the file, an in-memory
    text-only item from its payload (text kept whole)."""
    if not loaded.in_memory:
        return True
    item: Item = loaded.item
    return (item.video is None and not item.all_images() and item.text is not None
            and len(item.text) <= MAX_PAYLOAD_TEXT_CHARS)


def point_id(source: str, locator: str, content_hash: str, vectors: Sequence[str], settings: str = "") -> str:
    key = f"{source}|{locator}|{content_hash}|{'+'.join(vectors)}" + (f"|{settings}" if settings else "")
    return str(uuid.uuid5(NAMESPACE, key))


def encoder_settings(encoder: EncoderLike) -> dict[str, Any]:
    """What, besides the model and the content, decides an item's vectors."""
    return {"pixel_caps": pixel_caps(encoder.processor), "max_new_tokens": encoder.max_new_tokens,
            "num_video_frames": getattr(getattr(encoder, "preparer", None), "num_video_frames", None)}


def settings_id(settings: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def in_memory_item(item: Item) -> LoadedItem:
    """An item given in memory (not a file), as the ingest carries it."""
    chash = item_hash(item)
    source = str(item.metadata.get("source") or f"item:{chash}")
    return LoadedItem(item, source, str(item.metadata.get("locator", "")), _modality(item), chash, chash,
                      text=item.text, in_memory=True)


def _modality(item: Item) -> str:
    if item.video is not None:
        return "video"
    if item.all_images():
        return "image+text" if item.text else "image"
    return "text"
