"""A shape-scene retrieval task that tests whether reasoning generalises, with held-out splits.

Each picture shows one shape of one colour at one position. The three attributes vary
independently; a share of the combinations is held out of training such that every value and
every PAIR of values of two attributes is still seen in training (only the triple is new), so
composing attributes is learnable and memorising combinations is not enough. Queries either
name the attributes (in a training wording or in a wording never trained on) or name them only
through inference ("the shape with three corners", "the corner reached from the top left
going opposite, then clockwise"); the query reasoning spells every step out and both sides answer with the same
canonical summary ("green triangle bottom right"), which the gen vector follows.

Evaluation queries, one per combination and kind, against a pool of one fresh picture per
combination (``dataset`` names the split):

- ``seen`` / ``unseen``: direct queries in a training wording, on seen / held-out combinations;
- ``wording``: direct queries in a wording never trained on (seen combinations);
- ``inference``: inference queries (all combinations; ``extra["seen"]`` says which) whose
  position is named through a two-hop chain of relations held out of training (each hop, and
  each pair of relations in other chains, is trained on: only the composition is new).

Two vocabularies share no value: ``base`` (the shapes, colours and quadrants of
``ume_train.data.synthetic``) and ``other`` (other shapes, colours and five positions).

    ume-train reasoning-task ./task --vocabulary other
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .synthetic import Scene, draw_scene

logger = logging.getLogger(__name__)

SPLITS = ("seen", "unseen", "wording", "inference")
ATTRIBUTES = ("shape", "colour", "where")
INSTRUCTION = "Find the matching image: "


@dataclass(frozen=True)
class Vocabulary:
    """Attribute values with the clues that name each one through a step of inference.

    ``positions`` maps a position to its place on a 3x3 grid (column, row in 0..2);
    ``opposite`` / ``clockwise`` give the position the inference clues start from.
    """

    name: str
    shapes: dict[str, tuple[str, ...]]
    colours: dict[str, tuple[str, ...]]
    positions: dict[str, tuple[int, int]]
    place: dict[str, str]  # position -> how a sentence says it ("in the top left", "on the left")
    opposite: dict[str, str]
    clockwise: dict[str, str]  # position -> the position one step clockwise from it
    area: str  # what a position is called in a clue: "corner", "side"

    def scenes(self) -> list[Scene]:
        return [Scene(s, c, w) for s, c, w in itertools.product(self.shapes, self.colours, self.positions)]

    def summary(self, scene: Scene) -> str:
        return f"{scene.colour} {scene.shape} {scene.where}"


BASE = Vocabulary(
    name="base",
    shapes={"circle": ("the shape of a coin", "the round shape"),
            "square": ("the shape with four equal sides and four right angles", "the shape of a chessboard"),
            "triangle": ("the shape with three corners", "the shape of a slice of pizza"),
            "diamond": ("the shape of a kite", "a square standing on one corner"),
            "cross": ("the shape of a plus sign", "the shape on a first aid kit")},
    colours={"red": ("the colour of a ripe tomato", "the colour of a fire engine"),
             "green": ("the colour of fresh grass", "the colour of a frog"),
             "blue": ("the colour of a clear sky", "the colour of the deep sea"),
             "yellow": ("the colour of a ripe banana", "the colour of a lemon"),
             "purple": ("the colour of a plum", "the colour of lavender"),
             "orange": ("the colour of a pumpkin", "the colour of a carrot")},
    positions={"top left": (0, 0), "top right": (2, 0), "bottom left": (0, 2), "bottom right": (2, 2)},
    place={p: f"in the {p}" for p in ("top left", "top right", "bottom left", "bottom right")},
    opposite={"top left": "bottom right", "bottom right": "top left", "top right": "bottom left",
              "bottom left": "top right"},
    clockwise={"top left": "top right", "top right": "bottom right", "bottom right": "bottom left",
               "bottom left": "top left"},
    area="corner",
)

OTHER = Vocabulary(
    name="other",
    shapes={"star": ("the shape on a sheriff's badge", "the shape with five points"),
            "hexagon": ("the shape of a honeycomb cell", "the shape with six sides"),
            "ring": ("the shape of a doughnut", "a circle with a hole in it"),
            "bar": ("a long flat rectangle", "the shape of a plank"),
            "arrow": ("the shape that points the way", "the shape on a one way sign")},
    colours={"pink": ("the colour of a flamingo", "the colour of candy floss"),
             "brown": ("the colour of chocolate", "the colour of tree bark"),
             "cyan": ("the colour of a tropical lagoon", "a blue with a lot of green in it"),
             "black": ("the colour of coal", "the colour of the night sky"),
             "grey": ("the colour of a rain cloud", "the colour of an elephant"),
             "lime": ("the colour of a tennis ball", "a very bright yellowish green")},
    positions={"top": (1, 0), "bottom": (1, 2), "left": (0, 1), "right": (2, 1), "centre": (1, 1)},
    place={"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right",
           "centre": "in the centre"},
    opposite={"top": "bottom", "bottom": "top", "left": "right", "right": "left"},
    clockwise={"top": "right", "right": "bottom", "bottom": "left", "left": "top"},
    area="side",
)

VOCABULARIES = {v.name: v for v in (BASE, OTHER)}

# Direct wordings trained on, and wordings only the ``wording`` split uses.
def _wording_family() -> tuple[str, ...]:
    """Training wordings: every opener x order of the three attributes x form of each x joiner
    (2,880). Trained on 3 or 8 fixed templates, the tiny models copied the values out of
    held-out wordings wrongly more often than not; on these, less often (docs/reasoning.md).
    None of the words of HELDOUT_WORDINGS' frames
    ("show me the picture whose", "coloured", "that sits", ";") is used."""
    openers = ("", "find ", "a picture of ", "an image with ", "look for ", "which picture has ", "get me ",
               "search for ")
    shapes, colours, places = ("a {shape}", "the {shape}", "one {shape}"), \
        ("in {colour}", "{colour} in colour", "of colour {colour}"), ("{place}", "placed {place}")
    out = []
    for opener, joiner in itertools.product(openers, (" ", ", ", " and ")):
        for forms in itertools.product(shapes, colours, places):
            for order in itertools.permutations(forms):
                out.append(opener + joiner.join(order))
        for article, place in itertools.product(("a", "the", "one"), places):
            fused = f"{article} {{colour}} {{shape}}"
            out += [f"{opener}{fused}{joiner}{place}", f"{opener}{place}{joiner}{fused}"]
    return tuple(out)


TRAIN_WORDINGS = _wording_family()
HELDOUT_WORDINGS = ("show me the picture whose {shape} is {colour}, {place}",
                    "{colour}; {shape}; {place}",
                    "I am looking for one {shape} coloured {colour} that sits {place}")
INFERENCE_WORDINGS = ("find {shape}, {colour}, {place}", "{place}: {shape}, {colour}")


RELATIONS = ("opposite", "clockwise", "anticlockwise")
# The words before a route's first, second and third relation, the same in the query and in
# its reasoning's hop sentences, so a hop's relation is the word that follows its connector in
# the query. Measured (docs/reasoning.md): with them gen passes disc on held-out chains, yet
# the tiny model still often writes relations the query does not name.
CONNECTORS = ("going", "then", "finally")


def relate(vocab: Vocabulary, relation: str, position: str) -> str | None:
    """The position ``relation`` leads to from ``position`` (None where it leads nowhere)."""
    if relation == "opposite":
        return vocab.opposite.get(position)
    if relation == "clockwise":
        return vocab.clockwise.get(position)
    return {v: k for k, v in vocab.clockwise.items()}.get(position)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


@dataclass(frozen=True)
class Chain:
    """A position named as a route of relations from another one, read in order: ("opposite",
    "clockwise") from "top left" is "the corner reached from the top left going opposite, then
    clockwise" (the bottom left).

    The route is read in the order it is walked, so each reasoning step is one seen hop: its
    start is the previous step's result and its relation the next one the query names (a nested
    phrasing, "one corner clockwise from the corner opposite the top left", has to be resolved
    innermost first). Each relation follows its own connector word (``CONNECTORS``), in the
    query and in the step that applies it."""

    relations: tuple[str, ...]
    start: str

    def result(self, vocab: Vocabulary) -> str:
        pos = self.start
        for r in self.relations:
            pos = relate(vocab, r, pos)
        return pos

    def phrase(self, vocab: Vocabulary) -> str:
        route = ", ".join(f"{word} {r}" for word, r in zip(CONNECTORS, self.relations))
        return f"the {vocab.area} reached from the {self.start} {route}"

    def steps(self, vocab: Vocabulary) -> list[str]:
        """One reasoning sentence per relation, each resolving one hop and naming its relation
        after the same connector as the query: "From the top left going opposite is the bottom
        right.", "From the bottom right, then clockwise is the bottom left."."""
        out, pos = [], self.start
        for i, (word, r) in enumerate(zip(CONNECTORS, self.relations)):
            nxt = relate(vocab, r, pos)
            out.append(f"From the {pos}{',' if i else ''} {word} {r} is the {nxt}.")
            pos = nxt
        return out


