"""Adaptive fusion in the evaluation runner's exact path, and the adaptive calibration, against
hand computations on hand-made vectors.

The candidates' disc and gen vectors are the unit vectors e0..e3, so a query's vector IS its
row of scores: every ranking and every reasoning decision below can be read off the tables.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from ume_retriever import Item
from ume_retriever.evaluation import EvalQuery, EvalTask
from ume_retriever.evaluation.calibrate import calibrate, disc_gap, then_fusion
from ume_retriever.evaluation.metrics import METRICS, score_ranking
from ume_retriever.evaluation.runner import dev_test_split, evaluate_task
from ume_retriever.fusion import Fusion
from ume_retriever.results import EncodeResult

CANDS = ["c0", "c1", "c2", "c3"]
# query -> (disc scores, gen scores) over c0..c3; every positive is c0.
TABLE = {
    "q0": ((0.90, 0.10, 0.05, 0.00), (0.00, 0.95, 0.10, 0.05)),  # gap 0.80; disc right, fused wrong
    "q1": ((0.40, 0.60, 0.10, 0.00), (0.90, 0.10, 0.20, 0.00)),  # gap 0.20; disc wrong, fused right
    "q2": ((0.50, 0.45, 0.10, 0.00), (0.10, 0.80, 0.00, 0.30)),  # gap 0.05; disc right, fused wrong
    "q3": ((0.30, 0.33, 0.20, 0.10), (0.95, 0.05, 0.10, 0.00)),  # gap 0.03; disc wrong, fused right
    "q4": ((0.70, 0.00, 0.60, 0.10), (0.60, 0.10, 0.30, 0.02)),  # gap 0.10; both right
    "q5": ((0.20, 0.90, 0.10, 0.00), (0.10, 0.90, 0.00, 0.00)),  # gap 0.70; both wrong
    "q6": ((0.50, 0.40, 0.30, 0.20), (0.10, 0.90, 0.00, 0.00)),  # a pool of c0 only: never reasons
}
HALF = "weighted:disc=0.5,gen=0.5"


class TableEncoder:
    """Each input's text names its vectors: a candidate's are e_i, a query's are its TABLE rows."""

    name_or_path, embedding_dim, batch_size, max_new_tokens, processor = "table", 4, 8, 1, None

    def encode(self, inputs, mode="disc", **kwargs):
        out = []
        for i, item in enumerate(inputs):
            if item.text in CANDS:
                d = g = np.eye(4)[CANDS.index(item.text)]
            else:
                d, g = (np.asarray(v, dtype=np.float64) for v in TABLE[item.text])
            out.append(EncodeResult(i, disc=d, gen=g))
        return out


def table_task() -> EvalTask:
    queries = [EvalQuery(q, Item(text=q), {"c0"}) for q in TABLE]
    queries[-1].candidates = ["c0"]
    return EvalTask("table", queries, {c: Item(text=c) for c in CANDS})


def hand_ranking(q: str, method: str) -> list[str]:
    """Plain numpy: disc, or the 0.5/0.5 weighted sum, over the query's pool."""
    d, g = (np.asarray(v) for v in TABLE[q])
    scores = d if method == "disc" else 0.5 * d + 0.5 * g
    pool = ["c0"] if q == "q6" else CANDS
    s = scores[: len(pool)]
    return [pool[i] for i in np.argsort(-s, kind="stable")]


def mean_metrics(rankings: list[list[str]]) -> dict[str, float]:
    rows = [score_ranking(r, {"c0"}) for r in rankings]
    return {m: float(np.mean([r[m] for r in rows])) for m in METRICS}


def run(fusions, **kwargs):
    return evaluate_task(TableEncoder(), table_task(), fusions=fusions, path="exact", pass_k=(), sweep=False, **kwargs)


