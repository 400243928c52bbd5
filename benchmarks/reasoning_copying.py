"""Does a trained checkpoint's query reasoning follow the query, on fresh queries of the kind it
was trained on? For inference queries drawn anew from the training distribution of
``ume_train.data.reasoning_task`` (seen combinations, training wordings, seen chains), it
compares the greedy reasoning with the gold one sentence by sentence, and reports the
teacher-forced token accuracy of the gold reasoning.

    python benchmarks/reasoning_generalisation.py --seed 1 --keep /tmp/sft
    python benchmarks/reasoning_copying.py /tmp/sft --seed 1

Rates, over the fresh queries:
- ``reasoning exact``: the whole generated reasoning equals the gold one;
- ``clue sentences right``: of the gold sentences that resolve a shape or colour clue ("The
  colour of a frog is green."), the share the generated reasoning contains word for word;
- ``route starts right``: the generated route starts at the corner the query names;
- ``route sentences right``: of the gold sentences that walk the route, the share generated
  word for word;
- ``first / second relation right``: the relation the generated route names after "going"
  (its first hop) and after "then" (its second) is the query's;
- ``answer right``: the generated answer names all three attributes right;
- ``teacher-forced token accuracy``: the gold reasoning after the prompt, the share of its
  tokens that are the model's argmax given the gold tokens before them.
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ume_retriever.inputs.item import Item  # noqa: E402
from ume_retriever.model.encoder import UMEEncoder  # noqa: E402
from ume_train.data.reasoning_task import (INSTRUCTION, VOCABULARIES, answer_attributes, inference_query,  # noqa: E402
                                           make_reasoning_task, split_chains, split_combinations)

START = re.compile(r"[Ff]rom the ([a-z ]+?),? going")  # the corner the route starts from
SENTENCE = re.compile(r"[A-Z][^.]*\.")
RELATION = {"first": re.compile(r" going ([a-z]+) is "), "second": re.compile(r", then ([a-z]+) is ")}


def sentences(reasoning: str) -> tuple[list[str], list[str]]:
    """(clue sentences, route sentences) of a reasoning's think part, without its summary."""
    said = [s for s in SENTENCE.findall(reasoning.split("</think>")[0]) if not s.startswith("The query asks")]
    route = [s for s in said if s.startswith("From the") or " reached from the " in s]
    return [s for s in said if s not in route], route


def fresh_queries(seed: int, vocabulary: str, n: int) -> list[tuple[Item, str, dict]]:
    """``n`` inference queries whose position is named by a seen two-hop chain, on seen
    combinations: (item, gold reasoning, attributes). The split (combinations, chains) is the
    one training used for ``seed``; the queries come from a random stream of their own."""
    vocab = VOCABULARIES[vocabulary]
    defaults = {k: p.default for k, p in inspect.signature(make_reasoning_task).parameters.items()}
    seen, _ = split_combinations(vocab, defaults["heldout_fraction"], seed)
    seen_chains, _ = split_chains(vocab, defaults["heldout_chain_fraction"], seed)
    rng, out = random.Random(f"fresh-{seed}"), []
    while len(out) < n:
        scene = rng.choice(seen)
        text, reasoning = inference_query(vocab, scene, rng, seen_chains, always_where=True)
        out.append((Item(text=text, instruction=INSTRUCTION), reasoning,
                    {"shape": scene.shape, "colour": scene.colour, "where": scene.where}))
    return out


def teacher_forced_accuracy(encoder: UMEEncoder, records: list[tuple[Item, str, dict]]) -> float:
    tok, model = encoder.processor.tokenizer, encoder.model.eval()
    right = total = 0
    for item, reasoning, _ in records:
        prompt = encoder.prepare(item).input_ids.reshape(-1)
        gold = torch.tensor(tok(reasoning).input_ids)
        ids = torch.cat([prompt, gold])[None]
        with torch.no_grad():
            pred = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt) - 1:-1].argmax(-1)
        right += int((pred == gold).sum())
        total += len(gold)
    return right / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="the task seed the checkpoint was trained on")
    ap.add_argument("--vocabulary", default="base")
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--show", type=int, default=3, help="print this many queries with both reasonings")
    args = ap.parse_args()
    records = fresh_queries(args.seed, args.vocabulary, args.queries)
    encoder = UMEEncoder.from_pretrained(args.checkpoint, device="cpu")
    generated = [res.reasoning or "" for res in encoder.encode([item for item, _, _ in records], mode="gen")]
    counts = dict.fromkeys(("exact", "clue", "clue_n", "start", "hop", "hop_n", "answer", "first", "second"), 0)
    for (_, gold, attributes), got in zip(records, generated):
        counts["exact"] += got.strip() == gold.strip()
        clues, route = sentences(gold)
        counts["clue"] += sum(c in got for c in clues)
        counts["clue_n"] += len(clues)
        counts["hop"] += sum(h in got for h in route)
        counts["hop_n"] += len(route)
        first = START.search(got)
        counts["start"] += bool(first) and first.group(1) == START.search(gold).group(1)
        for hop, pattern in RELATION.items():
            said = pattern.search(got)
            counts[hop] += bool(said) and said.group(1) == pattern.search(gold).group(1)
        counts["answer"] += answer_attributes(got, VOCABULARIES[args.vocabulary]) == attributes
    n = len(records)
    print(f"{args.checkpoint}: {n} fresh inference queries through seen chains (seed {args.seed})")
    print(f"  reasoning exact            {counts['exact'] / n:.3f}")
    print(f"  clue sentences right       {counts['clue'] / max(1, counts['clue_n']):.3f} of {counts['clue_n']}")
    print(f"  route starts right         {counts['start'] / n:.3f}")
    print(f"  route sentences right      {counts['hop'] / counts['hop_n']:.3f} of {counts['hop_n']}")
    print(f"  first relation right       {counts['first'] / n:.3f}")
    print(f"  second relation right      {counts['second'] / n:.3f}")
    print(f"  answer right               {counts['answer'] / n:.3f}")
    print(f"  teacher-forced token acc.  {teacher_forced_accuracy(encoder, records):.3f}")
    for (item, gold, _), got in list(zip(records, generated))[:args.show]:
        print(f"\nquery: {item.text}\n  gold: {gold}\n  got:  {got}")


if __name__ == "__main__":
    main()
