"""The reasoning-generalisation task and the recipe's perception options (issue 21): data splits,
clue resolution, answer parsing, rendered positions, visual token counts, the vision tower's
sizes, and the scripted-reasoning evaluation against a plain teacher-forced forward pass."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from PIL import Image

from ume_train.data.reasoning_task import (
    BASE, HELDOUT_WORDINGS, OTHER, RELATIONS, SPLITS, TRAIN_WORDINGS, Chain, all_chains, answer_attributes,
    direct_query, inference_query, make_reasoning_task, routes_avoiding, split_chains, split_combinations, target_reasoning,
)


def _pairs(scene):
    return {("sc", scene.shape, scene.colour), ("sw", scene.shape, scene.where), ("cw", scene.colour, scene.where)}


@pytest.mark.parametrize("vocab", [BASE, OTHER], ids=lambda v: v.name)
def test_heldout_combinations_keep_every_pair_seen(vocab):
    seen, heldout = split_combinations(vocab, 0.2, seed=4)
    total = len(vocab.shapes) * len(vocab.colours) * len(vocab.positions)
    assert len(seen) + len(heldout) == total and len(heldout) == round(total * 0.2)
    assert not set(seen) & set(heldout)
    seen_pairs = set().union(*(_pairs(s) for s in seen))
    every_pair = set().union(*(_pairs(s) for s in vocab.scenes()))
    assert seen_pairs == every_pair  # only the triple is new: composition is learnable


def test_vocabularies_share_no_value():
    for a, b in ((BASE.shapes, OTHER.shapes), (BASE.colours, OTHER.colours), (BASE.positions, OTHER.positions)):
        assert not set(a) & set(b)


@pytest.mark.parametrize("vocab", [BASE, OTHER], ids=lambda v: v.name)
def test_inference_queries_resolve_to_the_label(vocab):
    rng = random.Random(0)
    clue_to_value = {c: v for table in (vocab.shapes, vocab.colours) for v, clues in table.items() for c in clues}
    for scene in vocab.scenes():
        text, reasoning = inference_query(vocab, scene, rng)
        assert answer_attributes(reasoning, vocab) == {"shape": scene.shape, "colour": scene.colour,
                                                       "where": scene.where}
        named = [c for c in clue_to_value if c in text.lower()]
        assert all(clue_to_value[c] in (scene.shape, scene.colour) for c in named)
        assert text.lower() != direct_query(vocab, scene, TRAIN_WORDINGS[0])[0].lower()
    # at least one attribute is always named through a clue
    for scene in vocab.scenes()[:20]:
        text, _ = inference_query(vocab, scene, rng)
        plain = {scene.shape in text.split(), scene.colour in text.split(), vocab.place[scene.where] in text.lower()}
        assert False in plain


def _grid_step(vocab, relation, position):
    """The relations on the 3x3 grid, computed from coordinates: opposite mirrors through the
    centre; clockwise turns a quarter round it (screen coordinates, y down)."""
    col, row = vocab.positions[position]
    x, y = col - 1, row - 1
    x, y = {"opposite": (-x, -y), "clockwise": (-y, x), "anticlockwise": (y, -x)}[relation]
    return next(p for p, (c, r) in vocab.positions.items() if (c - 1, r - 1) == (x, y))


def _route_positions(words: list[str], relations: tuple[str, ...]) -> list[tuple[int, str]]:
    """(index to search from, relation) for each relation of a route phrase, in order."""
    out, at = [], words.index("reached")
    for r in relations:
        out.append((at, r))
        at = words.index(r, at) + 1
    return out


@pytest.mark.parametrize("vocab", [BASE, OTHER], ids=lambda v: v.name)
def test_chains_follow_the_grid_and_hold_compositions_out(vocab):
    for chain in all_chains(vocab, 2):
        pos = chain.start
        for relation in chain.relations:
            pos = _grid_step(vocab, relation, pos)
        assert chain.result(vocab) == pos
        assert len(chain.steps(vocab)) == 2 and chain.steps(vocab)[-1].endswith(f"is the {pos}.")
    assert Chain(("opposite", "clockwise"), "top left").phrase(BASE) == \
        "the corner reached from the top left going opposite, then clockwise"
    # each step starts where the previous one ended, with the next relation the route names,
    # after the same connector word as in the query
    assert Chain(("opposite", "clockwise"), "top left").steps(BASE) == [
        "From the top left going opposite is the bottom right.", "From the bottom right, then clockwise is the bottom left."]
    for chain in all_chains(vocab, 2) + all_chains(vocab, 3):
        query = chain.phrase(vocab).replace(",", "").split()
        before_in_query = [query[query.index(r, at) - 1] for at, r in _route_positions(query, chain.relations)]
        steps = [step.replace(",", "").split() for step in chain.steps(vocab)]
        before_in_steps = [words[words.index(r) - 1] for words, r in zip(steps, chain.relations)]
        assert before_in_query == before_in_steps == ["going", "then", "finally"][:len(chain.relations)]
    assert Chain(("opposite", "clockwise"), "top left").result(BASE) == "bottom left"
    seen, heldout = split_chains(vocab, 1 / 3, seed=0)
    assert len(seen) + len(heldout) == len(RELATIONS) ** 2 * 4 and not set(seen) & set(heldout)
    assert {c.relations for c in seen} == {c.relations for c in all_chains(vocab, 2)}  # every pair of hops seen
    reachable = {c.result(vocab) for c in all_chains(vocab, 2)}
    assert {c.result(vocab) for c in heldout} == reachable


@pytest.mark.parametrize("vocab", [BASE, OTHER], ids=lambda v: v.name)
def test_three_hop_routes_contain_no_heldout_chain(vocab):
    _, heldout = split_chains(vocab, 1 / 3, seed=0)
    held = {(c.relations, c.start) for c in heldout}
    starts = {c.start for c in all_chains(vocab, 1)}
    expected = set()
    for rels in itertools.product(RELATIONS, repeat=3):
        for start in starts:  # walk the grid; a route is clean when neither two-hop part is held out
            first = _grid_step(vocab, rels[0], start)
            if first and ((rels[0], rels[1]), start) not in held and ((rels[1], rels[2]), first) not in held:
                expected.add((rels, start))
    got = routes_avoiding(vocab, 3, heldout)
    assert {(c.relations, c.start) for c in got} == expected and len(got) == len(expected) > 0


def test_training_on_three_hop_routes_keeps_heldout_chains_out(tmp_path):
    from ume_retriever.inputs.records import read_records

    task = make_reasoning_task(tmp_path, train_per_scene=8, inference_share=1.0, train_hops=3, seed=0)
    train = read_records(task.train).records
    texts = [r.query.text.lower() for r in train]
    assert sum(", finally " in t for t in texts) > 50  # three-hop routes are trained on
    for chain in task.heldout_chains:  # neither the phrase nor the two steps in a row
        steps = " ".join(chain.steps(BASE))
        assert not any(chain.phrase(BASE) in t for t in texts)
        assert not any(steps in r.query.reasoning for r in train)
    with pytest.raises(ValueError, match="train_hops"):
        make_reasoning_task(tmp_path / "x", train_per_scene=1, inference_hops=1, train_hops=3)


def test_training_wordings_vary_order_and_form_and_miss_the_heldout_frames():
    slots = ("{shape}", "{colour}", "{place}")
    assert len(set(TRAIN_WORDINGS)) == len(TRAIN_WORDINGS) > 1000
    orders = set()
    for w in TRAIN_WORDINGS:
        assert all(w.count(slot) == 1 for slot in slots), w
        orders.add(tuple(sorted(slots, key=w.index)))
    assert len(orders) == 6  # every order of the three attributes
    for frame in ("show me the picture whose", "coloured", "that sits", ";"):
        assert not any(frame in w for w in TRAIN_WORDINGS), frame
    assert not set(TRAIN_WORDINGS) & set(HELDOUT_WORDINGS)


def test_answer_parsing():
    assert answer_attributes("<think>x</think><answer> red circle top left <gen_emb>", BASE) == \
        {"shape": "circle", "colour": "red", "where": "top left"}
    assert answer_attributes("<answer> pink ring top <gen_emb>", OTHER) == {"shape": "ring", "colour": "pink",
                                                                             "where": "top"}
    # two values of one attribute, or none, name no value
    assert answer_attributes("<answer> red blue circle <gen_emb>", BASE) == {"shape": "circle", "colour": None,
                                                                              "where": None}
    assert answer_attributes("no answer here", BASE) == {"shape": None, "colour": None, "where": None}


def test_dataset_splits_and_pictures(tmp_path):
    from ume_retriever.inputs.records import read_records

    task = make_reasoning_task(tmp_path, vocabulary="other", train_per_scene=2, image_size=84, inference_share=0.5,
                               seed=2)
    train = read_records(task.train).records
    evals = read_records(task.eval).records
    heldout = {OTHER.summary(s) for s in task.heldout}
    assert {r.extra["scene"] for r in train}.isdisjoint(heldout)
    assert len(train) == 2 * len(task.seen)
    # an inference query's reasoning resolves each clue in its own sentence before the summary
    inference_share = np.mean([r.query.reasoning.count(".") > 1 for r in train])
    assert 0.3 < inference_share < 0.7
    counts = {s: sum(r.dataset == s for r in evals) for s in SPLITS}
    assert counts == {"seen": len(task.seen), "unseen": len(task.heldout), "wording": len(task.seen),
                      "inference": len(task.seen) + len(task.heldout)}
    assert all(r.extra["scene"] in heldout for r in evals if r.dataset == "unseen")
    # eval inference queries name the position through a composition never trained on
    held_phrases = {c.phrase(OTHER) for c in task.heldout_chains}
    train_text = " | ".join(r.query.text.lower() for r in train)
    for r in evals:
        if r.dataset == "inference" and r.extra["attributes"]["where"] != "centre":
            phrase = next(p for p in held_phrases if p in r.query.text.lower())
            assert phrase not in train_text
            assert answer_attributes(r.query.reasoning, OTHER)["where"] == r.extra["attributes"]["where"]
    assert any(p in train_text for c in all_chains(OTHER, 1) for p in [c.phrase(OTHER)])
    templates = [w.split("{")[0] for w in TRAIN_WORDINGS]
    for r in evals:
        if r.dataset == "wording":  # a wording never trained on
            assert not any(r.query.text.lower().startswith(t) and t for t in templates)
            assert any(w.split("{")[0].lower() in r.query.text.lower() for w in HELDOUT_WORDINGS)
        assert r.target.reasoning == target_reasoning(OTHER, next(s for s in task.seen + task.heldout
                                                                   if OTHER.summary(s) == r.extra["scene"]))
    # one pool picture per combination, shared by that combination's queries
    pool = {}
    for r in evals:
        pool.setdefault(r.extra["scene"], set()).add(r.target.images[0])
    assert len(pool) == len(task.seen) + len(task.heldout) and all(len(v) == 1 for v in pool.values())
    # the shape is drawn in its position's cell, in its colour
    from ume_train.data.synthetic import PALETTE

    for r in evals[:30]:
        pixels = np.asarray(Image.open(r.target.images[0]).convert("RGB")).astype(int)
        assert pixels.shape == (84, 84, 3)
        ink = np.abs(pixels - 255).sum(axis=2) > 60
        ys, xs = np.nonzero(ink)
        col, row = OTHER.positions[r.extra["attributes"]["where"]]
        assert int(xs.mean() // 28) == col and int(ys.mean() // 28) == row
        colour = pixels[ink].mean(axis=0)
        assert np.abs(colour - PALETTE[r.extra["attributes"]["colour"]]).max() < 45


def test_queries_per_render_pairs_each_render_with_independent_queries(tmp_path):
    from ume_retriever.inputs.records import read_records

    task = make_reasoning_task(tmp_path / "q", train_per_scene=2, queries_per_render=5, inference_share=0.5, seed=3)
    train = read_records(task.train).records
    assert len(train) == 2 * 5 * len(task.seen)
    by_image: dict[str, list] = {}
    for r in train:
        by_image.setdefault(r.target.images[0], []).append(r)
    assert len(by_image) == 2 * len(task.seen) and all(len(rs) == 5 for rs in by_image.values())
    for rs in by_image.values():  # one combination per render, each query its own draw
        assert len({r.extra["scene"] for r in rs}) == 1
        assert all(answer_attributes(r.query.reasoning, BASE) == r.extra["attributes"] for r in rs)
    distinct = np.mean([len({r.query.text for r in rs}) for rs in by_image.values()])
    assert distinct > 4  # not one query repeated
    one = read_records(make_reasoning_task(tmp_path / "one", train_per_scene=2, seed=3).train).records
    assert len(one) == 2 * len(task.seen)
    with pytest.raises(ValueError, match="queries_per_render"):
        make_reasoning_task(tmp_path / "bad", train_per_scene=1, queries_per_render=0)


@pytest.mark.parametrize("side,patch,depth,width", [(28, 14, 1, 64), (56, 14, 2, 96), (56, 28, 1, 64)])
def test_synthetic_task_spec_perception_budget(tmp_path, side, patch, depth, width):
    """The spec's image side, patch, tower depth and width reach the checkpoint and the
    processor: an image of any size becomes (side / (2 * patch))^2 merged visual tokens, each
    patch 3 x 2 x patch x patch values."""
    from ume_retriever.model.encoder import UMEEncoder
    from ume_retriever.model.tiny import build_tiny_checkpoint, synthetic_task_spec

    spec = synthetic_task_spec(side, vision_depth=depth, vision_width=width, patch_size=patch)
    tokens = (side // (2 * patch)) ** 2
    assert spec.visual_tokens_per_image == tokens
    ckpt = build_tiny_checkpoint(tmp_path / "m", spec=spec)
    enc = UMEEncoder.from_pretrained(str(ckpt), device="cpu")
    vision = enc.model.config.vision_config
    assert (vision.depth, vision.embed_dim, vision.num_heads, vision.patch_size) == (depth, width, width // 32, patch)
    assert len(enc.model.model.visual.blocks) == depth
    image_pad = enc.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for size in (112, 37):
        prepared = enc.prepare({"image": Image.new("RGB", (size, size), (200, 10, 10))})
        assert int((prepared.input_ids == image_pad).sum()) == tokens
        assert tuple(prepared.vision["pixel_values"].shape) == (4 * tokens, 3 * 2 * patch * patch)
    result = enc.encode({"image": Image.new("RGB", (112, 112))}, mode="both", max_new_tokens=4)
    assert result.disc.shape == result.gen.shape == (64,)
    with pytest.raises(ValueError, match="multiple of 28"):
        synthetic_task_spec(40)
    with pytest.raises(ValueError, match="multiple of 56"):
        synthetic_task_spec(28, patch_size=28)
    with pytest.raises(ValueError, match="multiple of 32"):
        synthetic_task_spec(28, vision_width=48)


def test_synthetic_task_tokenizer_spells_every_task_word_as_one_token(tmp_path):
    """Every word the reasoning task writes (both vocabularies, training and eval texts, both
    sides' reasoning) is one token of the synthetic-task checkpoint's tokenizer, so a route's
    relation can be copied as one token; the default tiny tokenizer spells them out."""
    import json
    import re

    from transformers import AutoTokenizer

    from ume_retriever.model.tiny import TinyModelSpec, build_tiny_checkpoint, synthetic_task_spec

    words = set()
    for name in ("base", "other"):
        task = make_reasoning_task(tmp_path / name, vocabulary=name, train_per_scene=4, image_size=28, seed=0)
        for path in (task.train, task.eval):
            for line in path.read_text().splitlines():
                r = json.loads(line)
                for text in (r["query"]["text"], r["query"]["reasoning"], r["target"]["reasoning"]):
                    words.update(re.findall(r"[A-Za-z]+", re.sub(r"<[^>]+>", " ", text)))  # not the tags
    assert {"anticlockwise", "clockwise", "opposite", "reached", "pizza", "hexagon"} <= words
    tok = AutoTokenizer.from_pretrained(build_tiny_checkpoint(tmp_path / "m", spec=synthetic_task_spec(28)))
    multi = sorted(w for w in words if len(tok(" " + w).input_ids) != 1)
    assert not multi, f"spelt in several tokens: {multi}"
    plain = AutoTokenizer.from_pretrained(build_tiny_checkpoint(tmp_path / "plain", spec=TinyModelSpec()))
    assert len(plain(" anticlockwise").input_ids) > 1


def test_synthetic_task_spec_language_model_size(tmp_path):
    """text_layers / text_width reach the checkpoint: that many decoder layers of that width,
    32-dim heads, and embeddings of that width."""
    from ume_retriever.model.encoder import UMEEncoder
    from ume_retriever.model.tiny import build_tiny_checkpoint, synthetic_task_spec

    spec = synthetic_task_spec(28, text_layers=3, text_width=96)
    enc = UMEEncoder.from_pretrained(str(build_tiny_checkpoint(tmp_path / "m", spec=spec)), device="cpu")
    text = enc.model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size) == (3, 96, 3, 384)
    assert len(enc.model.model.language_model.layers) == 3
    assert enc.model.model.language_model.layers[0].self_attn.q_proj.weight.shape == (96, 96)
    result = enc.encode({"image": Image.new("RGB", (112, 112))}, mode="both", max_new_tokens=4)
    assert result.disc.shape == result.gen.shape == (96,)
    with pytest.raises(ValueError, match="text_width must be a positive multiple of 32"):
        synthetic_task_spec(28, text_width=80)
    with pytest.raises(ValueError, match="text_layers"):
        synthetic_task_spec(28, text_layers=0)


def test_scripted_gold_reasoning_equals_teacher_forced_forward(tmp_path):
    """``scripted_gen`` forces the gold reasoning through generation; its gen vector equals the
    last-layer state at <gen_emb> of one plain forward pass over prompt + reasoning."""
    import torch

    from ume_retriever.model.encoder import UMEEncoder
    from ume_retriever.model.tiny import build_tiny_checkpoint, synthetic_task_spec
    from ume_train.reasoning_eval import scripted_gen

    enc = UMEEncoder.from_pretrained(str(build_tiny_checkpoint(tmp_path / "m", spec=synthetic_task_spec(56))),
                                     device="cpu")
    scene = BASE.scenes()[7]
    items = [{"image": Image.new("RGB", (112, 112), (0, 90, 200))}, {"text": "a red circle in the top left"}]
    golds = [target_reasoning(BASE, scene), direct_query(BASE, scene, TRAIN_WORDINGS[1])[1]]
    results = scripted_gen(enc, items, golds)
    tok = enc.processor.tokenizer
    gen_id = tok.convert_tokens_to_ids("<gen_emb>")
    for item, gold, res in zip(items, golds, results):
        assert res.reasoning.replace(" ", "") == gold.replace(" ", "")
        prepared = enc.prepare(item)
        ids = torch.tensor(tok(gold, add_special_tokens=False).input_ids)
        full = prepared.extended(ids)
        with torch.no_grad():  # one forward over prompt + gold: the state at its last token, <gen_emb>
            state = enc.backend.last_layer_at_end([full], stop_after_disc=False)[0]
        expected = torch.nn.functional.normalize(state.float(), dim=-1).numpy()
        assert int(ids[-1]) == gen_id
        np.testing.assert_allclose(res.gen, expected, atol=1e-4)


def test_combinations_are_exhaustive():
    assert len(list(itertools.product(BASE.shapes, BASE.colours, BASE.positions))) == len(BASE.scenes()) == 120
    assert len(OTHER.scenes()) == 150


def test_command_lines_write_the_task_and_the_spec(tmp_path, capsys):
    import json

    from ume_retriever.model import tiny
    from ume_train.cli import main as train_main

    assert train_main(["reasoning-task", str(tmp_path / "task"), "--train-per-scene", "1", "--vocabulary", "other",
                       "--inference-hops", "1", "--queries-per-render", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "task" / "train.jsonl").read_text().splitlines()]
    # 120 seen combinations x 1 render x 2 queries, each render named by both of its queries
    assert len(rows) == 240 and all(r["attributes"]["shape"] in OTHER.shapes for r in rows)
    assert len({r["target"]["image"] for r in rows}) == 120
    assert "train.jsonl" in capsys.readouterr().out
    tiny.main([str(tmp_path / "m"), "--synthetic-task", "--image-pixels", "56", "--vision-depth", "2",
               "--vision-width", "96"])
    written = json.loads((tmp_path / "m" / "ume_tiny_spec.json").read_text())
    assert (written["min_pixels"], written["max_pixels"], written["vision_depth"], written["vision_embed_dim"]) == \
        (56 * 56, 56 * 56, 2, 96)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["vision_config"]["depth"] == 2 and config["vision_config"]["embed_dim"] == 96
    with pytest.raises(SystemExit):
        tiny.main([str(tmp_path / "n"), "--image-pixels", "56"])  # only with --synthetic-task
