"""The parts of ``ume serve`` that need no Ray: request batching over a real encoder, the
config's security rules, image and vector wire formats, the CLI's key naming."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from helpers import CountingEncoder, cosine
from ume_retriever import Item
from ume_retriever.cli import main
from ume_retriever.serve.batching import EncodeCall, encode_calls, make_call
from ume_retriever.serve.config import ServeConfig
from ume_retriever.serve.wire import APIError, ImageLimits, decode_image, vector_json


def png(size=(32, 24), colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_encode_calls_group_like_requests_and_match_separate_encodes(encoder):
    counting = CountingEncoder(encoder)
    broken = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
    calls = [EncodeCall([Item(text="a red circle"), Item(text="two blue squares")], "disc"),
             EncodeCall([Item(image=png())], "disc"),
             EncodeCall([Item(text="stars"), Item(image=broken)], "disc"),
             make_call([Item(text="a red circle")], "gen", {"max_new_tokens": 4, "batch_size": 99})]
    replies = encode_calls(counting, calls)
    assert counting.calls == 2  # the three disc calls share one encode; gen is its own
    assert calls[3].options == {"max_new_tokens": 4}  # the replica's own settings are not taken from callers
    for call, reply in zip(calls, replies):
        want = encoder.encode(call.items, mode=call.mode, **call.options)
        assert [r.index for r in reply.results] == list(range(len(call.items)))
        for got, w in zip(reply.results, want):
            assert (got.error is None) == (w.error is None)
            if w.error is None:
                vector = got.disc if call.mode == "disc" else got.gen
                assert cosine(vector, w.disc if call.mode == "disc" else w.gen) >= 0.9999
    assert replies[2].results[1].error is not None and replies[2].results[0].error is None
    tok = encoder.processor.tokenizer
    assert replies[0].prompt_tokens == sum(len(tok(t, add_special_tokens=False).input_ids)
                                           for t in ("a red circle", "two blue squares"))


def test_config_refuses_an_open_address_without_a_key():
    with pytest.raises(ValueError, match="--api-key.*--insecure"):
        ServeConfig(model="m", host="0.0.0.0")
    assert ServeConfig(model="m", host="0.0.0.0", insecure=True).insecure
    assert ServeConfig(model="m", host="0.0.0.0", api_key="k" * 16).api_key
    assert ServeConfig(model="m", host="::1").host == "::1"  # loopback needs no key
    with pytest.raises(ValueError, match="at least 8"):
        ServeConfig(model="m", api_key="short")
    with pytest.raises(ValueError, match="single-process"):
        ServeConfig(model="m", search_replicas=2)
    assert ServeConfig(model="m", store=None, url="http://q:6333", search_replicas=2).search_replicas == 2
    with pytest.raises(ValueError, match="not a folder"):
        ServeConfig(model="m", allow_roots=["/no/such/dir"])


def test_decode_image_caps_and_errors():
    data = png((40, 30))
    limits = ImageLimits(max_bytes=10_000, max_pixels=2_000)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert decode_image(url, "image", limits) == data
    assert decode_image(base64.b64encode(data).decode(), "image", limits) == data  # bare base64
    cases = [(png((60, 60)), 413, "pixels"), (b"not an image at all", 400, "not an image")]
    for raw, status, words in cases:
        with pytest.raises(APIError, match=words) as err:
            decode_image(base64.b64encode(raw).decode(), "input[3].image", limits)
        assert err.value.status == status and "input[3].image" in err.value.message
    with pytest.raises(APIError) as err:
        decode_image("A" * 20_000, "image", limits)
    assert err.value.status == 413
    for bad in ("data:image/png;base64,@@@", "https://example.com/x.png"):
        with pytest.raises(APIError) as err:
            decode_image(bad, "image", limits)
        assert err.value.status == 400


def test_vectors_travel_as_openai_sends_them():
    v = np.random.default_rng(0).standard_normal(37).astype(np.float32)
    decoded = np.frombuffer(base64.b64decode(vector_json(v, "base64")), dtype="<f4")
    np.testing.assert_array_equal(decoded, v)
    assert vector_json(v, "float") == [float(x) for x in v]


def test_cli_names_each_key_for_what_it_opens(capsys, tmp_path):
    assert main(["index", str(tmp_path), "--api-key", "secret-key-1"]) == 1
    assert "--qdrant-api-key" in capsys.readouterr().err
    assert main(["serve", "--store", str(tmp_path / "s"), "--host", "0.0.0.0", "--model", "m"]) == 1
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without an API key" in err and "UME_API_KEY" in err
