"""Build a tiny, random UME-R1 checkpoint in the published layout, offline and deterministic.

The directory holds what ``zhibinlan/UME-R1-2B`` holds: a Qwen2-VL ``config.json`` and
safetensors weights, ``generation_config.json``, a byte-level BPE Qwen2 tokenizer whose added
tokens come in Qwen2-VL's order followed by ``<gen_emb>`` and ``<disc_emb>``, the Qwen2-VL chat
template, and the image/video processor configs. Tests, demos and ``ume_train`` load it through
the same ``from_pretrained`` path a downloaded checkpoint takes.

    ume-build-tiny ./tiny-ume --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .checkpoint import chat_template, save_published_layout
from .prompt import DISC_TOKEN, GEN_TOKEN, GENERATION_PROMPT, NEW_TOKEN_INIT_SOURCES, SYSTEM_MESSAGE

logger = logging.getLogger(__name__)

# Qwen2-VL's added tokens, in id order (151643..151656 in the real vocabulary); UME-R1 appends
# <gen_emb> then <disc_emb> (151657, 151658).
QWEN2VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
UME_TOKENS = [GEN_TOKEN, DISC_TOKEN]

# Words the tiny tokenizer learns merges for: the prompt, the output format, and the
# vocabulary of ume_train's synthetic shape scenes.
_CORPUS = [
    SYSTEM_MESSAGE,
    GENERATION_PROMPT,
    "<think> The input shows a red circle in the top left. </think><answer> red circle </answer>",
    "Find a document image that matches the given query: Represent the given image.",
    "red green blue yellow purple orange black white gray circle square triangle star diamond cross",
    "<|im_start|>system\n <|im_start|>user\n <|im_start|>assistant\n",
    "<think>The query asks for an image of a</think><answer> <think>The image shows a</think><answer>",
    "<think>The query asks for a video of a <think>The video shows a <think>The page shows a",
    "Find the matching image: Find the matching video: Find the matching page: the top left has a",
    "find a video of going moving from left to right right to left top to bottom bottom to top",
    "small large big tiny left right top bottom center middle above below next to moving",
    "a photo of one two three four five six seven eight nine ten shapes scene page video",
    "0123456789 .,;:!?'\"()[]{}<>-_/\\|@#$%^&*+=~` \n\t",
    "the quick brown fox jumps over the lazy dog THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
]
# The words of ume_train's reasoning task (data/reasoning_task.py: both vocabularies, clues,
# routes, wordings), for the synthetic-task spec. Without them its relation words are spelt
# out byte by byte ("anticlockwise" is 11 tokens, "clockwise" 8), and the tiny model does not
# learn to copy a route from the query (docs/reasoning.md). "finally", the third connector
# that only three-hop routes (--train-hops 3) use, is not among them.
REASONING_TASK_WORDS = (
    "A An At Black Blue Brown Cyan Find From Get Green Grey I In Lime Look Of On One Orange Pink Placed "
    "Purple Red Search Show The Which Yellow a aid am an and angles answer anticlockwise arrow asks at "
    "badge ball banana bar bark black blue bottom bright brown candy carrot cell centre chessboard "
    "chocolate circle clear clockwise cloud coal coin colour coloured corner corners cross cyan deep "
    "diamond doughnut elephant engine equal find fire first flamingo flat floss for four fresh frog from "
    "gen going grass green grey hexagon hole honeycomb image in is it kit kite lagoon lavender left "
    "lemon lime long look looking lot me night of on one opposite orange painted picture pink pizza "
    "placed plank plum plus points pumpkin purple query rain reached rectangle red right ring ripe round "
    "sea shape sheriff shows side sides sign sits sky slice square standing star tennis that the then "
    "three to tomato top tree triangle tropical very way whose with yellow yellowish"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the random model. The defaults build a ~0.2M-parameter model in ~0.2 s."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_depth: int = 1
    vision_embed_dim: int = 32
    vision_num_heads: int = 2
    vision_mlp_ratio: int = 2
    bpe_vocab_size: int = 512
    tokenizer_words: str = ""  # more text the tokenizer learns merges for (words become single tokens)
    vocab_size: int | None = None  # embedding rows; None: the tokenizer's size rounded up to 64
    tie_word_embeddings: bool = True  # as Qwen2-VL-2B
    max_position_embeddings: int = 32768
    # Qwen2-VL's 1e6. With tiny heads, M-RoPE's height/width sections get only the lowest
    # frequencies (~1e-5 rad per position at head_dim 16): such a model cannot tell image
    # tokens apart by position unless the base is much smaller (see benchmarks/sft_learning.py).
    rope_theta: float = 1000000.0
    # Processor pixel caps: tiny images keep test sequences short (4..16 visual tokens).
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    # Qwen2-VL's 14: a merged visual token covers (2 * patch_size)^2 pixels.
    patch_size: int = 14

    @property
    def image_side(self) -> int:
        """The side of the square an image is resized to when both pixel caps are equal."""
        return round(self.max_pixels ** 0.5)

    @property
    def visual_tokens_per_image(self) -> int | None:
        """Merged visual tokens per square image when both caps are equal."""
        return (self.image_side // (2 * self.patch_size)) ** 2 if self.min_pixels == self.max_pixels else None


def _train_tokenizer(vocab_size: int, words: str = ""):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((_CORPUS + ([words] if words else [])) * 4, trainer)
    model_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model_json["vocab"],
        merges=merges,
        errors="replace",
        unk_token=None,
        bos_token=None,
        eos_token=None,
        pad_token=None,
        model_max_length=32768,
        padding_side="left",
    )
    # Added in Qwen2-VL's id order first, then the UME tokens; roles are assigned afterwards
    # so that naming eos/pad does not reorder the ids.
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN2VL_SPECIAL_TOKENS + UME_TOKENS],
        special_tokens=True,
    )
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2  # mrope_section splits head_dim/2 over (temporal, height, width)
    return [half - 2 * (half // 3), half // 3, half // 3]


def make_config(spec: TinyModelSpec, tokenizer: Any) -> Any:
    """A ``Qwen2VLConfig`` of the given sizes whose special ids come from ``tokenizer``."""
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS + UME_TOKENS}
    # Like Qwen2-VL's 151936 rows for 151659 tokens: the embedding table is padded.
    vocab_size = spec.vocab_size or ((len(tokenizer) + 63) // 64) * 64
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=spec.max_position_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": spec.rope_theta,
                "mrope_section": _mrope_section(spec.hidden_size // spec.num_attention_heads),
            },
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=spec.tie_word_embeddings,
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            embed_dim=spec.vision_embed_dim,
            hidden_size=spec.hidden_size,  # the merger's output = the LLM width
            num_heads=spec.vision_num_heads,
            mlp_ratio=spec.vision_mlp_ratio,
            patch_size=spec.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def make_generation_config(tokenizer: Any) -> Any:
    """Qwen2-VL-Instruct's generation config (top_k=1: effectively greedy)."""
    from transformers import GenerationConfig

    end, text_end = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return GenerationConfig(
        bos_token_id=text_end,
        pad_token_id=text_end,
        eos_token_id=[end, text_end],
        do_sample=True,
        temperature=0.01,
        top_p=0.001,
        top_k=1,
        repetition_penalty=1.05,
    )