def all_chains(vocab: Vocabulary, hops: int) -> list[Chain]:
    starts = [p for p in vocab.positions if all(relate(vocab, r, p) for r in RELATIONS)]
    return [Chain(rels, start) for rels in itertools.product(RELATIONS, repeat=hops) for start in starts]


def split_chains(vocab: Vocabulary, heldout_fraction: float, seed: int) -> tuple[list[Chain], list[Chain]]:
    """Seen and held-out two-hop chains: every pair of relations and every single hop stays seen
    (only the composition is new); every reachable position is the result of a held-out chain."""
    chains = all_chains(vocab, 2)
    rng = random.Random(seed + 1)
    by_result: dict[str, list[Chain]] = {}
    for c in chains:
        by_result.setdefault(c.result(vocab), []).append(c)
    pair_left = {rels: sum(c.relations == rels for c in chains) for rels in itertools.product(RELATIONS, repeat=2)}
    per_result = max(1, round(len(chains) * heldout_fraction / max(1, len(by_result))))
    heldout: list[Chain] = []
    for result in sorted(by_result):
        options = by_result[result][:]
        rng.shuffle(options)
        taken = 0
        for c in options:
            if taken == per_result:
                break
            if pair_left[c.relations] > 1:
                heldout.append(c)
                pair_left[c.relations] -= 1
                taken += 1
    held = set(heldout)
    return [c for c in chains if c not in held], heldout


