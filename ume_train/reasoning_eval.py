"""Per-split retrieval and reasoning accuracy on the reasoning task (``ume_train.data.reasoning_task``).

Every query of the eval records is ranked against a pool of one picture per combination (the
records' targets, one per ``scene``). Per split: Hit@1 of disc, gen (real greedy generation),
RRF of the two (k=60, as Qdrant fuses) and the per-query oracle (the better of disc and gen),
and the share of generated answers that name the right value, per attribute and all three,
for the queries and for the pool pictures (seen vs held-out combinations). With
``gold=True`` the gen vectors are also made with the gold reasoning scripted into generation
(``generation_kwargs={"prefix_allowed_tokens_fn": ...}`` through the public encoder): what gen
would score if every answer were right, i.e. how much of the gap is wrong reasoning and how
much the embedding.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from ume_retriever.inputs.records import PairRecord

from .data.reasoning_task import ATTRIBUTES, SPLITS, Vocabulary, answer_attributes

RRF_K = 60


def scripted_gen(encoder: Any, items: Sequence[Any], completions: Sequence[str]) -> list[Any]:
    """Encode each item in gen mode with ``completions[i]`` forced as its reasoning (then the
    end of turn): one input per call, so the forcing function knows whose tokens it emits."""
    tok = encoder.processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    results = []
    for item, text in zip(items, completions):
        ids = tok(text, add_special_tokens=False).input_ids + [end]
        start: list[int] = []

        def allowed(batch_id: int, input_ids: Any, ids: list[int] = ids, start: list[int] = start) -> list[int]:
            if not start:
                start.append(input_ids.shape[-1])
            return [ids[min(input_ids.shape[-1] - start[0], len(ids) - 1)]]

        result = encoder.encode(item, mode="gen", max_new_tokens=len(ids) + 1,
                                generation_kwargs={"prefix_allowed_tokens_fn": allowed})
        result.raise_for_error()
        results.append(result)
    return results


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every candidate per row (ties by index)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    rows = np.arange(scores.shape[0])[:, None]
    ranks[rows, order] = np.arange(1, scores.shape[1] + 1)[None, :]
    return ranks


def _answer_accuracy(reasonings: Sequence[str], attributes: Sequence[dict[str, str]], vocab: Vocabulary,
                     prefix: str) -> dict[str, float]:
    right = {a: [] for a in ATTRIBUTES}
    for text, truth in zip(reasonings, attributes):
        named = answer_attributes(text, vocab)
        for a in ATTRIBUTES:
            right[a].append(named[a] == truth[a])
    out = {f"{prefix}_{a}": float(np.mean(v)) for a, v in right.items()}
    out[f"{prefix}_all"] = float(np.mean([all(t) for t in zip(*right.values())]))
    return out


def split_report(encoder: Any, records: list[PairRecord], vocab: Vocabulary, *, gold: bool = False,
                 batch_size: int = 32) -> dict[str, Any]:
    """Metrics per split (flat ``{split}_{metric}`` keys) plus ``"per_query"`` rows for the
    adaptive calibration (disc and RRF rankings, disc scores)."""
    pool: dict[str, int] = {}
    pool_records: list[PairRecord] = []
    for r in records:
        if r.extra["scene"] not in pool:
            pool[r.extra["scene"]] = len(pool_records)
            pool_records.append(r)
    positive = np.array([pool[r.extra["scene"]] for r in records])
    q_items = [r.query.to_item() for r in records]
    t_items = [r.target.to_item() for r in pool_records]
    queries = encoder.encode(q_items, mode="both", batch_size=batch_size)
    targets = encoder.encode(t_items, mode="both", batch_size=batch_size)
    for res in (*queries, *targets):
        res.raise_for_error()
    disc = np.stack([q.disc for q in queries]) @ np.stack([t.disc for t in targets]).T
    gen = np.stack([q.gen for q in queries]) @ np.stack([t.gen for t in targets]).T
    ranks = {"disc": _ranks(disc), "gen": _ranks(gen)}
    rrf = 1.0 / (RRF_K + ranks["disc"]) + 1.0 / (RRF_K + ranks["gen"])
    ranks["rrf"] = _ranks(rrf)
    rows = np.arange(len(records))
    hits = {m: ranks[m][rows, positive] == 1 for m in ranks}
    hits["oracle"] = hits["disc"] | hits["gen"]
    if gold:
        gold_q = scripted_gen(encoder, q_items, [r.query.reasoning for r in records])
        gold_t = scripted_gen(encoder, t_items, [r.target.reasoning for r in pool_records])
        gq, gt = np.stack([g.gen for g in gold_q]), np.stack([g.gen for g in gold_t])
        model_q = np.stack([q.gen for q in queries])
        hits["gen_gold"] = _ranks(gq @ gt.T)[rows, positive] == 1  # gold reasoning on both sides
        hits["gen_gold_images"] = _ranks(model_q @ gt.T)[rows, positive] == 1  # model queries, gold images

    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups["all"].append(i)
        groups[r.dataset].append(i)
        if r.dataset == "inference":
            groups["inference_seen" if r.extra["seen"] else "inference_unseen"].append(i)
    out: dict[str, Any] = {}
    for name in ("all", *SPLITS, "inference_seen", "inference_unseen"):
        idx = groups.get(name)
        if not idx:
            continue
        out[f"{name}_n"] = len(idx)
        for m, h in hits.items():
            out[f"{name}_{m}"] = float(h[idx].mean())
        out.update(_answer_accuracy([queries[i].reasoning for i in idx], [records[i].extra["attributes"] for i in idx],
                                    vocab, f"{name}_query_answer"))
    for seen in (True, False):
        idx = [j for j, r in enumerate(pool_records) if r.extra["seen"] == seen]
        if idx:
            out.update(_answer_accuracy([targets[j].reasoning for j in idx],
                                        [pool_records[j].extra["attributes"] for j in idx], vocab,
                                        f"image_answer_{'seen' if seen else 'unseen'}"))
    out["per_query"] = {
        "positive": positive.tolist(),
        "disc_ranking": np.argsort(ranks["disc"], axis=1)[:, :10].tolist(),
        "rrf_ranking": np.argsort(ranks["rrf"], axis=1)[:, :10].tolist(),
        "disc_scores": disc.tolist(),
        "dataset": [r.dataset for r in records],
    }
    return out


def adaptive_curve(per_query: dict[str, Any], points: int = 40) -> dict[str, Any]:
    """``ume_retriever.evaluation.calibrate`` on a report's per-query rows: the margin router
    with RRF when it reasons, dev = even queries, test = odd ones."""
    from ume_retriever.evaluation.calibrate import calibrate, disc_gap, disc_top1
    from ume_retriever.evaluation.metrics import score_ranking
    from ume_retriever.fusion import Fusion

    pos = per_query["positive"]
    disc = [score_ranking(r, {p}) for r, p in zip(per_query["disc_ranking"], pos)]
    fused = [score_ranking(r, {p}) for r, p in zip(per_query["rrf_ranking"], pos)]
    gaps = [disc_gap(s) for s in per_query["disc_scores"]]
    top1 = [disc_top1(s) for s in per_query["disc_scores"]]
    n = len(pos)
    return calibrate(disc, fused, gaps, top1, list(range(0, n, 2)), list(range(1, n, 2)), Fusion.parse("rrf"),
                     points=points)
