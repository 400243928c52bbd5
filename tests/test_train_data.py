"""Training records (both formats, bad-record reporting) and the synthetic data generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

REASONING = "<think>x</think><answer> y <gen_emb>"


def _png(path, colour=(255, 0, 0)):
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def test_ume_format_reads_every_media_kind(tmp_path):
    import pymupdf

    from ume_retriever.inputs.records import read_records

    _png(tmp_path / "a.png")
    frames = [_png(tmp_path / f"f{i}.png", (10 * i, 0, 0)).name for i in range(4)]
    doc = pymupdf.open()
    doc.new_page(width=200, height=100).insert_text((20, 50), "hello page")
    doc.new_page()
    doc.save(tmp_path / "d.pdf")
    rows = [
        {"query": {"text": "q1", "instruction": "Find: ", "reasoning": REASONING},
         "target": {"image": "a.png", "reasoning": REASONING}},
        {"query": {"text": "q2", "reasoning": REASONING}, "target": {"video": frames, "reasoning": REASONING}},
        {"query": {"text": "q3", "reasoning": REASONING}, "target": {"pdf": "d.pdf", "page": 1, "reasoning": REASONING}},
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = read_records(tmp_path / "t.jsonl")
    assert len(report.records) == 3 and not report.bad
    r0, r1, r2 = report.records
    assert r0.query.instruction == "Find: " and r0.target.images == [str(tmp_path / "a.png")]
    assert r0.where == f"{tmp_path / 't.jsonl'}:1"
    item = r1.target.to_item()
    assert [str(p) for p in item.video] == [str(tmp_path / f) for f in frames]
    page = r2.target.to_item(pdf_dpi=72).images[0]
    assert page.size == (200, 100)  # page 1 rendered at 72 dpi
    from ume_retriever.inputs.records import Side
    from ume_train.data.pairs import answer_text

    assert answer_text(r0.query).endswith("<gen_emb>")
    assert answer_text(Side(reasoning="<think>a</think><answer> b")) == "<think>a</think><answer> b <gen_emb>"


def test_published_flat_format(tmp_path):
    from ume_retriever.inputs.records import read_records

    _png(tmp_path / "img.jpg")
    row = {"qry_text": "<|image_1|>\nRepresent the given image.", "qry_image": "img.jpg", "pos_text": "a red square",
           "pos_image": "", "solution": "a red square", "dataset_name": "ImageNet_1K",
           "qry_reasoning": REASONING, "pos_reasoning": REASONING}
    (tmp_path / "rl.json").write_text(json.dumps([row, {**row, "pos_reasoning": None}]))
    report = read_records(tmp_path / "rl.json", max_bad_records=1)
    assert len(report.records) == 1 and len(report.bad) == 1
    rec = report.records[0]
    assert rec.query.text == "Represent the given image." and rec.query.images == [str(tmp_path / "img.jpg")]
    assert rec.target.text == "a red square" and rec.target.images == []
    assert rec.dataset == "ImageNet_1K" and rec.extra == {"solution": "a red square"}
    assert "target has no reasoning" in str(report.bad[0]) and f"{tmp_path / 'rl.json'}[1]" in str(report.bad[0])
    # RL reads the same records without reasoning
    assert len(read_records(tmp_path / "rl.json", require_reasoning=False).records) == 2


def test_bad_records_are_reported_with_file_and_line_never_silently_skipped(tmp_path, caplog):
    from ume_retriever.inputs.records import TooManyBadRecords, read_records

    _png(tmp_path / "ok.png")
    good = {"query": {"text": "q", "reasoning": REASONING}, "target": {"image": "ok.png", "reasoning": REASONING}}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"query": {"text": "q", "reasoning": REASONING}, "target": {"image": "gone.png", "reasoning": REASONING}}),
        json.dumps({"query": {"text": "q"}, "target": {"image": "ok.png", "reasoning": REASONING}}),
        json.dumps([1, 2]),
        json.dumps({"query": {"text": "  ", "reasoning": REASONING}, "target": {"image": "ok.png", "reasoning": REASONING}}),
        json.dumps({"query": {"text": "q", "reasoning": REASONING}, "target": {"pdf": "ok.png", "page": 0, "reasoning": REASONING}}),
        json.dumps(good),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TooManyBadRecords) as err:
        read_records(path)
    assert f"{path}:2" in str(err.value) and "not valid JSON" in str(err.value)
    report = read_records(path, max_bad_records=6)
    assert len(report.records) == 2
    reasons = {e.where.rsplit(":", 1)[1]: e.reason for e in report.bad}
    assert set(reasons) == {"2", "3", "4", "5", "6", "7"}
    assert "media file not found" in reasons["3"] and "gone.png" in reasons["3"]
    assert "query has no reasoning" in reasons["4"]
    assert "JSON object" in reasons["5"]
    assert "neither text nor media" in reasons["6"]
    assert "1-based integer 'page'" in reasons["7"]
    assert sum("skipping bad record" in r.message for r in caplog.records) == 6
    with pytest.raises(TooManyBadRecords, match="6 bad training records"):
        read_records(path, max_bad_records=5)


def test_synthetic_split_and_media(tmp_path):
    import decord

    from ume_retriever.inputs.records import read_records
    from ume_train.data.synthetic import COLOURS, POSITIONS, SHAPES, all_scenes, make_dataset, split_scenes

    seen, heldout = split_scenes(all_scenes(), 0.2, seed=3)
    assert len(seen) + len(heldout) == len(SHAPES) * len(COLOURS) * len(POSITIONS) and len(heldout) == 24
    for attr, values in (("shape", SHAPES), ("colour", COLOURS), ("where", POSITIONS)):
        assert {getattr(s, attr) for s in seen} == set(values)  # every value is seen in training
    data = make_dataset(tmp_path, modalities=("image", "video", "pdf"), train_per_scene=1, image_size=56, seed=1)
    train = read_records(data.train).records
    evals = read_records(data.eval).records
    train_scenes = {r.extra["scene"] for r in train}
    assert not train_scenes & {s.key for s in data.heldout}
    assert {r.dataset for r in evals} == {"seen", "unseen"}
    assert sum(r.dataset == "unseen" for r in evals) == len(data.heldout) == 72
    video = next(r for r in train if r.target.video)
    reader = decord.VideoReader(video.target.video)
    assert len(reader) == 8 and reader[0].shape == (56, 56, 3)
    pdf = next(r for r in train if r.target.pdf).target.to_item(pdf_dpi=72)
    assert pdf.images[0].size == (300, 340)
    # the drawn colour is the named one: the shape's pixels are close to it
    image_rec = next(r for r in train if r.target.images)
    colour = image_rec.extra["scene"].split(":")[1].split()[0]
    pixels = np.asarray(Image.open(image_rec.target.images[0])).reshape(-1, 3).astype(int)
    shape_px = pixels[(np.abs(pixels - 255).sum(axis=1) > 60)]
    assert np.abs(shape_px.mean(axis=0) - COLOURS[colour]).max() < 30
    assert colour in image_rec.target.reasoning and colour in image_rec.query.reasoning


# -- records that pass reading but fail when prepared (issue 14, case 1) -------------------------

def _bad_record_data(tmp_path, kind: str):
    """Two good pairs and, on line 3, one that passes reading but fails when prepared; the
    reason the failure must give (a regex)."""
    import pymupdf

    _png(tmp_path / "ok.png")
    good = {"query": {"text": "a red square", "reasoning": REASONING}, "target": {"image": "ok.png", "reasoning": REASONING}}
    if kind == "corrupt_png":  # a real PNG cut in half: its header reads, its pixels do not
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "cut.png")
        data = (tmp_path / "cut.png").read_bytes()
        (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
        assert Image.open(tmp_path / "cut.png").size == (64, 64)
        bad, reason = {**good, "target": {"image": "cut.png", "reasoning": REASONING}}, "target: .*truncated or corrupt"
    elif kind == "over_long":  # 3,000 words: far above max_length=512 (and not cut by the encoder's own limit)
        text = " ".join(["red"] * 3000)
        bad, reason = {**good, "query": {"text": text, "reasoning": REASONING}}, "query: .*max_length=512"
    else:  # a PDF page past the end
        doc = pymupdf.open()
        doc.new_page(width=100, height=100).insert_text((10, 50), "one page")
        doc.save(tmp_path / "one.pdf")
        bad = {**good, "target": {"pdf": "one.pdf", "page": 3, "reasoning": REASONING}}
        reason = "target: page 3 of .*one.pdf does not exist \\(1 pages\\)"
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, good, bad)))
    return path, reason


@pytest.mark.parametrize("command", ["sft", "grpo"])
@pytest.mark.parametrize("kind", ["corrupt_png", "over_long", "pdf_page_past_end"])
def test_dry_run_finds_records_that_pass_reading_but_fail_to_prepare(kind, command, tiny_ckpt, tmp_path, capsys):
    """`--dry-run` prepares every record as training will: a record that reads fine but fails to
    prepare is reported with file:line and reason, and counts against max_bad_records."""
    import re

    from ume_retriever.inputs.records import read_records
    from ume_train.cli import main

    path, reason = _bad_record_data(tmp_path, kind)
    assert len(read_records(path).records) == 3  # reading alone finds nothing wrong
    argv = [command, "--dry-run", "--output_dir", str(tmp_path / "o"), "--train_files", str(path), "--use_cpu", "true",
            "--model_name_or_path", str(tiny_ckpt), "--max_length", "512"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert "1 bad training records (max_bad_records=0 allows 0)" in err
    assert re.search(f"{re.escape(str(path))}:3: {reason}", err), err
    code = main([*argv, "--max_bad_records", "1"])
    out = capsys.readouterr().out
    assert code == 0
    plan = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert plan["records"] == "2" and plan["bad_records_skipped"] == "1"
    assert plan["records_prepared"] == f"each of the 3 records prepared with the processor of {tiny_ckpt}"