def test_the_table_is_what_its_comments_say():
    gaps = {q: disc_gap(d) for q, (d, _) in TABLE.items()}
    assert gaps["q0"] == pytest.approx(0.80) and gaps["q3"] == pytest.approx(0.03)
    assert [hand_ranking(q, "disc")[0] == "c0" for q in TABLE] == [True, False, True, False, True, False, True]
    assert [hand_ranking(q, HALF)[0] == "c0" for q in TABLE] == [False, True, False, True, True, False, True]
    assert disc_gap([0.7]) == float("inf")


def test_margin_0_ranks_as_disc_and_margin_2_as_then():
    r = run(("rrf", HALF, "adaptive:margin=0,then=rrf", "adaptive:margin=2,then=rrf",
             "adaptive:margin=0,then=weighted,disc=0.5,gen=0.5", "adaptive:margin=2,then=weighted,disc=0.5,gen=0.5"))
    plain = {m: v for m, v in r.modes["adaptive:margin=0,then=rrf"].items() if m != "reasoned"}
    assert plain == r.modes["disc"] and r.modes["adaptive:margin=0,then=rrf"]["reasoned"] == 0.0
    always = {m: v for m, v in r.modes["adaptive:margin=2,then=rrf"].items() if m != "reasoned"}
    assert always == r.modes["rrf"]
    assert r.modes["adaptive:margin=2,then=rrf"]["reasoned"] == pytest.approx(6 / 7)  # q6 has one candidate
    never, every = (f"adaptive:margin={m},then=weighted,disc=0.5,gen=0.5" for m in (0, 2))
    assert {m: r.modes[never][m] for m in METRICS} == mean_metrics([hand_ranking(q, "disc") for q in TABLE])
    assert {m: r.modes[every][m] for m in METRICS} == mean_metrics([hand_ranking(q, HALF) for q in TABLE])
    assert "reasoned" not in r.modes["rrf"] and "reasoned" not in r.modes["disc"]


def test_an_intermediate_margin_reasons_on_the_queries_a_hand_count_says():
    fusion = "adaptive:margin=0.15,then=weighted,disc=0.5,gen=0.5"
    r = run((fusion,))
    reasoning = {"q2", "q3", "q4"}  # gaps 0.05, 0.03, 0.10 < 0.15; q0 0.80, q1 0.20, q5 0.70; q6 one candidate
    expected = [hand_ranking(q, HALF if q in reasoning else "disc") for q in TABLE]
    assert [e[0] == "c0" for e in expected] == [True, False, False, True, True, False, True]
    assert r.modes[fusion]["hit@1"] == pytest.approx(4 / 7)
    assert {m: r.modes[fusion][m] for m in METRICS} == mean_metrics(expected)
    assert r.modes[fusion]["reasoned"] == pytest.approx(3 / 7)
    # The ranking itself, not just its metrics: q1 keeps its disc order, q3 takes the fused one.
    from ume_retriever.evaluation import runner

    task, v = table_task(), runner._encode(TableEncoder(), table_task(), 0, 1.0, 0, False)
    got = {q.id: runner._exact_ranking(task, q, v, Fusion.parse(fusion)) for q in task.queries}
    assert got["q1"] == ["c1", "c0", "c2", "c3"] and got["q3"] == ["c0", "c1", "c2", "c3"]
    assert got == {q: e for q, e in zip(TABLE, expected)}


def test_the_reasoning_share_grows_with_the_margin():
    margins = [0, 0.02, 0.03, 0.031, 0.06, 0.15, 0.2, 0.21, 0.75, 0.81, 2]
    r = run([f"adaptive:margin={m:g},then=rrf" for m in margins])
    shares = [r.modes[f"adaptive:margin={m:g},then=rrf"]["reasoned"] for m in margins]
    assert shares == sorted(shares) and shares[0] == 0 and shares[-1] == pytest.approx(6 / 7)
    # a query reasons when its gap is BELOW the margin: q3 (0.03) not at 0.03, at 0.031
    assert shares[2] == 0 and shares[3] == pytest.approx(1 / 7)


def rows(hits):
    return [score_ranking(["c0"] if h else ["x"], {"c0"}) for h in hits]


