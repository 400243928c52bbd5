"""Hardening (issue 14): hit previews (threads, pixel caps, hostile payloads) and the ume-eval
encoding cache (no pickle, keyed on what changes vectors, corrupt files). Real PDFs (pymupdf),
real mp4s (PyAV), real LangChain/LlamaIndex retrievers over a real index; expected values are
computed here, independently of the code under test."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pymupdf
import pytest
from PIL import Image

from helpers import CountingEncoder, run_in_threads, write_mp4
from ume_retriever import Item, UMEIndex
from ume_retriever.evaluation.cache import CachedEncoder
from ume_retriever.previews import PREVIEW_DPI, PREVIEW_MAX_PIXELS, preview_path

HEX = "0123456789abcdef" * 2  # a 32-digit hex digest, the shape the loaders write


def make_pdf(path: Path, width: float = 200, height: float = 260, pages: int = 1) -> Path:
    """Each page: its left half filled red, text on the right."""
    doc = pymupdf.open()
    for n in range(pages):
        page = doc.new_page(width=width, height=height)
        page.draw_rect(pymupdf.Rect(0, 0, width / 2, height), color=(1, 0, 0), fill=(1, 0, 0))
        page.insert_text((width / 2 + 5, 40), f"page {n + 1}", fontsize=12)
    doc.save(str(path))
    doc.close()
    return path


def page_payload(pdf: Path, page: int = 1, **over) -> dict:
    return {"source": str(pdf), "modality": "pdf_page", "page": page, "locator": f"page={page}",
            "content_hash": HEX, "file_hash": HEX[::-1], **over}


def pymupdf_render(pdf: Path, page: int, zoom: float) -> np.ndarray:
    with pymupdf.open(pdf) as doc:
        pix = doc.load_page(page - 1).get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
        return np.asarray(Image.frombytes("RGB", (pix.width, pix.height), pix.samples))


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# -- previews: threads ----------------------------------------------------------------------


def test_preview_same_page_from_many_threads_gives_one_valid_png(tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf")
    expected = pymupdf_render(pdf, 1, PREVIEW_DPI / 72)  # a 200x260 pt page is far under the cap
    threads, rounds = 12, 8
    for r in range(rounds):  # a fresh cache each round: every thread has to render
        cache = tmp_path / f"cache{r}"
        got = run_in_threads(lambda i, cache=cache: preview_path(page_payload(pdf), cache), threads)
        assert all(isinstance(g, str) for g in got), got
        assert len(set(got)) == 1
        path = Path(got[0])
        assert path.parent == cache.resolve() and path.suffix == ".png"
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected)
        assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind


@pytest.fixture(scope="module")
def page_index(encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("hcorpus")
    make_pdf(root / "deck.pdf", pages=2)
    Image.new("RGB", (40, 40), "blue").save(root / "blue.png")
    index = UMEIndex(encoder, tmp_path_factory.mktemp("hstore"))
    report = index.add([root])
    assert not report.failed and index.count() == 3
    yield index
    index.close()


def test_preview_concurrent_langchain_and_llama_index_retrievers_never_raise(page_index, tmp_path):
    from llama_index.core import QueryBundle

    from ume_retriever.integrations import langchain as lc
    from ume_retriever.integrations import llama_index as li

    threads, rounds = 6, 10
    for r in range(rounds):
        cache = tmp_path / f"p{r}"
        lc_ret = lc.UMERetriever(index=page_index, k=3, fusion="disc", preview_dir=str(cache))
        li_ret = li.UMERetriever(page_index, similarity_top_k=3, fusion="disc", preview_dir=str(cache))

        def ask(i: int, lc_ret=lc_ret, li_ret=li_ret) -> dict:
            if i % 2:
                return {d.metadata["page"]: d.metadata["image_path"] for d in lc_ret.invoke("page")}
            return {n.node.metadata["page"]: n.node.image_path for n in li_ret.retrieve(QueryBundle("page"))}

        got = run_in_threads(ask, threads)
        assert all(isinstance(g, dict) for g in got), got
        assert all(g == got[0] for g in got)
        for page in (1, 2):
            assert Path(got[0][page]).parent == cache.resolve()
            Image.open(got[0][page]).verify()


def test_preview_unwritable_cache_never_fails_a_retriever(page_index, tmp_path):
    from llama_index.core import QueryBundle

    from ume_retriever.integrations import langchain as lc
    from ume_retriever.integrations import llama_index as li

    not_a_dir = tmp_path / "previews"
    not_a_dir.write_text("a file where the cache folder should be")
    docs = lc.UMERetriever(index=page_index, k=3, fusion="disc", preview_dir=str(not_a_dir)).invoke("page")
    nodes = li.UMERetriever(page_index, similarity_top_k=3, fusion="disc", preview_dir=str(not_a_dir)).retrieve(
        QueryBundle("page"))
    assert len(docs) == len(nodes) == 3
    by_kind = {d.metadata["modality"]: d.metadata.get("image_path") for d in docs}
    assert by_kind["pdf_page"] is None and Path(by_kind["image"]).name == "blue.png"
    assert sorted(type(n.node).__name__ for n in nodes) == ["ImageNode", "TextNode", "TextNode"]
    assert not_a_dir.read_text() == "a file where the cache folder should be"


# -- previews: pixel caps -------------------------------------------------------------------


def test_preview_of_a_huge_pdf_page_is_rendered_within_the_cap(tmp_path):
    # 14,400 pt (pymupdf's largest page) at 96 dpi: a 1 GiB pixmap, which mupdf refuses (no
    # preview at all); 13,000 pt: 17,334 x 17,334, which it renders (859 MiB, then a 300 MP PNG)
    for n, side in enumerate((14400, 13000)):
        pdf = make_pdf(tmp_path / f"huge{side}.pdf", side, side)
        assert pdf.stat().st_size < 1000  # a tiny file
        out = preview_path(page_payload(pdf, content_hash=f"{n:032x}"), tmp_path / "cache")
        assert out is not None, side
        img = Image.open(out)
        w, h = img.size
        assert w * h <= PREVIEW_MAX_PIXELS
        assert abs(w - h) <= 1 and w >= int(PREVIEW_MAX_PIXELS ** 0.5) - 2  # square, scaled to the cap, not below
        arr = np.asarray(img.convert("RGB")).astype(int)
        assert (np.abs(arr[:, : w // 2 - 2] - [255, 0, 0]).max()) <= 2  # the red left half
        right = arr[:, w // 2 + 2:]
        assert np.mean(right.min(axis=-1) >= 250) > 0.99  # the white right half (but for a little text)

    wide = make_pdf(tmp_path / "wide.pdf", 14400, 300)  # a pixmap that pymupdf rounds over the cap
    w, h = Image.open(preview_path(page_payload(wide, content_hash=HEX[::-1]), tmp_path / "cache")).size
    assert w * h <= PREVIEW_MAX_PIXELS and abs(w / h - 14400 / 300) < 0.5


def test_preview_of_a_large_video_frame_is_within_the_cap(tmp_path):
    size = (2560, 1920)  # 4.9 MP > the cap
    assert size[0] * size[1] > PREVIEW_MAX_PIXELS
    video = write_mp4(tmp_path / "big.mp4", num_frames=4, size=size)
    payload = {"source": str(video), "modality": "video", "locator": "clip=0.000-0.400", "clip_start": 0.0,
               "clip_end": 0.4, "content_hash": HEX, "file_hash": HEX}
    img = Image.open(preview_path(payload, tmp_path / "cache"))
    w, h = img.size
    assert w * h <= PREVIEW_MAX_PIXELS and w * h > 0.99 * PREVIEW_MAX_PIXELS
    assert abs(w / h - 4 / 3) < 0.01
    # the middle of 0-0.4 s at 10 fps is frame 2, a flat grey of level 20
    assert abs(np.asarray(img.convert("L"), dtype=float).mean() - 20) < 4


# -- previews: hostile payloads -------------------------------------------------------------


def hostile_payloads(outside: Path) -> dict[str, dict]:
    return {
        "absolute content_hash": {"content_hash": str(outside / "evil")},
        "dot-dot content_hash": {"content_hash": "../../escaped"},
        "dot-dot locator": {"locator": "../../../escaped"},
        "absolute locator": {"locator": str(outside / "evil2")},
        "dot-dot file_hash, no content_hash": {"content_hash": None, "file_hash": "../../escaped3"},
        "NUL in content_hash": {"content_hash": HEX + "\x00.png"},
        "list content_hash": {"content_hash": [str(outside / "evil4")]},
        "non-hex content_hash": {"content_hash": "not-a-digest-at-all"},
    }


@pytest.mark.parametrize("case", list(hostile_payloads(Path("/x"))))
def test_preview_hashes_cannot_name_paths_outside_the_cache(tmp_path, case):
    pdf = make_pdf(tmp_path / "doc.pdf")
    outside = tmp_path / "outside"
    outside.mkdir()
    cache = tmp_path / "deep" / "er" / "cache"
    before = files_under(tmp_path)
    out = preview_path(page_payload(pdf, **hostile_payloads(outside)[case]), cache)
    created = files_under(tmp_path) - before
    assert all(p == cache.resolve() or cache.resolve() in p.resolve().parents
               or p.resolve() in cache.resolve().parents for p in created), created
    if out is not None:  # a safe name in the cache, the right page
        assert Path(out).parent == cache.resolve()
        assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), pymupdf_render(pdf, 1, PREVIEW_DPI / 72))
    if "content_hash" in case or "file_hash" in case:
        assert out is None  # a hash that is not a hex digest: no preview
    else:
        assert out is not None  # a valid hash with an odd locator still gets its preview


def test_preview_malformed_payloads_give_none_never_raise(tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n this is not a pdf")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases = {
        "source is a number": {"source": 12345},
        "source is a list": {"source": [str(pdf)]},
        "source with NUL": {"source": str(pdf) + "\x00"},
        "page is not a number": {"page": "three"},
        "page is missing": {"page": None},
        "page past the end": {"page": 99},
        "broken pdf": {"source": str(broken)},
        "a text file as a video": {"source": str(text), "modality": "video"},
    }
    for n, (name, over) in enumerate(cases.items()):
        assert preview_path(page_payload(pdf, **over), tmp_path / f"cache{n}") is None, name
    assert preview_path(["not", "a", "mapping"], tmp_path / "cache") is None  # type: ignore[arg-type]


# -- the ume-eval encoding cache ------------------------------------------------------------




class Planted:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def eval_items(tmp_path_factory, mp4_path):
    root = tmp_path_factory.mktemp("evalitems")
    Image.new("RGB", (32, 32), "red").save(root / "red.png")
    return [Item(text="a note about circles"), Item(image=root / "red.png"),
            Item(text="what is this", image=root / "red.png"), Item(video=mp4_path)]


def assert_same_results(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.error is None and y.error is None
        for field in ("disc", "gen"):
            u, v = getattr(x, field), getattr(y, field)
            assert (u is None) == (v is None)
            if u is not None:
                assert np.asarray(u).dtype == np.asarray(v).dtype and np.array_equal(u, v), field
        assert (x.reasoning, x.gen_outcome) == (y.reasoning, y.gen_outcome)
        assert len(x.samples or []) == len(y.samples or [])
        for s, t in zip(x.samples or [], y.samples or []):
            assert np.array_equal(s.vector, t.vector) and np.asarray(s.vector).dtype == np.asarray(t.vector).dtype
            assert (s.reasoning, s.outcome, s.num_tokens) == (t.reasoning, t.outcome, t.num_tokens)


def test_eval_cache_planted_pickle_is_never_executed(encoder, eval_items, tmp_path, caplog):
    cache = tmp_path / "c"
    cache.mkdir()
    marker = tmp_path / "PWNED"
    # the old cache's own name for this model (blake2b of name|revision|max_new_tokens), and another
    old_key = f"{encoder.name_or_path}|{getattr(encoder, 'revision', None)}|{encoder.max_new_tokens}"
    old_name = f"encodings-{hashlib.blake2b(old_key.encode(), digest_size=8).hexdigest()}.pkl"
    for name in (old_name, "encodings-0000000000000000.pkl"):
        (cache / name).write_bytes(pickle.dumps(Planted(marker)))
    with caplog.at_level(logging.WARNING, logger="ume_retriever.evaluation.cache"):
        cached = CachedEncoder(encoder, cache)
        assert sum(".pkl" in r.getMessage() and "never loaded" in r.getMessage() for r in caplog.records) == 2
        # a pickle, and an npz whose arrays are pickled objects, at the cache's own (new) path
        for planted in (pickle.dumps(Planted(marker)), None):
            if planted is None:
                with open(cached.path, "wb") as f:
                    np.savez(f, vectors=np.array([Planted(marker)], dtype=object), meta=np.zeros(3, np.uint8))
            else:
                cached.path.write_bytes(planted)
            caplog.clear()
            reopened = CachedEncoder(encoder, cache)
            assert any(str(cached.path) in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
            res = reopened.encode(eval_items[:2], mode="disc")
            assert not marker.exists()
            assert all(np.array_equal(r.disc, d.disc) for r, d in zip(res, encoder.encode(eval_items[:2])))
            reopened.save()
    assert not marker.exists()
    with np.load(cached.path, allow_pickle=False) as data:  # what is written is data
        assert set(data.files) == {"vectors", "meta"} and data["vectors"].dtype == np.float32
    assert zipfile.is_zipfile(cached.path)
    assert (cache / old_name).read_bytes() == pickle.dumps(Planted(marker))  # reported, left alone


def test_eval_cache_round_trips_results_exactly_across_a_reopen(encoder, eval_items, tmp_path):
    first = CachedEncoder(encoder, tmp_path / "c")
    both = first.encode(eval_items, mode="both")
    sampled = first.encode(eval_items[:2], mode="gen", num_samples=3, temperature=1.0, seed=7)
    first.save()
    with np.load(first.path, allow_pickle=False) as data:  # data on disc, not a pickle
        assert data["vectors"].dtype == np.float32 and data["vectors"].shape[1] == encoder.embedding_dim
    # the encoder itself, run again (it is deterministic: greedy gen, seeded sampling)
    assert_same_results(both, encoder.encode(eval_items, mode="both"))
    assert_same_results(sampled, encoder.encode(eval_items[:2], mode="gen", num_samples=3, temperature=1.0, seed=7))
    assert len({s.reasoning for r in sampled for s in r.samples}) > 1  # real, different samples
    counting = CountingEncoder(encoder)
    again = CachedEncoder(counting, tmp_path / "c")
    assert_same_results(again.encode(eval_items, mode="both"), both)
    assert_same_results(again.encode(eval_items[:2], mode="gen", num_samples=3, temperature=1.0, seed=7), sampled)
    assert_same_results(again.encode(eval_items, mode="disc"), [type(r)(index=r.index, disc=r.disc) for r in both])
    assert counting.calls == 0 and again.hits == 3 * len(eval_items) - 2 and again.misses == 0
    other_seed = again.encode(eval_items[:1], mode="gen", num_samples=3, temperature=1.0, seed=8)
    assert counting.calls == 1 and other_seed[0].samples[0].num_tokens > 0  # another key: encoded


def test_eval_cache_misses_when_what_changes_vectors_changes(encoder, eval_items, tiny_ckpt, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from ume_retriever import UMEEncoder
    from ume_retriever.model.checkpoint import pixel_caps, set_pixel_caps

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    kwargs = {"device": "cpu", "dtype": torch.float32, "batch_size": 4, "max_new_tokens": 12}
    base = UMEEncoder.from_pretrained(ckpt, **kwargs)
    cache = tmp_path / "c"
    first = CachedEncoder(base, cache)
    first.encode(eval_items, mode="disc")
    first.save()

    def calls(enc) -> int:
        counting = CountingEncoder(enc)
        CachedEncoder(counting, cache).encode(eval_items, mode="disc")
        return counting.calls

    assert calls(UMEEncoder.from_pretrained(ckpt, **kwargs)) == 0  # the same checkpoint, loaded again: a hit
    copied = tmp_path / "moved"
    shutil.copytree(ckpt, copied)  # same bytes elsewhere: the fingerprint is the content, not the path
    assert calls(UMEEncoder.from_pretrained(copied, **kwargs)) == 0

    same = {"name_or_path": base.name_or_path, "batch_size": 4}
    assert calls(UMEEncoder(base.model, base.processor, max_new_tokens=16, **same)) > 0
    processor = copy.deepcopy(base.processor)
    set_pixel_caps(processor, None, 128 * 28 * 28)
    assert pixel_caps(processor) != pixel_caps(base.processor)
    assert calls(UMEEncoder(base.model, processor, max_new_tokens=12, **same)) > 0
    assert calls(UMEEncoder(base.model, base.processor, max_new_tokens=12, num_video_frames=4, **same)) > 0
    half = copy.deepcopy(base.model).to(torch.bfloat16)
    assert calls(UMEEncoder(half, base.processor, max_new_tokens=12, **same)) > 0
    assert calls(UMEEncoder(base.model, base.processor, max_new_tokens=12, **same)) == 0  # control: a hit

    # new weights in place, same names, dtypes and shapes: the safetensors header is unchanged
    weights = ckpt / "model.safetensors"
    header = weights.read_bytes()[: 8 + int.from_bytes(weights.read_bytes()[:8], "little")]
    tensors = load_file(weights)
    name = min(tensors)
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.read_bytes()[: len(header)] == header
    tuned = UMEEncoder.from_pretrained(ckpt, **kwargs)
    assert calls(tuned) > 0
    assert calls(UMEEncoder.from_pretrained(copied, **kwargs)) == 0  # the old weights still hit


def corrupt_variants(good: bytes) -> dict[str, bytes | None]:
    import io
    import json

    def npz(**arrays) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def meta(obj) -> np.ndarray:
        return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)

    with np.load(io.BytesIO(good), allow_pickle=False) as data:
        vectors = data["vectors"]
        good_meta = json.loads(data["meta"].tobytes())
    out_of_range = copy.deepcopy(good_meta)
    out_of_range["entries"][0]["row"] = len(vectors) + 5
    other_model = copy.deepcopy(good_meta)
    other_model["fingerprint"]["max_new_tokens"] = 999
    return {
        "empty file": b"",
        "random bytes": os.urandom(4096),
        "truncated": good[: len(good) // 2],
        "one flipped byte in the middle": good[: len(good) // 2] + bytes([good[len(good) // 2] ^ 0xFF]) + good[len(good) // 2 + 1:],
        "a plain .npy": _npy(vectors),
        "wrong arrays": npz(other=vectors),
        "vectors as float64": npz(vectors=vectors.astype(np.float64), meta=meta(good_meta)),
        "meta not JSON": npz(vectors=vectors, meta=np.frombuffer(b"\xff\xfe{", dtype=np.uint8)),
        "entry rows out of range": npz(vectors=vectors, meta=meta(out_of_range)),
        "another model's file": npz(vectors=vectors, meta=meta(other_model)),
        "entries not a list": npz(vectors=vectors, meta=meta({**good_meta, "entries": 7})),
        "a folder at the cache path": None,
    }


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_eval_cache_corrupt_file_is_reported_and_re_encoded(encoder, eval_items, tmp_path, caplog):
    items = eval_items[:3]
    reference = encoder.encode(items, mode="both")
    seed = CachedEncoder(encoder, tmp_path / "seed")
    seed.encode(items, mode="both")
    seed.save()
    good = seed.path.read_bytes()
    for n, (kind, content) in enumerate(corrupt_variants(good).items()):
        cache = tmp_path / f"c{n}"
        cache.mkdir()
        path = cache / seed.path.name
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ume_retriever.evaluation.cache"):
            counting = CountingEncoder(encoder)
            cached = CachedEncoder(counting, cache)
            assert cached.path == path
            got = cached.encode(items, mode="both")
            cached.save()
        assert counting.calls == 1, kind  # ignored, so everything was encoded again
        assert_same_results(got, reference)
        if content is None:
            assert any("not written" in r.getMessage() for r in caplog.records), kind
            continue
        assert any(str(path) in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records), kind
        recount = CountingEncoder(encoder)
        assert_same_results(CachedEncoder(recount, cache).encode(items, mode="both"), reference)
        assert recount.calls == 0, kind  # the rewritten file is good again
