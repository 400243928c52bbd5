"""Gen vectors equal a teacher-forced pass read at the generated <gen_emb>."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import ScriptedDecoding, cosine, reference_disc, reference_state_after
from ume_retriever import GenOutcome, Item


def _ids(encoder, text: str) -> list[int]:
    return encoder.processor.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture()
def scripted(encoder):
    """Texts, and the completion each is forced to produce (by prompt length)."""
    gen, end = encoder.token_ids.gen, encoder.token_ids.eos[0]
    texts = ["red", "a blue square", "three green circles on the left", "no summary here at all"]
    completions = [
        _ids(encoder, "<think>red</think><answer> red ") + [gen, end],
        _ids(encoder, "<think>a square that is blue</think><answer> blue square ") + [gen, end],
        _ids(encoder, "<think>x</think><answer> circles ") + [gen, end],
        _ids(encoder, "<think>it goes on and on and on and on"),  # never emits <gen_emb>
    ]
    lengths = [len(encoder.prepare(t)) for t in texts]
    assert len(set(lengths)) == len(lengths)
    return texts, completions, dict(zip(lengths, completions))


def _run(encoder, texts, scripts, **kw):
    proc = ScriptedDecoding(scripts, encoder.token_ids.pad, encoder.token_ids.eos[0])
    return encoder.encode(texts, generation_kwargs={"logits_processor": [proc]}, **kw)


def test_gen_equals_teacher_forced_pass(encoder, scripted):
    texts, completions, scripts = scripted
    max_new = 40
    res = _run(encoder, texts, scripts, mode="gen", max_new_tokens=max_new, batch_size=4)
    gen = encoder.token_ids.gen
    for text, completion, r in zip(texts[:3], completions[:3], res[:3]):
        assert r.gen_outcome is GenOutcome.OK and not r.warnings
        upto = completion[: completion.index(gen) + 1]
        ref = reference_state_after(encoder, upto, text)
        assert cosine(r.gen, ref) > 0.9999
        np.testing.assert_allclose(r.gen, ref, atol=1e-5)
        assert r.reasoning == encoder.processor.tokenizer.decode(completion[:-1], skip_special_tokens=False)
        assert r.samples[0].num_tokens == len(completion)
    # No <gen_emb>: flagged, and the vector is the last generated step's state (the reference's
    # fallback): the state of the second-to-last token, which produced the last one.
    last = res[3]
    assert last.gen_outcome is GenOutcome.NO_GEN_EMB and last.samples[0].fallback
    assert "no <gen_emb>" in last.warnings[0]
    produced = (completions[3] + [encoder.token_ids.eos[0]])[:max_new]
    assert last.samples[0].num_tokens == len(produced)
    ref = reference_state_after(encoder, produced[:-1], texts[3])
    assert cosine(last.gen, ref) > 0.9999


def test_gen_emb_as_final_token_is_read_by_a_forward_pass(encoder):
    """Generation cut right after <gen_emb> (max_new_tokens): its state never came from decoding."""
    completion = _ids(encoder, "<think>a</think><answer> b ") + [encoder.token_ids.gen]
    text = "cut short"
    scripts = {len(encoder.prepare(text)): completion}
    r = _run(encoder, [text], scripts, mode="gen", max_new_tokens=len(completion))[0]
    assert r.gen_outcome is GenOutcome.OK
    ref = reference_state_after(encoder, completion, text)
    np.testing.assert_allclose(r.gen, ref, atol=1e-5)


def test_gen_batched_equals_one_by_one(encoder, scripted):
    texts, _, scripts = scripted
    batched = _run(encoder, texts, scripts, mode="gen", max_new_tokens=30, batch_size=4)
    for text, b in zip(texts, batched):
        alone = _run(encoder, [text], scripts, mode="gen", max_new_tokens=30)[0]
        assert alone.reasoning == b.reasoning
        np.testing.assert_allclose(b.gen, alone.gen, atol=1e-5)


def test_both_mode_matches_separate_modes(encoder, scripted):
    texts, _, scripts = scripted
    both = _run(encoder, texts, scripts, mode="both", max_new_tokens=30)
    gen_only = _run(encoder, texts, scripts, mode="gen", max_new_tokens=30)
    for text, b, g in zip(texts, both, gen_only):
        np.testing.assert_allclose(b.disc, reference_disc(encoder, text), atol=1e-5)
        np.testing.assert_allclose(b.gen, g.gen, atol=1e-6)
        assert g.disc is None


def test_greedy_generation_without_forcing(encoder):
    """The real model's own greedy decoding: state read where the recorder says, fallback flagged."""
    r = encoder.encode(Item(text="a photo"), mode="gen", max_new_tokens=6)
    assert 1 <= r.samples[0].num_tokens <= 6
    assert (r.gen_outcome is GenOutcome.OK) == ("<gen_emb>" in r.reasoning)
    assert abs(np.linalg.norm(r.gen) - 1) < 1e-5
    again = encoder.encode(Item(text="a photo"), mode="gen", max_new_tokens=6)
    assert again.reasoning == r.reasoning
    np.testing.assert_allclose(again.gen, r.gen, atol=1e-6)


def test_sampling_k_chains(encoder):
    r = encoder.encode("a red circle", mode="gen", num_samples=4, seed=7, max_new_tokens=8, temperature=1.0)
    assert len(r.samples) == 4
    assert len({s.reasoning for s in r.samples}) > 1  # temperature 1 on a random model: chains differ
    for s in r.samples:
        assert abs(np.linalg.norm(s.vector) - 1) < 1e-5
    np.testing.assert_array_equal(r.gen, r.samples[0].vector)
    same = encoder.encode("a red circle", mode="gen", num_samples=4, seed=7, max_new_tokens=8)
    assert [s.reasoning for s in same.samples] == [s.reasoning for s in r.samples]
    other = encoder.encode("a red circle", mode="gen", num_samples=4, seed=8, max_new_tokens=8)
    assert [s.reasoning for s in other.samples] != [s.reasoning for s in r.samples]


def test_sampled_chains_match_teacher_forcing_on_their_own_tokens(encoder):
    """Batch of 3 inputs x 3 samples, disc too: every chain's state is the teacher-forced one
    over the very tokens it generated (no re-tokenisation), whatever path it took."""
    import torch

    from ume_retriever.model.backends import SamplingParams

    texts = ["a green star", "two blue squares side by side", "x"]
    batch = [encoder.prepare(t) for t in texts]
    sampling = SamplingParams(max_new_tokens=6, num_samples=3, do_sample=True, seed=3)
    with torch.inference_mode():
        out = encoder.backend.run(batch, True, sampling)
    for text, disc, samples in zip(texts, out.disc, out.gen):
        assert cosine(disc, reference_disc(encoder, text)) > 0.9999
        for s in samples:
            ended = len(s.token_ids) == s.num_tokens - 1  # stopped on an end-of-turn token
            if s.found_gen_emb:
                upto = s.token_ids[: s.token_ids.index(encoder.token_ids.gen) + 1]
            else:  # the state that produced the last generated token
                upto = s.token_ids if ended else s.token_ids[:-1]
            assert cosine(s.state, reference_state_after(encoder, upto, text)) > 0.9999
