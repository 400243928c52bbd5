"""Bad inputs get a clear error naming them; every other input in the batch still gets vectors."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import write_mp4
from ume_retriever import InputError, Item
from ume_retriever.inputs.item import as_item
from ume_retriever.inputs.media import load_image, load_video, uniform_indices


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG claiming width x height, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.fixture()
def good_png(tmp_path) -> Path:
    path = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (0, 128, 255)).save(path)
    return path


def test_one_bad_input_never_loses_the_others(encoder, tmp_path, good_png):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good_png.read_bytes()[:60])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    not_video = tmp_path / "noise.mp4"
    not_video.write_bytes(b"\x00\x01garbage" * 100)
    inputs = [
        "first good text",
        Item(image=b"this is not an image"),
        Item(image=truncated),
        Item(image=empty),
        Item(image=tmp_path / "missing.png"),
        12345,
        Item(video=[]),
        Item(video=not_video),
        Item(text="   "),
        Item(image=good_png, text="good with image"),
        Item(image=png_header_only(9000, 9000)),
        "last good text",
    ]
    res = encoder.encode(inputs, mode="disc", batch_size=3)
    expected_errors = {
        1: "not a readable image",
        2: "truncated or corrupt",
        3: "empty (0 bytes)",
        4: "file not found",
        5: "unsupported input type int",
        6: "zero frames",
        7: "cannot decode video",
        8: "nothing to embed",
        10: "above the decode limit",
    }
    for i, r in enumerate(res):
        if i in expected_errors:
            assert r.error is not None and r.disc is None, i
            assert isinstance(r.error, InputError) and r.error.index == i
            assert expected_errors[i] in str(r.error), str(r.error)
            assert str(r.error).startswith(f"input {i} ("), str(r.error)
        else:
            assert r.error is None, r.error
            np.testing.assert_allclose(r.disc, encoder.encode(inputs[i]).disc, atol=1e-5)
    # the message names the input
    assert "missing.png" in str(res[4].error) and "noise.mp4" in str(res[7].error)


def test_single_bad_input_is_returned_not_raised(encoder):
    r = encoder.encode(Item(image=b"nope"))
    assert r.error is not None and not r.ok
    with pytest.raises(InputError, match="not a readable image"):
        r.raise_for_error()


def test_huge_jpeg_is_decoded_at_reduced_scale_and_other_formats_refused(tmp_path):
    big = Image.new("RGB", (400, 300), (10, 200, 30))
    jpg, png = tmp_path / "big.jpg", tmp_path / "big.png"
    big.save(jpg, quality=95)
    big.save(png)
    small = load_image(jpg, max_decode_pixels=40_000)
    assert small.size[0] * small.size[1] <= 40_000 and small.size[0] / small.size[1] == pytest.approx(4 / 3, rel=0.02)
    assert np.abs(np.asarray(small).astype(int) - [10, 200, 30]).max() < 8
    with pytest.raises(InputError, match=r"400x300 = 120,000 pixels, above the decode limit of 40,000"):
        load_image(png, max_decode_pixels=40_000)
    assert load_image(png).size == (400, 300)


def test_pil_decompression_bomb_is_an_input_error():
    with pytest.raises(InputError, match="too large|above the decode limit"):
        load_image(png_header_only(200_000, 200_000))


def test_video_file_frames_are_sampled_uniformly(mp4_path):
    frames = load_video(mp4_path, num_frames=8)
    expected = uniform_indices(20, 8)
    assert expected == [int(round(x)) for x in np.linspace(0, 19, 8)]
    levels = [int(np.asarray(f).mean().round()) for f in frames]
    assert len(frames) == 8
    assert all(abs(level - 10 * i) <= 3 for level, i in zip(levels, expected)), levels


def test_video_clip_selects_time_range(mp4_path):
    # 10 fps: 0.5 s .. 1.0 s is frames 5..10
    frames = load_video(mp4_path, num_frames=4, start=0.5, end=1.0)
    levels = [int(np.asarray(f).mean().round()) for f in frames]
    expected = [5 + i for i in uniform_indices(6, 4)]
    assert all(abs(level - 10 * i) <= 3 for level, i in zip(levels, expected)), levels
    with pytest.raises(InputError, match="holds no frames"):
        load_video(mp4_path, start=5.0, end=6.0)


def test_frame_lists_and_arrays(mp4_path):
    arr = np.stack([np.full((30, 40, 3), i, dtype=np.uint8) for i in range(16)])
    frames = load_video(arr, num_frames=8)
    assert [int(np.asarray(f)[0, 0, 0]) for f in frames] == uniform_indices(16, 8)
    short = load_video([Image.new("RGB", (30, 30))] * 3, num_frames=8)
    assert len(short) == 3  # never invents frames
    with pytest.raises(InputError, match="frame 1"):
        load_video([Image.new("RGB", (30, 30)), b"bad"], num_frames=8)
    with pytest.raises(InputError, match="shape"):
        load_video(np.zeros((4, 10, 10)), num_frames=8)


def test_video_item_encodes_the_same_as_its_frames(encoder, mp4_path):
    frames = load_video(mp4_path)
    a, b = encoder.encode([Item(video=mp4_path), Item(video=frames)], mode="disc")
    np.testing.assert_allclose(a.disc, b.disc, atol=1e-6)


def test_long_text_is_truncated_with_a_warning(tiny_ckpt, caplog):
    import torch

    from ume_retriever import UMEEncoder

    enc = UMEEncoder.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    overhead = len(enc.prepare("x")) - 1
    limit = overhead + 20
    enc.preparer.max_input_tokens = limit
    text = " ".join(f"word{i}" for i in range(200))
    r = enc.encode(text)
    assert r.error is None and r.truncated and "truncated" in r.warnings[0]
    assert "truncated" in caplog.text
    p = enc.prepare(text)
    assert len(p) <= limit
    # the vector is the one of the truncated text itself
    tok = enc.processor.tokenizer
    kept = tok.decode(tok(text, add_special_tokens=False)["input_ids"][: len(p) - overhead])
    np.testing.assert_allclose(r.disc, enc.encode(kept).disc, atol=1e-5)
    assert not enc.encode("short").truncated


def test_media_that_alone_exceed_the_limit_fail_clearly(tiny_ckpt):
    import torch

    from ume_retriever import UMEEncoder

    enc = UMEEncoder.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, max_input_tokens=30)
    r = enc.encode(Item(text="some words here", image=Image.new("RGB", (100, 100))))
    assert r.error is not None and "max_input_tokens=30" in str(r.error)


def test_as_item_coercion(tmp_path):
    assert as_item("text").text == "text"
    assert as_item(tmp_path / "a.png").image == tmp_path / "a.png"
    assert as_item(tmp_path / "a.MP4").video == tmp_path / "a.MP4"
    assert as_item(b"\x89PNG").image == b"\x89PNG"
    assert as_item({"text": "t", "instruction": "i"}).instruction == "i"
    with pytest.raises(InputError, match="not an Item"):
        as_item({"txt": "t"})
    img = Image.new("RGB", (2, 2))
    assert as_item(img).image is img


def test_malformed_items_fail_alone(encoder, tmp_path):
    good = tmp_path / "g.png"
    Image.new("RGB", (64, 64), "green").save(good)
    broken = tmp_path / "broken.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(broken, quality=90)  # noisy: the scan data is most of the file
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) * 2 // 3])
    unloaded = Image.open(broken)  # a user's lazily opened, truncated image
    inputs = [{"text": 5}, {"images": Image.new("RGB", (8, 8))}, Item(image=unloaded), "fine", Item(image=good)]
    res = encoder.encode(inputs)
    assert "text must be a str" in str(res[0].error)
    assert "images must be a list" in str(res[1].error)
    assert "truncated or corrupt" in str(res[2].error)
    assert res[3].error is None and res[4].error is None
    with pytest.raises(InputError, match="video FILE"):
        Item(video=[Image.new("RGB", (8, 8))], video_start=1.0)


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
    assert load_image(half).getpixel((0, 0)) == (0, 0, 0)


def test_a_failing_batch_is_retried_input_by_input(encoder):
    run = encoder.backend.run

    def flaky(batch, *a):
        if any("boom" in p.prompt for p in batch):
            raise RuntimeError("simulated device failure")
        return run(batch, *a)

    encoder.backend.run = flaky
    try:
        res = encoder.encode(["ok one", "boom", "ok two"], batch_size=3)
    finally:
        del encoder.backend.run
    assert res[1].error is not None and "simulated device failure" in str(res[1].error)
    for i in (0, 2):
        np.testing.assert_allclose(res[i].disc, encoder.encode(["ok one", "boom", "ok two"][i]).disc, atol=1e-5)
