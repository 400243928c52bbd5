"""The `ume` command end to end on real files and the embedded store, checked against UMEIndex."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pymupdf
import pytest
from PIL import Image

from ume_retriever import UMEIndex
from ume_retriever.cli import CLIError, main, parse_filters


@pytest.fixture()
def files(tmp_path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    doc = pymupdf.open()
    for text in ("first page", "second page", "third page"):
        doc.new_page(width=200, height=260).insert_text((20, 40), text)
    doc.save(str(root / "a.pdf"))
    Image.new("RGB", (64, 64), "red").save(root / "red.png")
    (root / "note.txt").write_text("a note about squares")
    (root / "bad.pdf").write_bytes(b"%PDF-1.4 broken")
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def model_args(tiny_ckpt) -> list:
    return ["--model", tiny_ckpt, "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "12"]


def test_index_search_info_delete(capsys, files, tmp_path, tiny_ckpt, encoder):
    store = tmp_path / "store"
    code, out, _ = run(capsys, "index", files, "--store", store, *model_args(tiny_ckpt))
    assert code == 1  # bad.pdf failed: the exit status says so
    assert "Failed" in out and "bad.pdf" in out and "not a readable PDF" in out
    code, out, _ = run(capsys, "index", files, "--store", store, "--json", *model_args(tiny_ckpt))
    report = json.loads(out)
    statuses = sorted((Path(e["source"]).name, e["locator"], e["status"]) for e in report["entries"])
    assert statuses == sorted([("a.pdf", f"page={i}", "unchanged") for i in (1, 2, 3)] + [
        ("bad.pdf", "", "failed"), ("note.txt", "", "unchanged"), ("red.png", "", "unchanged")])
    assert report["points"] == 5

    # search: the model is read from the index; results equal UMEIndex.search
    code, out, _ = run(capsys, "search", "second page", "--store", store, "--k", "3", "--fusion",
                       "weighted:disc=0.6,gen=0.4", "--json", "--device", "cpu", "--dtype", "float32",
                       "--max-new-tokens", "12")
    assert code == 0
    hits = json.loads(out)
    with UMEIndex(encoder, store) as index:
        expected = index.search("second page", 3, fusion="weighted:disc=0.6,gen=0.4")
    assert [h["id"] for h in hits] == [h.id for h in expected]
    for got, want in zip(hits, expected):
        assert got["score"] == pytest.approx(0.6 * want.disc_score + 0.4 * want.gen_score, abs=1e-5)
        assert (got["rank"], got["reasoning"]) == (hits.index(got) + 1, want.reasoning)
    code, out, _ = run(capsys, "search", "page", "--store", store, "--filter", "modality=pdf_page", "--filter",
                       "page>=2", "--json", *model_args(tiny_ckpt))
    assert sorted(h["page"] for h in json.loads(out)) == [2, 3]
    code, out, _ = run(capsys, "search", "--image", files / "red.png", "--fusion", "disc", "--k", "1", "--store",
                       store, *model_args(tiny_ckpt))
    assert code == 0 and "red.png" in out and "1.000" in out  # the image finds itself, cosine 1

    code, out, _ = run(capsys, "info", "--store", store, "--json")
    info = json.loads(out)
    assert (info["model"], info["items"], info["sources"]) == (str(tiny_ckpt), 5, 3)
    assert info["by_modality"] == {"pdf_page": 3, "image": 1, "text": 1}

    code, out, _ = run(capsys, "delete", files / "a.pdf", "--store", store)
    assert code == 0 and "3 item(s)" in out
    code, out, _ = run(capsys, "info", "--store", store, "--json")
    assert json.loads(out)["items"] == 2
    code, _, err = run(capsys, "delete", files / "a.pdf", "--store", store)
    assert code == 1 and "not in the index" in err


def test_errors_are_one_line_and_exit_nonzero(capsys, tmp_path, tiny_ckpt):
    code, out, err = run(capsys, "search", "x", "--store", tmp_path / "nothing")
    assert code == 1 and err.count("\n") == 1 and "no UME index" in err
    code, _, err = run(capsys, "info", "--store", tmp_path / "nothing")
    assert code == 1 and "no UME index" in err
    code, _, err = run(capsys, "search", "--store", tmp_path / "nothing")
    assert code == 1 and "query text, --image" in err
    code, _, err = run(capsys, "search", "x", "--filter", "page", "--store", tmp_path)
    assert code == 1 and "FIELD=VALUE" in err
    code, _, err = run(capsys, "search", "x", "--fusion", "weighted:disc=a", "--store", tmp_path)
    assert code == 1 and "must be a number" in err
    code, _, err = run(capsys, "index", tmp_path, "--vectors", "disc,sparse", "--store", tmp_path / "s")
    assert code == 1 and "--vectors" in err
    with pytest.raises(CLIError, match=r"^no UME index at .*nothing.* \(create one with `ume index PATHS`\)$"):
        main(["--verbose", "info", "--store", str(tmp_path / "nothing")])  # --verbose: raised, not one line


def test_filter_parsing(tmp_path):
    existing = tmp_path / "x.pdf"
    existing.write_bytes(b"")
    assert parse_filters(["modality=image", "page>=2", "page<=4", f"source={existing}"]) == {
        "modality": "image", "page": {"gte": 2.0, "lte": 4.0}, "source": str(existing.absolute())}
    assert parse_filters(["page=3"]) == {"page": 3}
    assert parse_filters([]) is None


def test_console_script_is_installed():
    out = subprocess.run([Path(sys.executable).with_name("ume"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "index" in out.stdout and "search" in out.stdout


def test_index_gen_later_then_backfill(capsys, files, tmp_path, tiny_ckpt, encoder):
    """`ume index --gen later`, `ume info`, `ume backfill`: the gen vectors end equal to an
    ingest with gen now, and the commands' counts say what the store holds."""
    (files / "bad.pdf").unlink()
    store = tmp_path / "store"
    code, out, _ = run(capsys, "index", files, "--store", store, "--gen", "later", "--json", *model_args(tiny_ckpt))
    assert code == 0 and json.loads(out)["gen_pending"] == 5
    code, out, _ = run(capsys, "info", "--store", store, "--json")
    assert (json.loads(out)["gen_pending"], json.loads(out)["gen_failed"]) == (5, 0)
    code, out, _ = run(capsys, "backfill", "--store", store, "--limit", "2", "--json", "--device", "cpu",
                       "--dtype", "float32", "--max-new-tokens", "12")
    assert code == 0 and (json.loads(out)["filled"], json.loads(out)["pending"]) == (2, 3)
    code, out, _ = run(capsys, "backfill", "--store", store, "--device", "cpu", "--dtype", "float32",
                       "--max-new-tokens", "12")
    assert code == 0 and "gen backfill" in out
    code, out, _ = run(capsys, "info", "--store", store, "--json")
    assert json.loads(out)["gen_pending"] == 0
    reference = UMEIndex(encoder, tmp_path / "now")
    reference.add([files])
    for q in ("second page", "a note about squares"):
        want = [h.id for h in reference.search(q, k=4)]
        with UMEIndex(encoder, store) as index:
            assert [h.id for h in index.search(q, k=4)] == want
    reference.close()
