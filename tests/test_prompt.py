"""The prompt the encoder builds is exactly the UME-R1 one."""

from __future__ import annotations

from PIL import Image

from helpers import hand_prompt
from ume_retriever import Item
from ume_retriever.model.prompt import is_well_formed


def test_text_only_prompt_gets_blank_image(encoder):
    p = encoder.prepare(Item(text="a red circle", instruction="Find it: "))
    assert p.prompt == hand_prompt("a red circle", "Find it: ", num_images=1)
    assert len(p.images) == 1 and p.images[0].size == (28, 28)
    assert p.images[0].getextrema() == ((255, 255), (255, 255), (255, 255))


def test_blank_image_is_switchable(tiny_ckpt):
    import torch

    from ume_retriever import UMEEncoder

    enc = UMEEncoder.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, blank_image_for_text=False)
    p = enc.prepare("hello")
    assert p.prompt == hand_prompt("hello") and not p.images and "pixel_values" not in p.vision


def test_media_come_before_text(encoder, mp4_path):
    img = Image.new("RGB", (40, 40), "blue")
    assert encoder.prepare(Item(text="t", images=[img, img])).prompt == hand_prompt("t", num_images=2)
    assert encoder.prepare(Item(text="t", video=mp4_path)).prompt == hand_prompt("t", num_videos=1)


def test_disc_position_is_the_disc_token(encoder):
    p = encoder.prepare("some text")
    assert p.input_ids[p.disc_position] == encoder.token_ids.disc
    assert (p.input_ids == encoder.token_ids.disc).sum() == 1


def test_format_check_follows_the_reference_regex():
    assert is_well_formed("<think>a\nb</think><answer> cat <gen_emb>")
    assert is_well_formed("junk <think></think> x <answer>y\n<gen_emb><|im_end|>")
    assert not is_well_formed("<think>a</think> cat <gen_emb>")  # no <answer>
    assert not is_well_formed("<answer>x</answer><think>a</think><gen_emb>")  # order matters
    assert not is_well_formed("<think>a</think><answer> cat")