def build_random_model(
    seed: int = 0, spec: TinyModelSpec | None = None, *, device: Any = None, dtype: Any = None
) -> tuple[Any, Any]:
    """A random UME-R1 model and its processor, in memory (``(model, processor)``).

    Benchmarks use it for large shapes (see :func:`qwen2vl_2b_spec`) without writing weights.
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    spec = spec or TinyModelSpec()
    tokenizer = _train_tokenizer(spec.bpe_vocab_size, spec.tokenizer_words)
    config = make_config(spec, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = Qwen2VLForConditionalGeneration(config)
    model = model.to(dtype=dtype or torch.float32).eval()
    with torch.no_grad():  # the paper's initialisation of the two new tokens
        emb = model.get_input_embeddings().weight
        for new, source in NEW_TOKEN_INIT_SOURCES.items():
            emb[tokenizer.convert_tokens_to_ids(new)] = emb[tokenizer.convert_tokens_to_ids(source)]
    model.generation_config = make_generation_config(tokenizer)
    caps = dict(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=spec.patch_size)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**caps),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**caps),
        chat_template=chat_template(),
    )
    return model, processor


def build_tiny_checkpoint(path: str | Path, seed: int = 0, spec: TinyModelSpec | None = None) -> Path:
    """Write a random UME-R1 checkpoint to ``path`` (created) and return the path.

    Deterministic for ``seed`` and ``spec``: the same arguments give identical files.
    """
    spec = spec or TinyModelSpec()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, processor = build_random_model(seed, spec)
    save_published_layout(model, processor, path)
    (path / "ume_tiny_spec.json").write_text(json.dumps({"seed": seed, **asdict(spec)}, indent=2))
    return path


def synthetic_task_spec(image_size: int = 28, *, vision_depth: int = 1, vision_width: int = 64,
                        patch_size: int = 14, text_layers: int = 2, text_width: int = 64) -> TinyModelSpec:
    """The tiny model ``ume_train``'s synthetic benchmarks train from scratch (~0.3M parameters).

    The perception budget: ``image_size``, the side every image is resized to (a multiple of
    ``2 * patch_size``); ``patch_size``, the vision patch (Qwen2-VL's 14; 2x2 patches make one
    merged visual token, so a token covers ``(2 * patch_size)^2`` pixels); ``vision_depth`` /
    ``vision_width``, the vision tower's blocks and width (heads of 32 dims); ``text_layers`` /
    ``text_width``, the language model's (heads of 32 dims, one key/value head, MLP 4x wide).

    Measured (benchmarks/reasoning_generalisation.py, docs/reasoning.md): where an image is ONE
    merged token, the merger's concatenation of its 2x2 patches puts which quadrant holds the
    shape into the token's content; across several tokens, position has to come from M-RoPE,
    which this model learns slowly. A byte-level BPE of 1,024 merges keeps the fixed UME-R1
    prompt short (~100 tokens), and rope_theta=10 (at Qwen2-VL's 1e6 the height/width sections
    of a 32-dim head turn by ~1e-5 rad per position).
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if image_size < 2 * patch_size or image_size % (2 * patch_size):
        raise ValueError(f"image_size must be a positive multiple of {2 * patch_size} (one visual token per "
                         f"{2 * patch_size}x{2 * patch_size} pixels at patch_size {patch_size}), got {image_size}")
    if vision_width < 32 or vision_width % 32:
        raise ValueError(f"vision_width must be a positive multiple of 32 (32-dim heads), got {vision_width}")
    if vision_depth < 1:
        raise ValueError(f"vision_depth must be >= 1, got {vision_depth}")
    if text_width < 32 or text_width % 32:
        raise ValueError(f"text_width must be a positive multiple of 32 (32-dim heads), got {text_width}")
    if text_layers < 1:
        raise ValueError(f"text_layers must be >= 1, got {text_layers}")
    return TinyModelSpec(
        hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text_layers,
        num_attention_heads=text_width // 32, num_key_value_heads=1,
        rope_theta=10.0, vision_depth=vision_depth, vision_embed_dim=vision_width,
        vision_num_heads=vision_width // 32, bpe_vocab_size=1024, tokenizer_words=REASONING_TASK_WORDS,
        min_pixels=image_size * image_size, max_pixels=image_size * image_size, patch_size=patch_size,
    )