def test_the_chosen_margin_follows_the_rule_on_a_hand_checkable_case():
    then = Fusion.parse("rrf")
    disc, fused = rows([0, 1, 0, 1, 1, 0, 1, 0]), rows([1, 1, 1, 0, 0, 1, 1, 1])
    gaps = [0.01, 0.02, 0.30, 0.50, 0.04, 0.05, 0.60, 0.70]
    top1 = [0.90, 0.20, 0.30, 0.80, 0.50, 0.60, 0.70, 0.40]
    dev, test = [0, 1, 2, 3], [4, 5, 6, 7]
    cal = calibrate(disc, fused, gaps, top1, dev, test, then)
    # dev: disc Hit@1 0.5, fused 0.75: the target is 0.74. By gap, i0 (0.01) reasons first and
    # alone lifts dev Hit@1 to 0.75: a margin in (0.01, 0.02] reasons on 25 % of dev.
    assert cal["disc"]["dev"]["hit@1"] == 0.5 and cal["fused"]["dev"]["hit@1"] == 0.75
    margin = cal["routers"]["margin"]
    assert margin["target_dev_hit@1"] == pytest.approx(0.74)
    chosen = margin["chosen"]
    assert 0.01 < cal["chosen_margin"] <= 0.02 and chosen["threshold"] == cal["chosen_margin"]
    assert chosen["dev"]["reasoned"] == 0.25 and chosen["dev"]["hit@1"] == 0.75
    assert all(c["dev"]["hit@1"] < 0.74 for c in margin["curve"] if c["dev"]["reasoned"] < 0.25)
    # On test the chosen margin reasons where the gap is below it: none of 0.04, 0.05, 0.60, 0.70.
    assert chosen["test"]["reasoned"] == 0 and chosen["test"]["hit@1"] == 0.5
    assert Fusion.parse(cal["chosen_fusion"]) == Fusion("adaptive", margin=cal["chosen_margin"], then="rrf")
    # The top-1 router: i1 (0.20) reasons first and changes nothing, i2 (0.30) next: 50 % of dev.
    assert cal["routers"]["top1"]["chosen"]["dev"]["reasoned"] == 0.5
    assert cal["routers"]["top1"]["chosen"]["dev"]["hit@1"] == 0.75
    assert cal["less_reasoning"] == "margin" and "margin reasons less" in cal["comparison"]
    # Oracle: the better per query (dev: all four right), reasoning only where fused wins (i0, i2).
    assert cal["oracle"]["dev"]["hit@1"] == 1.0 and cal["oracle"]["dev"]["reasoned"] == 0.5
    assert cal["oracle"]["test"]["hit@1"] == 1.0 and cal["oracle"]["test"]["reasoned"] == 0.5
    # Each curve goes from no reasoning to all, monotonically, on both halves.
    for router in cal["routers"].values():
        for split in ("dev", "test"):
            shares = [c[split]["reasoned"] for c in router["curve"]]
            assert shares == sorted(shares) and shares[0] == 0 and shares[-1] == 1
        thresholds = [c["threshold"] for c in router["curve"]]
        assert thresholds == sorted(set(thresholds))
    # Area under dev Hit@1 vs share: shares 0, 1/4, 1/2, 3/4, 1 give 0.5, 0.75, 0.75, 1, 0.75.
    assert margin["area"]["dev"] == pytest.approx(0.25 * (0.625 + 0.75 + 0.875 + 0.875))
    assert "Area under Hit@1" in cal["comparison"]
    # A loose tolerance accepts disc itself: no reasoning at all.
    loose = calibrate(disc, fused, gaps, top1, dev, test, then, tolerance=0.3)
    assert loose["chosen_margin"] == 0 and loose["routers"]["margin"]["chosen"]["dev"]["reasoned"] == 0
    json.dumps(cal, allow_nan=False)


