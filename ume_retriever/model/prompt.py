"""The UME-R1 prompt: one definition shared by serving (the encoder) and training (ume_train).

Layout of one input (see shared/UME-R1.md, "Tokens and prompt"):

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
    <|im_start|>user\n[<vision>...]{instruction}{text}\n<disc_emb>\n{GENERATION_PROMPT}<|im_end|>\n
    <|im_start|>assistant\n

and the model is expected to answer ``<think>...</think><answer> summary <gen_emb><|im_end|>``.
"""

from __future__ import annotations

import re
from typing import Any

DISC_TOKEN = "<disc_emb>"
GEN_TOKEN = "<gen_emb>"
SYSTEM_MESSAGE = "You are a helpful assistant."
GENERATION_PROMPT = (
    "Represent the above input text, images, videos, or any combination of the three as "
    "embeddings. First output the thinking process in <think> </think> tags and then summarize "
    "the entire input in a word or sentence. Finally, use the <gen_emb> tag to represent the "
    "entire input."
)
# Unanchored search: the reasoning spans lines, anything may precede <think>.
OUTPUT_FORMAT = re.compile(r"<think>.*?</think>.*?\s*<answer>.*?\s*<gen_emb>", re.DOTALL)
# New-token initialisation used when a Qwen2-VL-Instruct vocabulary is extended (paper, SFT).
NEW_TOKEN_INIT_SOURCES = {GEN_TOKEN: "<|object_ref_end|>", DISC_TOKEN: "<|object_ref_start|>"}


def user_text(text: str, instruction: str | None) -> str:
    """The text part of the user turn: ``{instruction}{text}\\n<disc_emb>\\n{GENERATION_PROMPT}``."""
    return f"{instruction or ''}{text}\n{DISC_TOKEN}\n{GENERATION_PROMPT}"


def build_messages(
    text: str,
    instruction: str | None = None,
    num_images: int = 0,
    num_videos: int = 0,
) -> list[dict[str, Any]]:
    """Chat messages for one input in the processor's content-list format.

    Media come first, then the text (the order the published checkpoints were trained with).
    """
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content += [{"type": "video"} for _ in range(num_videos)]
    content.append({"type": "text", "text": user_text(text, instruction)})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
        {"role": "user", "content": content},
    ]


def is_well_formed(completion: str) -> bool:
    """True when a completion follows the UME-R1 output format (the RL format reward's test)."""
    return OUTPUT_FORMAT.search(completion) is not None
