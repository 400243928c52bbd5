"""The tiny checkpoint is in the published layout, deterministic, and loads like a download."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ume_retriever import CheckpointError, UMEEncoder
from ume_retriever.model.tiny import QWEN2VL_SPECIAL_TOKENS, TinyModelSpec, build_tiny_checkpoint

PUBLISHED_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "preprocessor_config.json", "chat_template.json",
}


def test_layout_matches_published_checkpoint(tiny_ckpt):
    names = {p.name for p in tiny_ckpt.iterdir()}
    assert PUBLISHED_FILES <= names
    assert not any(n.endswith((".bin", ".pt", ".py")) for n in names)  # safetensors, no remote code
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert config["model_type"] == "qwen2_vl"


def test_added_tokens_follow_qwen2vl_order_then_ume_tokens(encoder):
    tok = encoder.processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS + ["<gen_emb>", "<disc_emb>"]]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert encoder.token_ids.gen == ids[-2] and encoder.token_ids.disc == ids[-1]
    # the encoder found them by string: the ids round-trip to the strings
    assert tok.convert_ids_to_tokens([encoder.token_ids.gen, encoder.token_ids.disc]) == ["<gen_emb>", "<disc_emb>"]


def test_new_token_embeddings_copy_object_ref_rows(tiny_ckpt, encoder):
    weights = load_file(str(tiny_ckpt / "model.safetensors"))
    emb = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    tok = encoder.processor.tokenizer
    row = lambda t: emb[tok.convert_tokens_to_ids(t)]  # noqa: E731
    assert torch.equal(row("<gen_emb>"), row("<|object_ref_end|>"))
    assert torch.equal(row("<disc_emb>"), row("<|object_ref_start|>"))
    assert not torch.equal(row("<gen_emb>"), row("<disc_emb>"))


def test_builder_is_deterministic_per_seed(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a", seed=3)
    b = build_tiny_checkpoint(tmp_path / "b", seed=3)
    c = build_tiny_checkpoint(tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_builder_cli_and_custom_size(tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "-m", "ume_retriever.model.tiny", str(out), "--seed", "1", "--hidden-size", "96"],
        check=True, capture_output=True,
    )
    config = json.loads((out / "config.json").read_text())
    text_config = config.get("text_config", config)
    assert text_config["hidden_size"] == 96
    enc = UMEEncoder.from_pretrained(out, device="cpu")
    assert enc.embedding_dim == 96
    assert enc.encode("x").disc.shape == (96,)


def test_embedding_dim_comes_from_config(encoder):
    assert encoder.embedding_dim == TinyModelSpec().hidden_size


def test_non_ume_checkpoint_is_refused_clearly(tmp_path, tiny_ckpt):
    from transformers import AutoProcessor

    # A plain Qwen2-VL tokenizer: same checkpoint with the UME tokens renamed away.
    path = build_tiny_checkpoint(tmp_path / "plain", seed=0)
    tok_json = json.loads((path / "tokenizer.json").read_text())
    for added in tok_json["added_tokens"]:
        if added["content"] in ("<gen_emb>", "<disc_emb>"):
            added["content"] = added["content"].replace("emb", "xyz")
    (path / "tokenizer.json").write_text(json.dumps(tok_json))
    AutoProcessor.from_pretrained(path)  # still a valid processor
    with pytest.raises(CheckpointError, match=r"no <(disc|gen)_emb> token; this is not a UME-R1 checkpoint"):
        UMEEncoder.from_pretrained(path, device="cpu")


def test_import_is_light():
    code = (
        "import sys, ume_retriever; from ume_retriever import Item;"
        "heavy = [m for m in ('torch', 'transformers', 'qdrant_client', 'fitz', 'decord') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pixel_caps_override(tiny_ckpt):
    from PIL import Image

    from ume_retriever import Item

    big = Image.new("RGB", (600, 600))
    default = UMEEncoder.from_pretrained(tiny_ckpt, device="cpu")
    capped = UMEEncoder.from_pretrained(tiny_ckpt, device="cpu", max_pixels=56 * 56, min_pixels=28 * 28)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for enc, lo, hi in ((default, 56 * 56, 112 * 112), (capped, 28 * 28, 56 * 56)):
        h, w = smart_resize(600, 600, factor=28, min_pixels=lo, max_pixels=hi)
        assert enc.prepare(Item(image=big)).vision["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
    assert capped.prepare(Item(image=big)).vision["image_grid_thw"].prod() < default.prepare(Item(image=big)).vision["image_grid_thw"].prod()
    with pytest.raises(ValueError, match="min_pixels"):
        UMEEncoder.from_pretrained(tiny_ckpt, device="cpu", max_pixels=100, min_pixels=1000)


def test_checkpoint_trains_and_round_trips(tmp_path, tiny_ckpt):
    """What ume_train does with it: load for training, step, save; the encoder reloads it."""
    import shutil

    import numpy as np
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32)
    model.train()
    enc0 = UMEEncoder.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    prepared = enc0.prepare("a training example")
    ids = prepared.input_ids[None]
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=prepared.mm_token_type_ids[None],
                  **prepared.vision)
    loss = model(**inputs, labels=ids).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    out = tmp_path / "trained"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json",
                 "generation_config.json"):
        shutil.copy(tiny_ckpt / name, out / name)
    enc1 = UMEEncoder.from_pretrained(out, device="cpu", dtype=torch.float32)
    in_memory = UMEEncoder(model.eval(), enc0.processor)
    v1, v_mem, v0 = enc1.encode("query"), in_memory.encode("query"), enc0.encode("query")
    np.testing.assert_allclose(v1.disc, v_mem.disc, atol=1e-6)
    assert not np.allclose(v1.disc, v0.disc, atol=1e-3)