def routes_avoiding(vocab: Vocabulary, hops: int, heldout: list[Chain]) -> list[Chain]:
    """Routes of ``hops`` relations none of whose two consecutive hops, from where the route is
    at, is a held-out chain: training on them never shows a held-out composition."""
    held, out = set(heldout), []
    for chain in all_chains(vocab, hops):
        pos, clean = chain.start, True
        for first, second in zip(chain.relations, chain.relations[1:]):
            if pos is None or Chain((first, second), pos) in held:
                clean = False
                break
            pos = relate(vocab, first, pos)
        if clean and chain.result(vocab) is not None:
            out.append(chain)
    return out


def direct_query(vocab: Vocabulary, scene: Scene, wording: str) -> tuple[str, str]:
    """Query text and its reasoning for a query that names every attribute."""
    text = wording.format(colour=scene.colour, shape=scene.shape, place=vocab.place[scene.where])
    return _cap(text), _reasoning(vocab, scene, [])


def inference_query(vocab: Vocabulary, scene: Scene, rng: random.Random,
                    chains: list[Chain] | None = None, always_where: bool = False) -> tuple[str, str]:
    """Query text naming at least one attribute only through a clue, and reasoning that resolves
    each clue (a position: each hop of its chain) before the canonical answer.

    A riddled position is named by one of ``chains`` that ends there (default: any single
    hop); ``always_where`` riddles the position whenever a chain reaches it."""
    if chains is None:
        chains = all_chains(vocab, 1)
    reaching = [c for c in chains if c.result(vocab) == scene.where]
    riddled = [a for a in ATTRIBUTES if (a == "where" and always_where) or rng.random() < 0.6]
    riddled = [a for a in riddled if a != "where" or reaching]
    if not riddled:
        riddled = [rng.choice([a for a in ATTRIBUTES if a != "where" or reaching])]
    steps, parts = [], {}
    if "shape" in riddled:
        clue = rng.choice(vocab.shapes[scene.shape])
        parts["shape"] = clue
        steps.append(f"{_cap(clue)} is a {scene.shape}.")
    else:
        parts["shape"] = f"a {scene.shape}"
    if "colour" in riddled:
        clue = rng.choice(vocab.colours[scene.colour])
        parts["colour"] = f"painted {clue}"
        steps.append(f"{_cap(clue)} is {scene.colour}.")
    else:
        parts["colour"] = f"coloured {scene.colour}"
    if "where" in riddled:
        chain = rng.choice(reaching)
        parts["place"] = f"in {chain.phrase(vocab)}"
        steps.extend(chain.steps(vocab))
    else:
        parts["place"] = vocab.place[scene.where]
    text = rng.choice(INFERENCE_WORDINGS).format(**parts)
    return _cap(text), _reasoning(vocab, scene, steps)


