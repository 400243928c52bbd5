"""Evaluation: metrics against hand-computed values, the runner against a numpy recomputation from
the encoder's own vectors, the index path against the exact path, the cache, task formats, ume-eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pymupdf
import pytest
from PIL import Image

from helpers import CountingEncoder
from ume_retriever import Item
from ume_retriever.evaluation import EvalQuery, EvalTask, hit_at_k, load_task, mrr_at_k, ndcg_at_k
from ume_retriever.evaluation.cache import CachedEncoder
from ume_retriever.evaluation.runner import evaluate, evaluate_task


def test_metrics_by_hand():
    ranked, rel = ["a", "b", "c", "d"], {"b", "d"}
    assert hit_at_k(ranked, rel, 1) == 0.0 and hit_at_k(ranked, rel, 2) == 1.0
    dcg = 1 / math.log2(3) + 1 / math.log2(5)  # relevant at ranks 2 and 4
    assert ndcg_at_k(ranked, rel, 5) == pytest.approx(dcg / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(ranked, {"b"}, 5) == pytest.approx(1 / math.log2(3))  # ideal DCG over min(k, 1) = 1
    assert ndcg_at_k(ranked, rel, 1) == 0.0
    assert ndcg_at_k(["x", "b"], {"b", "y", "z"}, 2) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert mrr_at_k(ranked, rel, 10) == 0.5 and mrr_at_k(ranked, rel, 1) == 0.0
    with pytest.raises(ValueError):
        hit_at_k(ranked, rel, 0)


def make_task(tmp_path) -> EvalTask:
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    cands, queries = {}, []
    for i, c in enumerate(colours):
        path = tmp_path / f"{c}.png"
        Image.new("RGB", (32, 32), c).save(path)
        cands[f"img-{c}"] = Item(image=path)
        cands[f"txt-{c}"] = Item(text=f"a note about {c} things number {i}")
        queries.append(EvalQuery(f"q-{c}", Item(text=f"something {c}"), {f"img-{c}"}))
    queries[0].candidates = ["img-red", "img-blue", "txt-green"]  # a per-query pool
    return EvalTask("colours", queries, cands)


def reference_rankings(encoder, task: EvalTask, mode: str) -> list[list[str]]:
    """Plain numpy from the encoder's vectors (no runner code)."""
    vec = {}
    for key, item in [*task.candidates.items(), *[(q.id, q.item) for q in task.queries]]:
        vec[key] = getattr(encoder.encode(item, mode="both"), mode)
    out = []
    for q in task.queries:
        pool = task.pool(q)
        scores = np.array([float(vec[c] @ vec[q.id]) for c in pool])
        out.append([pool[i] for i in np.argsort(-scores, kind="stable")[:10]])
    return out


def test_runner_matches_a_numpy_recomputation_and_both_paths_agree(encoder, tmp_path):
    task = make_task(tmp_path)
    cached = CachedEncoder(encoder, tmp_path / "cache")
    exact = evaluate_task(cached, task, path="exact", pass_k=(1, 2, 4), fusions=("rrf", "weighted:disc=0.5,gen=0.5"))
    via_index = evaluate_task(cached, task, path="index", pass_k=(), sweep=False,
                              fusions=("rrf", "weighted:disc=0.5,gen=0.5"))
    for mode in ("disc", "gen"):
        ranks = reference_rankings(encoder, task, mode)
        hit1 = np.mean([r[0] in q.positives for r, q in zip(ranks, task.queries)])
        mrr = np.mean([next((1 / (i + 1) for i, c in enumerate(r) if c in q.positives), 0.0)
                       for r, q in zip(ranks, task.queries)])
        assert exact.modes[mode]["hit@1"] == pytest.approx(hit1)
        assert exact.modes[mode]["mrr@10"] == pytest.approx(mrr)
    for mode in ("disc", "gen", "weighted:disc=0.5,gen=0.5"):  # (RRF ties may be ordered differently)
        for metric in ("hit@1", "hit@5", "mrr@10"):
            assert via_index.modes[mode][metric] == pytest.approx(exact.modes[mode][metric], abs=1e-9), (mode, metric)
    d, g = reference_rankings(encoder, task, "disc"), reference_rankings(encoder, task, "gen")
    oracle = np.mean([max(a[0] in q.positives, b[0] in q.positives) for a, b, q in zip(d, g, task.queries)])
    assert exact.modes["oracle"]["hit@1"] == pytest.approx(oracle)
    ks = sorted(exact.pass_at_k)
    assert ks == [1, 2, 4] and all(exact.pass_at_k[a] <= exact.pass_at_k[b] for a, b in zip(ks, ks[1:]))
    sweep = exact.sweep
    assert len(sweep["curve"]) == 11 and sweep["dev_queries"] + sweep["test_queries"] == len(task.queries)
    pure_disc = sweep["curve"][-1]  # disc weight 1, gen weight 0: the disc ranking
    overall = (pure_disc["dev"]["hit@1"] * sweep["dev_queries"] + pure_disc["test"]["hit@1"] * sweep["test_queries"])
    assert overall / len(task.queries) == pytest.approx(exact.modes["disc"]["hit@1"])




