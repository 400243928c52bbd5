"""Turn one ``Item`` into model-ready tensors, and collate several into a left-padded batch.

Each input is processed on its own so that a bad one fails alone with a clear error, and so
that its exact length is known for length-sorted batching. Collation then left-pads the ids
and concatenates the vision tensors in row order, which is what the processor would do for
the same batch.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..errors import InputError
from ..inputs.item import Item
from ..inputs.media import DEFAULT_MAX_DECODE_PIXELS, DEFAULT_NUM_FRAMES, blank_image, load_image, load_video
from .checkpoint import max_image_pixels
from .prompt import build_messages
from .tokens import UMETokenIds

logger = logging.getLogger(__name__)

# Per-item tensors that are concatenated along dim 0 when collating.
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class PreparedInput:
    """One input, tokenised and with its vision tensors, not yet padded."""

    prompt: str  # the chat-formatted prompt text (vision placeholders unexpanded)
    input_ids: torch.Tensor  # (L,) int64, vision placeholders expanded
    mm_token_type_ids: torch.Tensor | None  # (L,) 0 text / 1 image / 2 video
    vision: dict[str, torch.Tensor]  # subset of VISION_KEYS
    images: list[Image.Image]  # the decoded images (kept for non-HF backends)
    video: list[Image.Image] | None  # the sampled frames
    disc_position: int  # index of the last <disc_emb> in input_ids
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def extended(self, extra_ids: torch.Tensor) -> "PreparedInput":
        """This prompt followed by ``extra_ids`` (text tokens), e.g. a generated completion."""
        extra_ids = extra_ids.to(self.input_ids.dtype)
        mm = self.mm_token_type_ids
        if mm is not None:
            mm = torch.cat([mm, torch.zeros_like(extra_ids, dtype=mm.dtype)])
        return PreparedInput(
            prompt=self.prompt, input_ids=torch.cat([self.input_ids, extra_ids]), mm_token_type_ids=mm,
            vision=self.vision, images=self.images, video=self.video, disc_position=self.disc_position,
        )


class InputPreparer:
    """Builds the UME-R1 prompt for an item and runs the checkpoint's processor on it."""

    def __init__(
        self,
        processor: Any,
        token_ids: UMETokenIds,
        *,
        max_input_tokens: int,
        num_video_frames: int = DEFAULT_NUM_FRAMES,
        blank_image_for_text: bool = True,
        max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
    ):
        self.processor = processor
        self.token_ids = token_ids
        self.max_input_tokens = max_input_tokens
        self.num_video_frames = num_video_frames
        self.blank_image_for_text = blank_image_for_text
        self.max_decode_pixels = max_decode_pixels
        video_processor = getattr(processor, "video_processor", None)
        if getattr(video_processor, "cap_pixels_per_frame", False) is None:
            # Newer transformers ask: bound each frame like qwen-vl-utils (the reference) does.
            video_processor.cap_pixels_per_frame = True

    def estimate_length(self, item: Item) -> int:
        """A cheap guess of the prompt length in tokens, for length-sorted batching only.

        Reads image headers (not pixels); never raises: a bad input gets an estimate too and
        fails properly when it is prepared.
        """
        try:
            text = str(item.instruction or "") + str(item.text or "")
            tokens = len(text) // 4
            cap = max_image_pixels(self.processor)
            for src in item.all_images():
                tokens += _image_pixels(src, cap) // (28 * 28)
            if item.video is not None:
                tokens += self.num_video_frames // 2 * cap // (28 * 28)
            return tokens
        except Exception:  # noqa: BLE001 - a malformed item fails properly in prepare()
            return 0

    def shortest_prompt_length(self) -> int:
        """Tokens of the shortest prompt this preparer builds (a one-character text, with the
        blank image when text gets one): what any input needs at least."""
        images = [blank_image()] if self.blank_image_for_text else []
        return len(self._process("x", None, images, None, "the shortest prompt"))

    def prepare(self, item: Item) -> PreparedInput:
        """Raise ``InputError`` (naming the input) when the item cannot be encoded."""
        what = item.describe()
        if item.text is not None and not isinstance(item.text, str):
            raise InputError(what, f"text must be a str, got {type(item.text).__name__}")
        text = item.text or ""
        images = [load_image(src, self.max_decode_pixels) for src in item.all_images()]
        video = None
        if item.video is not None:
            video = load_video(
                item.video, self.num_video_frames, item.video_start, item.video_end, self.max_decode_pixels
            )
        if not text.strip() and not images and video is None:
            raise InputError(what, "nothing to embed: the text is empty and there is no image or video")
        if not images and video is None and self.blank_image_for_text:
            images = [blank_image()]  # what the released checkpoints saw for text-only inputs

        prepared = self._process(text, item.instruction, images, video, what)
        if len(prepared) <= self.max_input_tokens:
            return prepared
        return self._truncate_text(text, item.instruction, images, video, what, len(prepared))

    def _process(
        self, text: str, instruction: str | None, images: list[Image.Image],
        video: list[Image.Image] | None, what: str,
    ) -> PreparedInput:
        messages = build_messages(text, instruction, num_images=len(images), num_videos=int(video is not None))
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        try:
            enc = self.processor(
                text=[prompt],
                images=images or None,
                videos=[video] if video is not None else None,
                return_tensors="pt",
                padding=False,
            )
        except (ValueError, RuntimeError, TypeError, OSError) as exc:
            raise InputError(what, f"the processor rejected this input ({exc})") from None
        input_ids = enc["input_ids"][0]
        disc_hits = (input_ids == self.token_ids.disc).nonzero()
        if len(disc_hits) == 0:  # cannot happen with our prompt; guards a broken chat template
            raise InputError(what, "the prompt lost its <disc_emb> token (check the chat template)")
        mm = enc.get("mm_token_type_ids")
        return PreparedInput(
            prompt=prompt,
            input_ids=input_ids,
            mm_token_type_ids=mm[0] if mm is not None else None,
            vision={k: enc[k] for k in VISION_KEYS if k in enc and enc[k] is not None},
            images=images,
            video=video,
            disc_position=int(disc_hits[-1, 0]),
        )

    def _truncate_text(
        self, text: str, instruction: str | None, images: list[Image.Image],
        video: list[Image.Image] | None, what: str, length: int,
    ) -> PreparedInput:
        """Cut the end of the text until the prompt fits ``max_input_tokens`` (warned, not silent)."""
        tokenizer = self.processor.tokenizer
        text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(text_ids)
        while length > self.max_input_tokens:
            keep -= length - self.max_input_tokens
            if keep <= 0:
                raise InputError(
                    what,
                    f"the prompt without its text is already {length - len(text_ids)} tokens, above "
                    f"max_input_tokens={self.max_input_tokens} (images or video too large?)",
                )
            prepared = self._process(tokenizer.decode(text_ids[:keep]), instruction, images, video, what)
            length = len(prepared)
        message = (
            f"text truncated from {len(text_ids)} to {keep} tokens to fit "
            f"max_input_tokens={self.max_input_tokens}"
        )
        logger.warning("%s: %s", what, message)
        prepared.truncated = True
        prepared.warnings.append(message)
        return prepared