def _reasoning(vocab: Vocabulary, scene: Scene, steps: list[str]) -> str:
    said = " ".join(steps + [f"The query asks for an image of a {scene.colour} {scene.shape} {vocab.place[scene.where]}."])
    return f"<think>{said}</think><answer> {vocab.summary(scene)} <gen_emb>"


def target_reasoning(vocab: Vocabulary, scene: Scene) -> str:
    return (f"<think>The image shows a {scene.colour} {scene.shape} {vocab.place[scene.where]}.</think>"
            f"<answer> {vocab.summary(scene)} <gen_emb>")


def split_combinations(vocab: Vocabulary, heldout_fraction: float, seed: int) -> tuple[list[Scene], list[Scene]]:
    """Seen and held-out combinations: every pair of values of two attributes stays seen."""
    scenes = vocab.scenes()
    order = scenes[:]
    random.Random(seed).shuffle(order)
    want = round(len(scenes) * heldout_fraction)
    pairs = lambda s: {("shape", s.shape, "colour", s.colour), ("shape", s.shape, "where", s.where),  # noqa: E731
                       ("colour", s.colour, "where", s.where)}
    needed: dict[tuple, int] = {}
    for s in scenes:
        for p in pairs(s):
            needed[p] = needed.get(p, 0) + 1
    heldout: list[Scene] = []
    for scene in order:
        if len(heldout) == want:
            break
        if all(needed[p] > 1 for p in pairs(scene)):  # each of its pairs is in another seen combination
            heldout.append(scene)
            for p in pairs(scene):
                needed[p] -= 1
    held = set(heldout)
    return [s for s in scenes if s not in held], heldout


