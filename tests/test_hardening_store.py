"""Hardening of fusion strings, filters, vectors, the encoder's context split, the Edge store's
schema file and the qdrant-client writer lease (issue 14), on the real engines.

Each test is named after its case; expected values are computed here from the data, not by
the code under test.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from ume_retriever.cli import CLIError, main, parse_filters
from ume_retriever.fusion import Fusion
from ume_retriever.store import (
    NonFiniteVectorError, SchemaMismatchError, StoreCorruptError, StoredPoint, StoreSchema, VectorQuery,
    WriterLeaseError, recorded_schema,
)
from ume_retriever.store.edge import SCHEMA_FILE, EdgeStore
from ume_retriever.store.qdrant import QdrantStore

DIM = 8
SCHEMA = StoreSchema(vector_size=DIM, model="tiny-test", revision=None)
STORES = ["edge", "local-memory"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ids(n: int, prefix: str = "pt") -> list[str]:
    return [str(uuid.uuid5(uuid.NAMESPACE_URL, f"{prefix}-{i}")) for i in range(n)]


PAYLOADS = [
    {"source": ["/d/a<b.pdf", "/d/c>d.pdf", "/d/plain.pdf"][i % 3], "page": i % 5, "score": [0.25, 0.5, 2.5][i % 3],
     "title": ["x|y", "x", "3"][i % 3], "modality": "image" if i % 2 else "pdf_page", "reviewed": i % 4 == 0}
    for i in range(30)
]


def _points(n: int = 30, prefix: str = "pt", seed: int = 0) -> list[StoredPoint]:
    rng = np.random.default_rng(seed)
    disc, gen = _unit(rng.normal(size=(n, DIM))), _unit(rng.normal(size=(n, DIM)))
    return [StoredPoint(id=pid, vectors={"disc": disc[i], "gen": gen[i]}, payload=dict(PAYLOADS[i % len(PAYLOADS)]))
            for i, pid in enumerate(_ids(n, prefix))]


def _open(kind: str, tmp_path):
    return EdgeStore(tmp_path / "edge", SCHEMA) if kind == "edge" else QdrantStore(SCHEMA, location=":memory:")


@pytest.fixture(params=STORES)
def filled(request, tmp_path):
    store = _open(request.param, tmp_path)
    store.upsert(_points())
    yield store
    store.close()


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message, message
    return message


# -- case 1: fusion strings ---------------------------------------------------------------------

BAD_FUSIONS = [  # (string, what the message must say) - each a distinct kind of bad input
    ("weighted:disc=nan,gen=1", "finite"),
    ("weighted:disc=inf", "finite"),
    ("rrf:gen=-inf", "finite"),
    ("weighted:disc=1e400", "finite"),  # overflows to inf
    ("rrf:k=61,k=5", "k is given twice"),
    ("weighted:disc=0.3,disc=0.4", "disc is given twice"),
    ("weighted:k=5", "k= does not apply to weighted"),
    ("dbsf:disc=0.5", "disc= does not apply to dbsf"),
    ("disc:gen=1", "gen= does not apply to disc"),
    ("gen:k=3", "k= does not apply to gen"),
    ("rrf:k=2.5", "k must be an integer"),
    ("rrf:k=0", "k must be >= 1"),
    ("weighted:disc=-1", "must be >= 0"),
    ("weighted:disc=0,gen=0", "both 0"),
    ("weighted:disc=1,,gen=1", "empty parameter"),
    ("mean:disc=1", "method must be one of"),
    ("weighted:w=1", "parameters are disc=W, gen=W, k=N"),
]


@pytest.mark.parametrize("text,why", BAD_FUSIONS, ids=[b for b, _ in BAD_FUSIONS])
def test_case1_fusion_parse_refuses_nonfinite_duplicate_and_unused_parameters(text, why):
    with pytest.raises(ValueError) as info:
        Fusion.parse(text)
    message = _one_line(info.value)
    assert repr(text) in message and why in message


def test_case1_fusion_constructor_refuses_nan_and_valid_strings_still_parse():
    for kwargs in ({"disc_weight": math.nan}, {"gen_weight": math.inf}, {"k": 2.0}):
        with pytest.raises(ValueError, match="finite|integer"):
            Fusion("rrf", **kwargs)
    # Weighted RRF is a real feature (the rank of each list is stretched by its weight):
    # "rrf:disc=0.5" is valid, as are the other documented forms.
    assert Fusion.parse("rrf:disc=0.5") == Fusion("rrf", disc_weight=0.5)
    assert Fusion.parse(" rrf : k=61 ") == Fusion("rrf", k=61)
    assert Fusion.parse("weighted:disc=0.3,gen=0.7") == Fusion("weighted", 0.3, 0.7)
    assert Fusion.parse("weighted:disc=1,gen=0") == Fusion("weighted", 1.0, 0.0)
    for text in ("rrf", "dbsf", "disc", "gen", "weighted:disc=0.3,gen=0.7", "rrf:disc=2,gen=1,k=5"):
        assert str(Fusion.parse(text)) == text


def test_case1_cli_reports_a_bad_fusion_in_one_line(capsys, tmp_path):
    code = main(["search", "x", "--fusion", "weighted:disc=nan", "--store", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "'weighted:disc=nan'" in err and "finite" in err


# -- case 2: filters ------------------------------------------------------------------------------

GOOD_FILTERS = [  # (the --filter strings, the spec they mean)
    (["page=3"], {"page": 3}),
    (["page=3.0"], {"page": 3.0}),
    (["page=-2"], {"page": -2}),
    (["score=2.5e0"], {"score": 2.5}),
    (["source=/d/a<b.pdf"], {"source": "/d/a<b.pdf"}),
    (["source=/d/c>d.pdf"], {"source": "/d/c>d.pdf"}),
    (["note=x<=3"], {"note": "x<=3"}),
    (["page=1|2"], {"page": [1, 2]}),
    (["modality=image|pdf_page"], {"modality": ["image", "pdf_page"]}),
    (['title="x|y"'], {"title": "x|y"}),
    (["title='3'"], {"title": "3"}),
    (['title="3"|x'], {"title": ["3", "x"]}),
    (['title=" spaced out "'], {"title": " spaced out "}),
    (["reviewed=true"], {"reviewed": True}),
    (["page>=1", "page<4"], {"page": {"gte": 1, "lt": 4}}),
    (["score>0.3", "score<=2.5"], {"score": {"gt": 0.3, "lte": 2.5}}),
    ([" page = 3 "], {"page": 3}),
]


@pytest.mark.parametrize("specs,expected", GOOD_FILTERS, ids=[" ".join(s) for s, _ in GOOD_FILTERS])
def test_case2_cli_filter_grammar(specs, expected):
    assert parse_filters(specs) == expected


BAD_FILTERS = [  # (the --filter strings, what the message must say)
    (["page"], "write FIELD=VALUE"),
    (["page==3"], "did you mean page=3"),
    (["page=<3"], "did you mean page<3"),
    (["page!=3"], "'!' is not an operator"),
    (["=3"], "no field name"),
    (["page="], "no value"),
    (["a b=3"], "not a field name"),
    (["page>=x"], "'x' is not a number"),
    (["page>=nan"], "'nan' is not a number"),
    (["page<1e999"], "beyond the range"),
    (["page=1|x"], 'quote the numbers: page="1"|x'),
    (["score=1.5|2.5"], "takes text or integers"),
    (["page=1||2"], "an empty value"),
    (['title="abc'], "unclosed quote"),
    (["title=it's"], "unclosed quote"),
    (["page=1", "page=2"], "given twice"),
    (["page=1", "page>0"], "already has the condition"),
    (["page>=1", "page>2"], "already has a lower bound"),
]


@pytest.mark.parametrize("specs,why", BAD_FILTERS, ids=[" ".join(s) for s, _ in BAD_FILTERS])
def test_case2_cli_filter_refusals(specs, why):
    with pytest.raises(CLIError) as info:
        parse_filters(specs)
    message = _one_line(info.value)
    assert f"--filter {specs[-1]!r}" in message and why in message


def _matches(payload: dict, flt: dict) -> bool:
    """Our reading of a filter spec, independent of the code under test."""
    for key, want in flt.items():
        have = payload.get(key)
        if isinstance(want, dict):
            ops = {"gte": lambda a, b: a >= b, "gt": lambda a, b: a > b, "lte": lambda a, b: a <= b,
                   "lt": lambda a, b: a < b}
            if have is None or not all(ops[op](have, b) for op, b in want.items()):
                return False
        elif isinstance(want, list):
            if have not in want:
                return False
        else:
            same_kind = type(have) is type(want) or (isinstance(want, float) and isinstance(have, (int, float)))
            if not same_kind or have != want:  # True == 1 in Python, not in a filter
                return False
    return True


@pytest.mark.parametrize("specs", [
    ["page=3"], ["page=3.0"], ["score=2.5"], ["source=/d/a<b.pdf"], ["source=/d/c>d.pdf"], ['title="x|y"'],
    ["title='3'"], ["page=1|2"], ["reviewed=true"], ["page>=1", "page<4"], ["score>0.3", "modality=image"],
])
def test_case2_cli_filters_find_what_they_say(filled, specs):
    flt = parse_filters(specs)
    if flt == {"reviewed": True} and isinstance(filled, EdgeStore):  # qdrant-edge-py reads True as 1
        with pytest.raises(ValueError, match="filter field 'reviewed': the embedded store .* cannot match booleans"):
            filled.count(flt)
        return
    payloads = [PAYLOADS[i % len(PAYLOADS)] for i in range(30)]
    expected = sum(_matches(p, flt) for p in payloads)
    assert expected > 0  # each filter selects something, so a misparse cannot pass as "nothing"
    assert filled.count(flt) == expected
    got = dict(filled.scroll(flt, list(flt)))
    assert len(got) == expected and all(_matches(p, flt) for p in got.values())
    hits = filled.query([VectorQuery("disc", _unit(np.ones(DIM)))], Fusion("disc"), limit=30, prefetch_limit=30, flt=flt)
    assert len(hits) == expected


BAD_STORE_FILTERS = [  # (filter, what the message must say) - reach no engine
    ({"page": None}, "None is not a filter value"),
    ({"page": {"eq": 3}}, "a dict is a range"),
    ({"page": {"gte": {"lt": 3}}}, "a range bound must be a number"),
    ({"page": {"gte": "3"}}, "a range bound must be a number"),
    ({"page": {"gte": True}}, "a range bound must be a number"),
    ({"page": {"lt": math.nan}}, "finite numbers only"),
    ({"page": {}}, "an empty range"),
    ({"page": math.inf}, "finite numbers only"),
    ({"page": [1, "2"]}, "mixes str and int"),
    ({"page": [[1, 2]]}, "only str or only int values, not a list"),
    ({"page": [None]}, "only str or only int values, not None"),
    ({"page": [1.5]}, "only str or only int values, not a float"),
    ({"page": [True]}, "only str or only int values, not a bool"),
    ({"page": []}, "empty any-of list"),
    ({"page": b"3"}, "a bytes"),
    ({"page": object()}, "a object"),
]


@pytest.mark.parametrize("flt,why", BAD_STORE_FILTERS, ids=[w for _, w in BAD_STORE_FILTERS])
def test_case2_store_refuses_unsupported_filter_values(filled, flt, why):
    q = [VectorQuery("disc", _unit(np.ones(DIM)))]
    calls = [lambda: filled.count(flt), lambda: list(filled.scroll(flt, [])), lambda: filled.delete_where(flt),
             lambda: filled.query(q, Fusion("disc"), 5, 5, flt)]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        message = _one_line(info.value)
        assert "filter field 'page'" in message and why in message
    assert filled.count() == 30  # nothing was deleted


def test_case2_store_refuses_a_non_string_field_name(filled):
    with pytest.raises(ValueError, match="field names must be non-empty strings, got 3"):
        filled.count({3: "x"})


def test_case2_cli_filter_error_is_one_line(capsys, tmp_path):
    code = main(["search", "x", "--filter", "page==3", "--store", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--filter 'page==3'" in err and "did you mean page=3" in err


# -- case 3: non-finite vectors -------------------------------------------------------------------

@pytest.mark.parametrize("using,bad", [("disc", math.nan), ("gen", math.inf), ("disc", -math.inf), ("gen", 1e39)],
                         ids=["nan", "inf", "-inf", "beyond-float32"])
def test_case3_non_finite_query_vector_is_refused(filled, using, bad):
    vector = np.full(DIM, 0.1, dtype=np.float64)
    vector[2] = bad
    good = VectorQuery("disc" if using == "gen" else "gen", _unit(np.ones(DIM)))
    for queries, fusion in (([VectorQuery(using, vector)], Fusion(using)), ([good, VectorQuery(using, vector)], Fusion("rrf"))):
        with pytest.raises(NonFiniteVectorError) as info:
            filled.query(queries, fusion, limit=5, prefetch_limit=10)
        message = _one_line(info.value)
        assert f"query vector {len(queries) - 1} ({using})" in message and "non-finite" in message
    assert isinstance(info.value, ValueError)


def test_case3_wrong_size_query_vector_is_refused(filled):
    with pytest.raises(NonFiniteVectorError, match=r"query vector 0 \(disc\) has shape \(5,\), .* have 8 values"):
        filled.query([VectorQuery("disc", np.ones(5))], Fusion("disc"), 5, 5)


@pytest.mark.parametrize("kind", STORES)
def test_case3_upsert_refuses_non_finite_point_vectors_naming_the_id(tmp_path, kind):
    store = _open(kind, tmp_path)
    points = _points(6)
    points[2].vectors["gen"] = np.array([math.nan] + [0.1] * (DIM - 1))
    points[4].vectors["disc"] = np.array([math.inf] * DIM)
    with pytest.raises(NonFiniteVectorError) as info:
        store.upsert(points)
    message = _one_line(info.value)
    assert f"point {points[2].id}: vector 'gen'" in message and "(and 1 more point(s))" in message
    assert "nothing of this upsert was written" in message
    assert info.value.point_ids == [points[2].id, points[4].id]
    assert store.count() == 0  # nothing written
    good = [p for p in points if p.id not in info.value.point_ids]
    store.upsert(good)
    assert store.existing_ids([p.id for p in points]) == {p.id for p in good}
    store.close()


# -- case 4: a checkpoint whose context is not longer than max_new_tokens ---------------------------

def _tiny(tmp_path, positions: int):
    from ume_retriever.model.tiny import TinyModelSpec, build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path / f"ctx{positions}", spec=TinyModelSpec(max_position_embeddings=positions),
                                 seed=0)


def _encoder_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ume_retriever.model.encoder"
            and r.levelno == logging.WARNING]


def test_case4_short_context_fits_max_new_tokens_with_one_warning(tmp_path, caplog, encoder):
    import torch

    from ume_retriever import UMEEncoder

    caplog.set_level(logging.WARNING)
    enc = UMEEncoder.from_pretrained(_tiny(tmp_path, 2048), device="cpu", dtype=torch.float32)  # max_new_tokens 2048
    assert (enc.max_new_tokens, enc.preparer.max_input_tokens) == (1024, 1024)
    [warning] = _encoder_warnings(caplog)
    assert "context of 2048 positions" in warning and "max_new_tokens=2048" in warning
    assert "using max_new_tokens=1024 and max_input_tokens=1024" in warning and "N + M <= 2048" in warning
    r = enc.encode(["a red circle", "x" * 50], mode="disc")
    assert [x.error for x in r] == [None, None] and r[0].disc.shape == (64,)
    g = enc.encode("a red circle", mode="gen", max_new_tokens=4)
    assert g.error is None and g.gen is not None

    # a context that cannot hold half for the input: the input keeps the shortest prompt's room
    shortest = len(encoder.prepare("x"))  # the same tokenizer and template, a 32k context
    caplog.clear()
    small = UMEEncoder.from_pretrained(_tiny(tmp_path, shortest + 40), device="cpu", dtype=torch.float32)
    assert (small.max_new_tokens, small.preparer.max_input_tokens) == (40, shortest)
    assert len(_encoder_warnings(caplog)) == 1 and small.encode("x").error is None

    # both given and too long together: the reasoning cap gives way, the input limit is kept
    caplog.clear()
    both = UMEEncoder.from_pretrained(_tiny(tmp_path, 2048), device="cpu", dtype=torch.float32,
                                      max_new_tokens=2048, max_input_tokens=1500)
    assert (both.max_new_tokens, both.preparer.max_input_tokens) == (548, 1500)
    assert len(_encoder_warnings(caplog)) == 1

    # a context that fits leaves everything as asked, silently
    caplog.clear()
    fits = UMEEncoder.from_pretrained(_tiny(tmp_path, 2048), device="cpu", dtype=torch.float32, max_new_tokens=512)
    assert (fits.max_new_tokens, fits.preparer.max_input_tokens) == (512, 1536) and not _encoder_warnings(caplog)


def test_case4_context_too_small_for_any_prompt_is_a_load_error(tmp_path, encoder):
    import torch

    from ume_retriever import UMEEncoder
    from ume_retriever.errors import CheckpointError

    shortest = len(encoder.prepare("x"))
    with pytest.raises(CheckpointError) as info:
        UMEEncoder.from_pretrained(_tiny(tmp_path, shortest), device="cpu", dtype=torch.float32)
    message = _one_line(info.value)
    assert f"context of {shortest} positions" in message and f"shortest prompt ({shortest} tokens)" in message
    with pytest.raises(ValueError, match="max_input_tokens=2048 leaves no room for reasoning"):
        UMEEncoder.from_pretrained(_tiny(tmp_path, 2048), device="cpu", dtype=torch.float32, max_input_tokens=2048)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        UMEEncoder.from_pretrained(_tiny(tmp_path, 2048), device="cpu", dtype=torch.float32, max_new_tokens=0)


# -- case 5: the Edge store's schema file -----------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-a-schema"])
def test_case5_truncated_schema_file_gives_a_clear_error(tmp_path, capsys, damage):
    store = EdgeStore(tmp_path, SCHEMA)
    store.upsert(_points(12))
    store.close()
    schema_file = tmp_path / "ume" / SCHEMA_FILE
    full = schema_file.read_text()
    schema_file.write_bytes({"truncated": full[: len(full) // 2].encode(), "garbage": b"\xff\x00\x13",
                             "not-a-schema": b"[1, 2]"}[damage])
    for opening in (lambda: EdgeStore(tmp_path, SCHEMA), lambda: recorded_schema(tmp_path)):
        with pytest.raises(StoreCorruptError) as info:
            opening()
        message = _one_line(info.value)
        assert str(schema_file) in message and f"delete the folder {tmp_path / 'ume'}" in message
        assert ("truncated or corrupt" if damage != "not-a-schema" else "not a ume schema") in message
    # the error gives the content to write back, and doing so recovers the store, points intact
    with pytest.raises(StoreCorruptError) as info:
        EdgeStore(tmp_path, SCHEMA)
    expected = json.dumps(SCHEMA.as_dict())
    assert f"write this content back: {expected}." in str(info.value)
    schema_file.write_text(expected)
    with EdgeStore(tmp_path, SCHEMA) as again:
        assert again.count() == 12
    code = main(["info", "--store", str(tmp_path)])  # and the command line reads it again
    assert code == 0 and '"items"' not in capsys.readouterr().err


def test_case5_killed_schema_writer_leaves_no_partial_file(tmp_path):
    code = (
        "from ume_retriever.store import StoreSchema\nfrom ume_retriever.store.edge import EdgeStore\n"
        f"EdgeStore({str(tmp_path)!r}, StoreSchema(vector_size={DIM}, model='tiny-test'))\nprint('not killed')\n"
    )
    env = {**os.environ, "UME_FAULT": "inside_store_creation"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    root = tmp_path / "ume"
    assert not (root / SCHEMA_FILE).exists()  # no partial schema file where openers look
    [temp] = root.glob(f".{SCHEMA_FILE}.tmp-*")  # the write really was cut: half of it in the temp file
    content = json.dumps(SCHEMA.as_dict(), indent=2)
    assert temp.read_text() == content[: len(content.encode()) // 2]
    # the next open sees an interrupted creation (empty shard, no schema file) and finishes it
    with EdgeStore(tmp_path, SCHEMA) as store:
        assert store.count() == 0
        store.upsert(_points(3))
    assert json.loads((root / SCHEMA_FILE).read_text()) == SCHEMA.as_dict()
    assert not list(root.glob(f".{SCHEMA_FILE}.tmp-*"))
    with EdgeStore(tmp_path, SCHEMA) as store:
        assert store.count() == 3


def test_case5_shard_with_points_but_no_schema_file_is_refused_not_removed(tmp_path):
    with EdgeStore(tmp_path, SCHEMA) as store:
        store.upsert(_points(5))
    (tmp_path / "ume" / SCHEMA_FILE).unlink()
    with pytest.raises(SchemaMismatchError) as info:
        EdgeStore(tmp_path, SCHEMA)
    assert "holds 5 point(s)" in _one_line(info.value) and f"delete {tmp_path / 'ume'}" in str(info.value)
    assert (tmp_path / "ume" / "shard").is_dir()


# -- case 6: two writers on one qdrant-client collection ----------------------------------------------

def _two_writers(make):
    a, b = make("writer-a"), make("writer-b")
    try:
        a.upsert(_points(10, "a"))
        for write in (lambda: b.upsert(_points(5, "b")), lambda: b.delete_ids(_ids(10, "a")),
                      lambda: b.delete_where({"source": "/d/plain.pdf"})):
            with pytest.raises(WriterLeaseError) as info:
                write()
            message = _one_line(info.value)
            assert "being written by writer writer-a" in message and "lease expires at 20" in message
            assert "Readers are not blocked" in message
        # readers are never blocked, and writer-a's fresh points are all there
        assert b.count() == 10 and b.existing_ids(_ids(10, "a")) == set(_ids(10, "a"))
        assert len(b.query([VectorQuery("disc", _unit(np.ones(DIM)))], Fusion("disc"), 10, 10)) == 10
        a.upsert(_points(3, "a2"))  # the holder keeps writing
        a.close()  # releases the lease
        b.upsert(_points(5, "b"))
        assert b.count() == 18
    finally:
        a.close()
        b.close()


def test_case6_second_writer_gets_a_lease_error_readers_are_not_blocked():
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    _two_writers(lambda who: QdrantStore(SCHEMA, client=client, writer_id=who))
    meta = client.get_collection("ume").config.metadata
    assert meta["model"] == "tiny-test" and meta["ume_writer_lease"]["owner"] == ""  # released at close
    client.close()


def test_case6_expired_lease_is_taken_over_and_the_old_writer_is_told():
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    a = QdrantStore(SCHEMA, client=client, writer_id="writer-a", lease_seconds=3)
    b = QdrantStore(SCHEMA, client=client, writer_id="writer-b", lease_seconds=60)
    a.upsert(_points(4, "a"))
    with pytest.raises(WriterLeaseError):
        b.upsert(_points(2, "b"))
    time.sleep(3.1)  # writer-a paused longer than its lease
    b.upsert(_points(2, "b"))
    with pytest.raises(WriterLeaseError) as info:
        a.upsert(_points(4, "late"))
    assert "writer writer-a) lost its writer lease" in _one_line(info.value) and "to writer writer-b" in str(info.value)
    assert b.count() == 6 and not b.existing_ids(_ids(4, "late"))  # the late write did not land
    a.close()
    assert client.get_collection("ume").config.metadata["ume_writer_lease"]["owner"] == "writer-b"  # a did not free b's
    b.close()
    client.close()


def test_case6_lease_on_a_qdrant_server():
    url = os.environ.get("QDRANT_URL")
    if not url:
        pytest.skip("QDRANT_URL is not set: no Qdrant server here, the server writer lease is not tested")
    name = f"ume-lease-{uuid.uuid4().hex[:8]}"
    stores = []

    def make(who):
        stores.append(QdrantStore(SCHEMA, url=url, api_key=os.environ.get("QDRANT_API_KEY"), collection=name,
                                  writer_id=who))
        return stores[-1]

    try:
        _two_writers(make)
    finally:
        from qdrant_client import QdrantClient

        QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY")).delete_collection(name)
