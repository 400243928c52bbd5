"""Disc vectors equal a plain forward pass read at <disc_emb>, whatever the batch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import cosine, reference_disc
from ume_retriever import Item
from ume_retriever.inputs.media import load_video


def _images():
    return [Image.new("RGB", (90, 60), (200, 30, 30)), Image.linear_gradient("L").convert("RGB").resize((70, 80))]


def test_disc_equals_plain_forward_for_each_modality(encoder, mp4_path):
    red, grad = _images()
    cases = [
        (Item(text="a red square on white"), dict(text="a red square on white")),
        (Item(text="q", instruction="Find it: "), dict(text="q", instruction="Find it: ")),
        (Item(image=red), dict(text="", images=[red])),
        (Item(text="two", images=[red, grad]), dict(text="two", images=[red, grad])),
        (Item(text="clip", video=mp4_path), dict(text="clip", video=load_video(mp4_path))),
    ]
    results = encoder.encode([c[0] for c in cases], mode="disc")
    for (item, ref_args), res in zip(cases, results):
        assert res.error is None, res.error
        ref = reference_disc(encoder, **ref_args)
        assert cosine(res.disc, ref) > 0.9999, item.describe()
        np.testing.assert_allclose(res.disc, ref, atol=1e-5)
        assert abs(np.linalg.norm(res.disc) - 1) < 1e-5


def test_batched_equals_one_by_one(encoder, mp4_path):
    red, grad = _images()
    inputs = [
        "short",
        "a much longer text input that pads the others in its batch quite a bit more",
        Item(image=red, text="with image"),
        Item(images=[red, grad]),
        Item(video=mp4_path),
        "mid length text here",
        Item(image=grad, instruction="Represent the given image: "),
    ]
    batched = encoder.encode(inputs, mode="disc", batch_size=4)
    for value, res in zip(inputs, batched):
        alone = encoder.encode(value, mode="disc")
        np.testing.assert_allclose(res.disc, alone.disc, atol=1e-5)
    big = encoder.encode(inputs, mode="disc", batch_size=len(inputs))
    for a, b in zip(batched, big):
        np.testing.assert_allclose(a.disc, b.disc, atol=1e-5)


def test_results_keep_input_order_and_types(encoder):
    texts = ["a", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "cc", "ddddddddddddd e f g"]
    res = encoder.encode(texts, mode="disc", batch_size=2)
    assert [r.index for r in res] == [0, 1, 2, 3]
    for text, r in zip(texts, res):
        np.testing.assert_allclose(r.disc, encoder.encode(text).disc, atol=1e-5)
        assert r.gen is None and r.reasoning is None and r.samples == []
    as_list = encoder.encode(texts[:1], output="list")[0]
    assert isinstance(as_list.disc, list) and all(type(x) is float for x in as_list.disc)


def test_image_sources_agree(encoder, tmp_path):
    red, _ = _images()
    path = tmp_path / "red.png"
    red.save(path)
    res = encoder.encode([Item(image=red), Item(image=path), Item(image=path.read_bytes()), path], mode="disc")
    for r in res[1:]:
        np.testing.assert_allclose(r.disc, res[0].disc, atol=1e-6)


def test_bad_mode_and_sampling_arguments(encoder):
    with pytest.raises(ValueError, match="mode"):
        encoder.encode("x", mode="fast")
    with pytest.raises(ValueError, match="do_sample"):
        encoder.encode("x", mode="gen", num_samples=2, do_sample=False)


def test_single_input_gives_single_result_and_json_view(encoder):
    r = encoder.encode("alone")
    assert not isinstance(r, list) and r.index == 0
    d = r.as_dict()
    assert isinstance(d["disc"], list) and d["gen"] is None and d["error"] is None
    many = encoder.encode(["alone"])
    assert isinstance(many, list) and len(many) == 1


def test_inputs_are_prepared_one_batch_at_a_time(encoder):
    """Memory holds one batch of pixel tensors, not the whole input list."""
    events = []
    prepare, run = encoder.preparer.prepare, encoder.backend.run
    encoder.preparer.prepare = lambda item: events.append("prepare") or prepare(item)
    encoder.backend.run = lambda batch, *a: events.append(f"run{len(batch)}") or run(batch, *a)
    try:
        encoder.encode([f"text number {i}" for i in range(7)], batch_size=3)
    finally:
        del encoder.preparer.prepare, encoder.backend.run
    assert events == ["prepare"] * 3 + ["run3"] + ["prepare"] * 3 + ["run3"] + ["prepare", "run1"]


def test_batches_are_sorted_longest_first(encoder):
    sizes = []
    run = encoder.backend.run
    encoder.backend.run = lambda batch, *a: sizes.append([len(p) for p in batch]) or run(batch, *a)
    try:
        encoder.encode(["a", "b " * 50, "c " * 10, "d " * 30], batch_size=2)
    finally:
        del encoder.backend.run
    assert len(sizes) == 2 and min(sizes[0]) > max(sizes[1])  # the two longest share a batch