def render(vocab: Vocabulary, scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """The scene's picture: the shape around its grid cell's centre, jittered."""
    if vocab.name == "base":  # quadrants: the shape in the middle of its quarter, as in ume_train.data.synthetic
        return draw_scene(scene, size, rng)
    col, row = vocab.positions[scene.where]
    cell = size / 3
    centre = ((col + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell, (row + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell)
    return draw_scene(scene, size, rng, centre=centre, radius=cell * rng.uniform(0.35, 0.45))


@dataclass
class ReasoningTask:
    root: Path
    train: Path  # train.jsonl: seen combinations only
    eval: Path  # eval.jsonl: every split, pool pictures shared between queries of the same scene
    vocabulary: Vocabulary
    seen: list[Scene]
    heldout: list[Scene]
    heldout_chains: list[Chain]  # the position chains the inference split uses


def make_reasoning_task(
    root: str | Path,
    *,
    vocabulary: str | Vocabulary = "base",
    image_size: int = 112,
    train_per_scene: int = 64,
    queries_per_render: int = 1,
    inference_share: float = 0.5,
    heldout_fraction: float = 0.2,
    heldout_chain_fraction: float = 1 / 3,
    inference_hops: int = 2,
    train_hops: int = 2,
    seed: int = 0,
) -> ReasoningTask:
    """Write pictures, ``train.jsonl`` and ``eval.jsonl`` (our record format) under ``root``.

    Training queries are inference queries with probability ``inference_share``, else direct
    queries in a training wording; each of the ``train_per_scene`` renders of a seen
    combination is the target of ``queries_per_render`` queries drawn independently. With
    ``inference_hops=2`` (default) a riddled position is a single hop or a seen two-hop chain
    in training and a held-out two-hop chain in the ``inference`` split (always riddled
    there); ``train_hops=3`` adds to training the
    three-hop routes that contain no held-out chain. With ``inference_hops=1``, single hops
    only, the same in both. Every record carries ``scene`` (its combination), ``attributes``
    and ``seen``; eval records' ``dataset`` is their split.
    """
    vocab = VOCABULARIES[vocabulary] if isinstance(vocabulary, str) else vocabulary
    if not 0 <= inference_share <= 1:
        raise ValueError(f"inference_share must be in [0, 1], got {inference_share}")
    if queries_per_render < 1:
        raise ValueError(f"queries_per_render must be >= 1, got {queries_per_render}")
    root = Path(root)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen, heldout = split_combinations(vocab, heldout_fraction, seed)
    seen_set = set(seen)
    if train_hops not in (2, 3) or (train_hops == 3 and inference_hops != 2):
        raise ValueError(f"train_hops must be 2, or 3 with inference_hops=2; got train_hops={train_hops}, "
                         f"inference_hops={inference_hops}")
    if inference_hops == 2:
        seen_chains, heldout_chains = split_chains(vocab, heldout_chain_fraction, seed)
        train_chains = all_chains(vocab, 1) + seen_chains  # single hops and the seen compositions
        if train_hops == 3:
            train_chains += routes_avoiding(vocab, 3, heldout_chains)
    elif inference_hops == 1:  # single hops only, the same in training and evaluation
        train_chains = heldout_chains = all_chains(vocab, 1)
    else:
        raise ValueError(f"inference_hops must be 1 or 2, got {inference_hops}")

    def picture(scene: Scene, stem: str) -> str:
        path = media / f"{stem}.png"
        render(vocab, scene, image_size, rng).save(path)
        return str(path.relative_to(root))

    def record(scene: Scene, image: str, text: str, reasoning: str, dataset: str) -> dict[str, Any]:
        return {"query": {"text": text, "instruction": INSTRUCTION, "reasoning": reasoning},
                "target": {"image": image, "reasoning": target_reasoning(vocab, scene)},
                "dataset": dataset, "scene": vocab.summary(scene), "seen": scene in seen_set,
                "attributes": {"shape": scene.shape, "colour": scene.colour, "where": scene.where}}

    train = []
    for scene in seen:
        for i in range(train_per_scene):
            image = picture(scene, f"train-{vocab.summary(scene).replace(' ', '_')}-{i}")
            for _ in range(queries_per_render):
                if rng.random() < inference_share:
                    text, reasoning = inference_query(vocab, scene, rng, train_chains)
                else:
                    text, reasoning = direct_query(vocab, scene, rng.choice(TRAIN_WORDINGS))
                train.append(record(scene, image, text, reasoning, "train"))
    evals = []
    for scene in seen + heldout:
        image = picture(scene, f"pool-{vocab.summary(scene).replace(' ', '_')}")
        split = "seen" if scene in seen_set else "unseen"
        evals.append(record(scene, image, *direct_query(vocab, scene, rng.choice(TRAIN_WORDINGS)), split))
        if scene in seen_set:
            evals.append(record(scene, image, *direct_query(vocab, scene, rng.choice(HELDOUT_WORDINGS)), "wording"))
        evals.append(record(scene, image, *inference_query(vocab, scene, rng, heldout_chains, always_where=True),
                            "inference"))
    rng.shuffle(train)
    paths = {}
    for name, rows in (("train", train), ("eval", evals)):
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    logger.info("reasoning task (%s) in %s: %d train pairs over %d combinations, %d eval queries (%d held-out "
                "combinations)", vocab.name, root, len(train), len(seen), len(evals), len(heldout))
    return ReasoningTask(root, paths["train"], paths["eval"], vocab, seen, heldout, heldout_chains)


_ANSWER = re.compile(r"<answer>(.*?)(?:<gen_emb>|</answer>|$)", re.S)


def answer_attributes(reasoning: str, vocab: Vocabulary) -> dict[str, str | None]:
    """The attribute values a generated answer names (None where it names none or several)."""
    found = _ANSWER.search(reasoning or "")
    words = f" {found.group(1).strip()} " if found else ""
    out: dict[str, str | None] = {}
    for attr, values in (("shape", vocab.shapes), ("colour", vocab.colours), ("where", vocab.positions)):
        # Longest first, each match blanked, so "top" is not also found inside "top left".
        hits, rest = [], words
        for value in sorted(values, key=len, reverse=True):
            if f" {value} " in rest:
                hits.append(value)
                rest = rest.replace(f" {value} ", "  ")
        out[attr] = hits[0] if len(hits) == 1 else None
    return out