def qwen2vl_2b_spec() -> TinyModelSpec:
    """The shapes of Qwen2-VL-2B (UME-R1-2B): for benchmarks on random weights."""
    return TinyModelSpec(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vision_depth=32, vision_embed_dim=1280, vision_num_heads=16,
        vision_mlp_ratio=4, vocab_size=151936, min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random UME-R1 checkpoint (offline).")
    parser.add_argument("path", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=TinyModelSpec.hidden_size)
    parser.add_argument("--layers", type=int, default=TinyModelSpec.num_hidden_layers)
    parser.add_argument("--vision-depth", type=int, help="vision tower blocks (default: the spec's)")
    parser.add_argument("--synthetic-task", action="store_true",
                        help="the spec ume_train's synthetic benchmarks train from scratch (docs/training.md)")
    parser.add_argument("--image-pixels", type=int,
                        help="with --synthetic-task: the side images are resized to (a multiple of 28)")
    parser.add_argument("--vision-width", type=int, help="with --synthetic-task: the vision tower's width")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.synthetic_task:
        defaults = synthetic_task_spec()
        spec = synthetic_task_spec(args.image_pixels or defaults.image_side,
                                   vision_depth=args.vision_depth or defaults.vision_depth,
                                   vision_width=args.vision_width or defaults.vision_embed_dim)
    elif args.image_pixels or args.vision_width:
        parser.error("--image-pixels and --vision-width go with --synthetic-task")
    else:
        spec = TinyModelSpec(hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
                             num_hidden_layers=args.layers, vision_depth=args.vision_depth or TinyModelSpec.vision_depth)
    t0 = time.perf_counter()
    out = build_tiny_checkpoint(args.path, seed=args.seed, spec=spec)
    logger.info("built %s in %.2fs", out, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