def test_results_are_cached_per_model_and_content(encoder, tmp_path):
    task = make_task(tmp_path)
    counting = CountingEncoder(encoder)
    first = evaluate(counting, [task], cache_dir=str(tmp_path / "c"), pass_k=(1, 2), path="exact", sweep=False)
    assert counting.calls > 0
    again = CountingEncoder(encoder)
    second = evaluate(again, [task], cache_dir=str(tmp_path / "c"), pass_k=(1, 2), path="index", sweep=False,
                      fusions=("rrf", "dbsf"))  # another path and a new fusion: nothing re-encoded
    assert again.calls == 0
    assert second[0].modes["disc"] == first[0].modes["disc"]


def test_task_formats_and_errors(tmp_path):
    doc = pymupdf.open()
    for t in ("one", "two"):
        doc.new_page(width=100, height=100).insert_text((10, 30), t)
    doc.save(str(tmp_path / "d.pdf"))
    Image.new("RGB", (16, 16), "red").save(tmp_path / "r.png")
    rows = [{"type": "candidate", "id": "p2", "pdf": "d.pdf", "page": 2},
            {"type": "candidate", "id": "img", "image": "r.png"},
            {"type": "query", "id": "q", "text": "two", "positives": ["p2"], "candidates": ["p2", "img"]}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(tmp_path / "t.jsonl")
    assert task.name == "t" and task.pool(task.queries[0]) == ["p2", "img"]
    assert task.candidates["p2"].image.size[0] > 0  # the page, rendered
    mmeb = [{"qry_text": "<|image_1|>\nfind it", "qry_img_path": "r.png", "tgt_text": ["right", "wrong"],
             "tgt_img_path": ["", ""]}]
    (tmp_path / "m.jsonl").write_text(json.dumps(mmeb[0]) + "\n")
    m = load_task(tmp_path / "m.jsonl", "mmeb")
    q = m.queries[0]
    assert q.item.text == "find it" and m.candidates[next(iter(q.positives))].text == "right" and len(q.candidates) == 2
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"type": "query", "id": "x",
                                                                                 "text": "t", "positives": ["nope"]}) + "\n")
    with pytest.raises(ValueError, match="unknown candidate ids"):
        load_task(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('{"type": "candidate", "id": "a", "pdf": "d.pdf", "page": 9}\n')
    with pytest.raises(ValueError, match=r"bad2.jsonl:1: page 9"):
        load_task(tmp_path / "bad2.jsonl")


def test_ume_eval_command(tiny_ckpt, tmp_path, capsys):
    from ume_retriever.evaluation.cli import main

    task = make_task(tmp_path)
    rows = [{"type": "candidate", "id": cid, **({"image": Path(it.image).name} if it.image else {"text": it.text})}
            for cid, it in task.candidates.items()]
    rows += [{"type": "query", "id": q.id, "text": q.item.text, "positives": sorted(q.positives)} for q in task.queries]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["--model", str(tiny_ckpt), "--task", str(tmp_path / "task.jsonl"), "--out", str(tmp_path / "o"),
                 "--cache", str(tmp_path / "cache"), "--pass-k", "1,2", "--device", "cpu", "--dtype", "float32",
                 "--max-new-tokens", "12"])
    assert code == 0
    result = json.loads((tmp_path / "o" / "results.json").read_text())
    modes = result["tasks"][0]["modes"]
    assert set(modes) == {"disc", "gen", "rrf", "weighted", "dbsf", "oracle"}
    for name in ("hit1_by_mode.png", "pass_at_k.png", "fusion_sweep.png"):
        assert (tmp_path / "o" / name).stat().st_size > 1000
    assert "fusion sweep: best on dev" in capsys.readouterr().out
    assert main(["--model", str(tiny_ckpt), "--task", str(tmp_path / "missing.jsonl")]) == 1


def test_pairs_format_renders_pdf_pages_within_the_pixel_cap(tmp_path):
    """``--format pairs`` renders PDF pages within the encoder's cap, as training and indexing
    do (a 300x340-pt page at 144 dpi is 600x680 px uncapped)."""
    doc = pymupdf.open()
    doc.new_page(width=300, height=340).insert_text((20, 28), "Figure 1", fontsize=16)
    doc.save(tmp_path / "p.pdf")
    doc.close()
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"query": {"text": "figure one"},
                                                      "target": {"pdf": "p.pdf", "page": 1}}) + "\n")
    capped = load_task(tmp_path / "pairs.jsonl", "pairs", pdf_max_pixels=56 * 56).candidates["t0"].images[0]
    free = load_task(tmp_path / "pairs.jsonl", "pairs").candidates["t0"].images[0]
    assert free.size == (600, 680)
    assert capped.width * capped.height <= 56 * 56 and capped.width / capped.height == pytest.approx(300 / 340, rel=0.1)
