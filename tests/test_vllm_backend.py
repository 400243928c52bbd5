"""The vLLM backend: pure helpers here; engine parity only where vllm imports and a GPU exists."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import cosine
from ume_retriever.model.vllm_backend import completion_ids_to_pool, multimodal_data, prompt_until_disc


def test_prompt_is_cut_after_the_last_disc_token(encoder):
    p = encoder.prepare("a <disc_emb> in the text")
    cut = prompt_until_disc(p.prompt)
    assert cut.endswith("text\n<disc_emb>") and cut.count("<disc_emb>") == 2
    ids = encoder.processor.tokenizer(cut, add_special_tokens=False)["input_ids"]
    assert ids[-1] == encoder.token_ids.disc


def test_completion_cut_matches_the_transformers_rule():
    gen, end = 7, 9
    assert completion_ids_to_pool([1, 2, gen, end], gen) == ([1, 2, gen], True)
    assert completion_ids_to_pool([1, gen, 3, gen, end], gen) == ([1, gen], True)
    assert completion_ids_to_pool([1, 2, 3, end], gen) == ([1, 2, 3], False)  # state that produced the last token
    assert completion_ids_to_pool([1, 2, 3], gen) == ([1, 2], False)  # cut by max_tokens


def test_multimodal_payload(encoder, mp4_path):
    from ume_retriever import Item

    img = Image.new("RGB", (40, 40))
    assert multimodal_data(encoder.prepare(Item(image=img)))["image"].size == (40, 40)
    assert len(multimodal_data(encoder.prepare(Item(images=[img, img])))["image"]) == 2
    assert multimodal_data(encoder.prepare(Item(video=mp4_path)))["video"].shape == (8, 48, 64, 3)


def test_vllm_parity_with_transformers(tiny_ckpt, encoder):
    pytest.importorskip("vllm", reason="vllm is not installed (optional 'vllm' extra): parity test skipped")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vllm parity needs a CUDA GPU")
    from ume_retriever import Item, UMEEncoder

    venc = UMEEncoder.from_pretrained(tiny_ckpt, backend="vllm", dtype="float32", max_new_tokens=12,
                                      vllm_kwargs={"gpu_memory_utilization": 0.2, "enforce_eager": True})
    inputs = ["a red circle", Item(image=Image.new("RGB", (64, 64), "blue"), text="blue")]
    ours = encoder.encode(inputs, mode="both", max_new_tokens=12)
    theirs = venc.encode(inputs, mode="both", max_new_tokens=12)
    for a, b in zip(ours, theirs):
        assert cosine(a.disc, b.disc) > 0.999
        if a.reasoning == b.reasoning:
            assert cosine(a.gen, b.gen) > 0.999
        assert np.isfinite(b.gen).all()