def test_the_calibration_in_the_runner_agrees_with_the_adaptive_mode_it_chooses():
    task = table_task()
    r = evaluate_task(TableEncoder(), task, fusions=(), path="exact", pass_k=(), sweep=True, seed=3,
                      calibrate_adaptive="adaptive:margin=0.5,then=weighted,disc=0.5,gen=0.5")
    cal = r.adaptive_calibration
    dev, test = dev_test_split(len(task.queries), 3)
    assert (cal["dev_queries"], cal["test_queries"]) == (len(dev), len(test))
    assert (r.sweep["dev_queries"], r.sweep["test_queries"]) == (len(dev), len(test))
    assert cal["then"] == HALF and cal["chosen_fusion"].startswith("adaptive:margin=")
    # The chosen point's figures are those of running the chosen fusion (weighted by half size).
    check = run((cal["chosen_fusion"],), seed=3).modes[cal["chosen_fusion"]]
    chosen = cal["routers"]["margin"]["chosen"]
    for metric in ("hit@1", "ndcg@5", "reasoned"):
        overall = (chosen["dev"][metric] * len(dev) + chosen["test"][metric] * len(test)) / len(task.queries)
        assert overall == pytest.approx(check[metric])
    assert "adaptive_calibration" in r.as_dict() and json.dumps(r.as_dict())
    assert run(("rrf",)).adaptive_calibration == {}


def test_then_must_be_a_fusion_adaptive_can_reason_with():
    assert then_fusion("adaptive:margin=0.1,then=dbsf") == Fusion("dbsf")
    assert then_fusion("rrf:k=61") == Fusion("rrf", k=61)
    with pytest.raises(ValueError, match="calibrate-adaptive"):
        then_fusion("disc")
    with pytest.raises(ValueError):
        run(("rrf",), calibrate_adaptive="nope")


def test_the_plot_is_written_or_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    from ume_retriever.evaluation import cli, plots

    r = run((), calibrate_adaptive="rrf")
    plots.plot_adaptive([r], tmp_path / "adaptive_curve.png")
    assert (tmp_path / "adaptive_curve.png").stat().st_size > 1000

    def no_matplotlib():
        raise ModuleNotFoundError("No module named 'matplotlib'")

    monkeypatch.setattr(plots, "_plt", no_matplotlib)
    with caplog.at_level(logging.WARNING):
        cli._plot(plots.plot_adaptive, [r], tmp_path / "missing.png")
    assert not (tmp_path / "missing.png").exists() and "missing.png not written" in caplog.text


def test_ume_eval_calibrate_adaptive(tiny_ckpt, tmp_path, capsys):
    from ume_retriever.evaluation.cli import main

    rows_ = [{"type": "candidate", "id": f"c{i}", "text": f"note {i} about {w}"}
             for i, w in enumerate(["red", "green", "blue", "cats", "dogs", "rain"])]
    rows_ += [{"type": "query", "id": f"q{i}", "text": f"about {w}", "positives": [f"c{i}"]}
              for i, w in enumerate(["red", "green", "blue", "cats", "dogs", "rain"])]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
    code = main(["--model", str(tiny_ckpt), "--task", str(tmp_path / "task.jsonl"), "--out", str(tmp_path / "o"),
                 "--cache", str(tmp_path / "cache"), "--pass-k", "", "--no-sweep", "--path", "exact",
                 "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "8", "--calibrate-adaptive",
                 "--fusion", "adaptive:margin=0.05,then=rrf"])
    assert code == 0
    task = json.loads((tmp_path / "o" / "results.json").read_text())["tasks"][0]
    assert 0 <= task["modes"]["adaptive:margin=0.05,then=rrf"]["reasoned"] <= 1
    cal = task["adaptive_calibration"]
    assert cal["then"] == "rrf" and cal["dev_queries"] + cal["test_queries"] == 6
    assert (tmp_path / "o" / "adaptive_curve.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "adaptive calibration" in out and "margin *" in out
    bad = ["--model", str(tiny_ckpt), "--task", str(tmp_path / "task.jsonl"), "--calibrate-adaptive", "disc"]
    assert main(bad) == 1
