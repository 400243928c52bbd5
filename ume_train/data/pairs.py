"""Pair records -> token ids with labels, and batches of them for the SFT forward pass.

Each side is prompted exactly as the encoder prompts it (``InputPreparer``: one definition for
training and serving), then the assistant answer ``reasoning ... <gen_emb><|im_end|>`` is
appended. Labels cover that answer only, so the loss masks the prompt including
``<|im_start|>assistant\\n``. ``gen_index`` is the first ``<gen_emb>`` of the ANSWER (the
generation prompt contains the token as well).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ume_retriever.inputs.records import PairRecord, RecordError, Side
from ume_retriever.model.preprocess import InputPreparer, PreparedInput, collate
from ume_retriever.model.prompt import GEN_TOKEN

from .prepared import PREPARE_ERRORS, PreparedRecords

IGNORE_INDEX = -100


def answer_text(side: Side) -> str:
    """The assistant answer a side is trained to produce: its reasoning, ending in ``<gen_emb>``."""
    text = (side.reasoning or "").strip()
    return text if text.endswith(GEN_TOKEN) else f"{text} {GEN_TOKEN}"


@dataclass
class TrainingSide:
    """One side tokenised: the prompt plus the answer, and where the two vectors are read."""

    prepared: PreparedInput  # prompt + answer ids, vision tensors
    answer_start: int  # first answer token
    gen_index: int  # the answer's first <gen_emb>

    def labels(self) -> torch.Tensor:
        labels = self.prepared.input_ids.clone()
        labels[: self.answer_start] = IGNORE_INDEX
        return labels


class SideTokenizer:
    """Turns a ``Side`` into a ``TrainingSide`` with the encoder's own input preparation."""

    def __init__(self, preparer: InputPreparer, *, max_length: int, pdf_dpi: int = 144):
        self.preparer = preparer
        self.tokenizer = preparer.processor.tokenizer
        self.max_length = max_length
        self.pdf_dpi = pdf_dpi
        self.end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __call__(self, side: Side, where: str, name: str) -> TrainingSide:
        try:
            item = side.to_item(self.pdf_dpi, self.preparer_pixel_cap())
            prompt = self.preparer.prepare(item)
        except PREPARE_ERRORS as exc:
            raise RecordError(where, f"{name}: {exc}") from None
        answer = self.tokenizer(answer_text(side), add_special_tokens=False)["input_ids"] + [self.end_of_turn]
        answer_ids = torch.tensor(answer, dtype=torch.long)
        gen_hits = (answer_ids == self.preparer.token_ids.gen).nonzero()
        if len(gen_hits) == 0:  # cannot happen: answer_text() appends the token
            raise RecordError(where, f"{name}: the answer has no <gen_emb> token")
        full = prompt.extended(answer_ids)
        if len(full) > self.max_length:
            raise RecordError(where, f"{name}: {len(full)} tokens (prompt {len(prompt)} + answer {len(answer)}) "
                                     f"exceed max_length={self.max_length}")
        return TrainingSide(full, answer_start=len(prompt), gen_index=len(prompt) + int(gen_hits[0, 0]))

    def pair(self, record: PairRecord) -> dict[str, TrainingSide]:
        """Both sides of ``record``; ``RecordError`` (naming its file and line) when one fails."""
        return {"query": self(record.query, record.where, "query"),
                "target": self(record.target, record.where, "target")}

    def preparer_pixel_cap(self) -> int:
        from ume_retriever.model.checkpoint import max_image_pixels

        return max_image_pixels(self.preparer.processor)


class PairDataset(PreparedRecords):
    """Records tokenised on access (in DataLoader workers when there are any); item ``i`` is
    ``{"query": TrainingSide, "target": TrainingSide, "record": ..., "skipped": [...]}``.

    A record that fails to tokenise is replaced by another one (``PreparedRecords``), up to
    ``max_bad_records``. ``cache=True`` keeps every tokenised pair in memory after first use:
    for small datasets trained for many epochs (the synthetic benchmark), where preparation
    would dominate.
    """

    def __init__(self, records: list[PairRecord], side_tokenizer: SideTokenizer, cache: bool = False,
                 max_bad_records: int = 0):
        self.side_tokenizer = side_tokenizer
        super().__init__(list(records), side_tokenizer.pair, max_bad_records=max_bad_records, cache=cache)


def collate_sides(sides: list[TrainingSide], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded model inputs plus ``labels``, ``disc_index`` and ``gen_index`` (B,)."""
    # collate() re-points vision tensors at the batch; work on shallow copies so a cached
    # PreparedInput keeps its own tensors.
    prepared = [PreparedInput(**{**s.prepared.__dict__}) for s in sides]
    batch = collate(prepared, pad_token_id)
    length = batch["input_ids"].shape[1]
    labels = torch.full((len(sides), length), IGNORE_INDEX, dtype=torch.long)
    disc_index, gen_index = [], []
    for row, side in enumerate(sides):
        pad = length - len(side.prepared)
        labels[row, pad:] = side.labels()
        disc_index.append(pad + side.prepared.disc_position)
        gen_index.append(pad + side.gen_index)
    batch["labels"] = labels
    batch["disc_index"] = torch.tensor(disc_index, dtype=torch.long)
    batch["gen_index"] = torch.tensor(gen_index, dtype=torch.long)
    return batch


class PairCollator:
    """DataLoader collate_fn: ``{"query": batch, "target": batch}``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs: list[dict[str, TrainingSide]]) -> dict[str, Any]:
        return {side: collate_sides([p[side] for p in pairs], self.pad_token_id) for side in ("query", "target")}