def _image_pixels(src: Any, cap: int) -> int:
    try:
        if isinstance(src, Image.Image):
            width, height = src.size
        else:
            fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(fp) as img:  # header only
                    width, height = img.size
    except Exception:  # noqa: BLE001 - an estimate only; prepare() reports the real problem
        return 0
    return min(width * height, cap)


def collate(
    batch: list[PreparedInput], pad_token_id: int, *, stop_after_disc: bool = False
) -> dict[str, torch.Tensor]:
    """Left-pad a list of prepared inputs into one model batch.

    With ``stop_after_disc`` each sequence ends at its ``<disc_emb>``: in a causal model the
    state there does not depend on what follows, so the rest of the prompt is not computed.
    The inputs' vision tensors become views of the returned batch tensors.
    """
    seqs, mms = [], []
    for p in batch:
        end = p.disc_position + 1 if stop_after_disc else len(p)
        seqs.append(p.input_ids[:end])
        mms.append(p.mm_token_type_ids[:end] if p.mm_token_type_ids is not None else None)
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, length - len(seq):] = seq
        attention_mask[row, length - len(seq):] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if any(m is not None for m in mms):
        mm_ids = torch.zeros((len(batch), length), dtype=torch.long)
        for row, mm in enumerate(mms):
            if mm is not None:
                mm_ids[row, length - len(mm):] = mm
        out["mm_token_type_ids"] = mm_ids
    for key in VISION_KEYS:
        holders = [p for p in batch if key in p.vision]
        if not holders:
            continue
        out[key] = torch.cat([p.vision[key] for p in holders], dim=0)
        # Re-point each input's tensor at its slice of the batch tensor: the per-input copies
        # are freed, so the pixels are held once, as a bare processor call would hold them.
        start = 0
        for p in holders:
            n = p.vision[key].shape[0]
            p.vision = {**p.vision, key: out[key][start:start + n]}
            start += n
    return out
