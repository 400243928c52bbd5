"""``ume serve`` for real: the command as a subprocess (local Ray, Ray Serve, a tiny checkpoint) on
a free loopback port, called with the official ``openai`` client, httpx and ``UMEClient``.

Expected values come from an in-process ``UMEEncoder``/``UMEIndex`` over the same checkpoint
and the same store (built here, then handed to the service).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from langchain_tests.integration_tests import EmbeddingsIntegrationTests, RetrieversIntegrationTests  # noqa: E402

from helpers import ROOT, cosine, free_port, make_pdf  # noqa: E402
from ume_retriever import Item, UMEEncoder  # noqa: E402
from ume_retriever.client import ServiceError, UMEClient, image_data_url  # noqa: E402
from ume_retriever.index import UMEIndex  # noqa: E402
from ume_retriever.integrations import langchain as lc  # noqa: E402
from ume_retriever.retriever import UMERetriever  # noqa: E402

# one worker runs these (one service at a time); they start early, being slow
pytestmark = [pytest.mark.xdist_group("serve"), pytest.mark.slow]

KEY = "test-key-0123456789"
MAX_NEW_TOKENS = 12
QUERIES = ["a red circle", "a blue square", "page about triangles"]


def shape_image(path: Path, colour: str, shape: str) -> Path:
    img = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(img)
    box = (20, 20, 76, 76)
    draw.ellipse(box, fill=colour) if shape == "circle" else draw.rectangle(box, fill=colour)
    img.save(path)
    return path


class Service:
    """``ume serve ARGS`` in a subprocess; ``ready`` once its line says so."""

    def __init__(self, *args: str, cwd: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "RAY_DEDUP_LOGS": "0"}
        env.pop("UME_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "ume_retriever.cli", "serve", "--port", str(self.port),
                                      *args], cwd=cwd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True)
        self.log: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(240) or self.proc.poll() is not None:
            self.proc.kill()
            raise AssertionError("ume serve did not start:\n" + "".join(self.log[-60:]))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            if "ume serve: ready on" in line:
                self._ready.set()

    def terminate(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("ume serve did not stop on SIGTERM:\n" + "".join(self.log[-40:]))


@pytest.fixture(scope="module")
def local_encoder(tiny_ckpt):
    return UMEEncoder.from_pretrained(tiny_ckpt, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_ckpt, local_encoder):
    """A corpus indexed in process, the expected searches, then the service over that store."""
    work = tmp_path_factory.mktemp("serve")
    root = work / "corpus"
    root.mkdir()
    for colour in ("red", "blue", "green"):
        for shape in ("circle", "square"):
            shape_image(root / f"{colour}_{shape}.png", colour, shape)
    make_pdf(root / "notes.pdf", ["page about triangles", "page about stars"])
    store = work / "store"
    with UMEIndex(local_encoder, store) as index:
        report = index.add([root])
        assert not report.failed
        expected = {(q, f): [(h.id, h.score) for h in index.search(q, 5, fusion=f)] for q in QUERIES
                    for f in ("rrf", "disc")}
        probe = shape_image(work / "probe.png", "red", "circle")
        expected[("image", "rrf")] = [(h.id, h.score) for h in index.search(Item(image=probe), 5, fusion="rrf")]
        points = index.count()
    service = Service("--model", str(tiny_ckpt), "--store", str(store), "--api-key", KEY, "--allow-root", str(root),
                      "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-body-mb", "1", "--max-inputs", "8",
                      "--max-k", "50", cwd=work)
    yield {"url": service.url, "root": root, "work": work, "expected": expected, "probe": probe, "points": points,
           "model": str(tiny_ckpt), "service": service}
    assert service.terminate() == 0, "".join(service.log[-40:])


@pytest.fixture
def client(served):
    with UMEClient(served["url"], KEY) as c:
        yield c


def _openai(served, key: str = KEY):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_embeddings_equal_the_encoder(served, local_encoder):
    texts = ["a red circle", "a blue square on white", "stars"]
    want = local_encoder.encode(texts, mode="disc")
    oai = _openai(served)
    for fmt in (None, "float", "base64"):  # None: the client asks for base64 and decodes it itself
        kwargs = {"encoding_format": fmt} if fmt else {}
        got = oai.embeddings.create(model=served["model"], input=texts, **kwargs)
        assert [d.index for d in got.data] == [0, 1, 2]
        for d, w in zip(got.data, want):
            vector = np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding
            assert len(vector) == local_encoder.embedding_dim
            assert cosine(vector, w.disc) >= 0.9999
    tokenizer = local_encoder.processor.tokenizer
    assert got.usage.prompt_tokens == sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
    single = oai.embeddings.create(model=served["model"], input="stars")
    assert cosine(single.data[0].embedding, want[2].disc) >= 0.9999

    # extensions: gen vectors with their reasoning, image inputs as data URLs
    gen = oai.embeddings.create(model=served["model"], input=["a red circle"], extra_body={"mode": "gen"})
    want_gen = local_encoder.encode("a red circle", mode="gen")
    assert cosine(gen.data[0].embedding, want_gen.gen) >= 0.9999
    assert gen.data[0].model_extra["reasoning"] == want_gen.reasoning
    probe = served["probe"]
    body = {"model": served["model"], "input": [{"image": image_data_url(probe)},
                                                {"text": "a red circle", "image": image_data_url(probe)}]}
    got = httpx.post(served["url"] + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"},
                     timeout=120).json()
    want = local_encoder.encode([Item(image=Image.open(probe)), Item(text="a red circle", image=Image.open(probe))])
    for d, w in zip(got["data"], want):
        assert cosine(d["embedding"], w.disc) >= 0.9999


def test_one_bad_input_is_reported_and_the_others_are_embedded(served, client, local_encoder):
    bad = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # a PNG signature, then nothing decodable
    results = client.encode(["a red circle", bad, "stars"])
    assert results[1].error is not None and results[0].error is None and results[2].error is None
    want = local_encoder.encode(["a red circle", "stars"])
    assert cosine(results[0].disc, want[0].disc) >= 0.9999 and cosine(results[2].disc, want[1].disc) >= 0.9999
    with pytest.raises(openai.BadRequestError, match="input"):  # OpenAI semantics: the request fails, 400
        _openai(served).embeddings.create(model=served["model"], input=["ok", ""])


def test_search_equals_the_in_process_index(served, client):
    for (query, fusion), want in served["expected"].items():
        if query == "image":
            hits = client.search(None, 5, image=served["probe"], fusion=fusion)
        else:
            hits = client.search(query, 5, fusion=fusion)
        assert [h.id for h in hits] == [i for i, _ in want], (query, fusion)
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in want], rtol=1e-5, atol=1e-6)
    # the facade and the LangChain retriever over the service give the same ranking
    retriever = UMERetriever.from_url(served["url"], KEY, k=5)
    assert [h.id for h in retriever.retrieve("a red circle")] == [i for i, _ in served["expected"][("a red circle", "rrf")]]
    docs = retriever.as_langchain().invoke("a blue square", k=5, fusion="disc")
    assert [d.id for d in docs] == [i for i, _ in served["expected"][("a blue square", "disc")]]
    assert docs[0].metadata["source"].startswith(str(served["root"]))
    filtered = client.search("page", 5, fusion="disc", filter={"modality": "pdf_page"})
    assert filtered and all(h.payload["modality"] == "pdf_page" for h in filtered)


def test_llama_index_over_the_service(served, local_encoder):
    from llama_index.core.schema import QueryBundle

    from ume_retriever.integrations import llama_index as li

    embed = li.UMEEmbedding(base_url=served["url"], api_key=KEY)
    texts = ["a red circle", "stars"]
    for got, want in zip(embed.get_text_embedding_batch(texts), local_encoder.encode(texts)):
        assert cosine(got, want.disc) >= 0.9999
    got = embed.get_image_embedding(str(served["probe"]))
    assert cosine(got, local_encoder.encode(Item(image=Image.open(served["probe"]))).disc) >= 0.9999
    retriever = UMERetriever.from_url(served["url"], KEY, k=5).as_llama_index()
    nodes = retriever.retrieve(QueryBundle("", image_path=str(served["probe"])))
    assert [n.node.id_ for n in nodes] == [i for i, _ in served["expected"][("image", "rrf")]]


def test_errors_have_their_status_and_the_service_keeps_serving(served):
    url, auth = served["url"], {"Authorization": f"Bearer {KEY}"}
    model = served["model"]

    def post(path: str, body=None, headers=auth, **kw) -> httpx.Response:
        return httpx.post(url + path, json=body, headers=headers, timeout=60, **kw)

    def status(response: httpx.Response) -> tuple[int, str]:
        return response.status_code, response.json()["error"]["type"]

    assert httpx.get(url + "/health").status_code == 200  # no key needed
    with pytest.raises(openai.AuthenticationError):
        _openai(served, key="wrong-key-123456").embeddings.create(model=model, input="x")
    assert status(post("/v1/search", {"query": "x"}, headers={})) == (401, "authentication_error")
    assert post("/v1/search", {"query": "x"}, headers={}).headers["www-authenticate"] == "Bearer"
    assert status(post("/v1/index", {"paths": ["/etc"]})) == (403, "permission_error")
    assert status(post("/v1/index", {"paths": [str(served["root"]) + "/../store"]}))[0] == 403
    assert status(post("/v1/index", {"paths": ["corpus"]}))[0] == 400  # relative
    big = "x" * (1024 * 1024 + 10)
    assert status(post("/v1/embeddings", {"model": model, "input": big})) == (413, "request_too_large")
    assert status(post("/v1/embeddings", {"model": model, "input": ["x"] * 9}))[0] == 413
    assert status(post("/v1/search", {"query": "x", "k": 0})) == (422, "invalid_request_error")
    assert status(post("/v1/search", {"query": "x", "k": 51}))[0] == 422
    assert status(post("/v1/search", {"query": "x", "kk": 3}))[0] == 422  # unknown field
    assert status(post("/v1/search", content=b"{not json", headers={**auth, "content-type": "application/json"}))[0] == 422
    assert status(post("/v1/search", {"query": "x", "fusion": "bogus"}))[0] == 400
    assert status(post("/v1/search", {"query": "x", "filter": {"page": {"near": 3}}}))[0] == 400
    assert status(post("/v1/search", {"image": "data:image/png;base64,@@@"}))[0] == 400
    assert status(post("/v1/embeddings", {"model": "other-model", "input": "x"})) == (404, "not_found_error")
    assert status(post("/v1/embeddings", {"model": model, "input": [1, 2, 3]}))[0] == 400
    assert status(post("/v1/nowhere", {}))[0] == 404
    r = httpx.request("DELETE", url + "/v1/sources", json={"source": "/never/indexed.pdf"}, headers=auth)
    assert status(r) == (404, "not_found_error")
    # still serving, and right
    got = _openai(served).embeddings.create(model=model, input="a red circle")
    assert len(got.data[0].embedding) > 0
    assert httpx.get(url + "/health").json()["points"] == served["points"]


def test_index_upload_delete_and_async_client(served, client, tmp_path):
    import asyncio

    extra = shape_image(served["root"] / "purple_circle.png", "purple", "circle")
    report = client.add([str(served["root"])])
    assert [e.source for e in report.indexed] == [str(extra)] and len(report.unchanged) == served["points"]
    upload = shape_image(tmp_path / "orange_square.png", "orange", "square")
    report = client.upload([upload])
    (entry,) = report.indexed
    assert entry.source.endswith("orange_square.png") and Path(entry.source).is_file()
    assert client.upload([upload]).unchanged  # the same bytes: nothing new

    async def run():
        async with UMEClient(served["url"], KEY) as ac:
            hits, vectors = await asyncio.gather(ac.asearch(None, 1, image=upload, fusion="disc"),
                                                 ac.aembed(["a red circle"]))
            return hits, vectors, await ac.adelete(entry.source), await ac.ahealth()

    hits, vectors, deleted, health = asyncio.run(run())
    assert hits[0].source == entry.source
    assert cosine(vectors[0], client.embed(["a red circle"])[0]) >= 0.9999
    assert deleted == 1 and health["points"] == served["points"] + 1
    assert client.delete(str(extra)) == 1
    with pytest.raises(ServiceError) as err:
        client.delete(str(extra))
    assert err.value.status == 404


def test_staged_ingest_is_backfilled_by_the_service(served, client, tmp_path, local_encoder):
    later = shape_image(tmp_path / "teal_circle.png", "teal", "circle")
    report = client.upload([later], gen="later")
    assert report.gen_pending == 1
    source = report.indexed[0].source
    deadline = time.time() + 120
    while client.health()["gen_pending"] and time.time() < deadline:
        time.sleep(0.5)
    assert client.health()["gen_pending"] == 0, "the service's backfill did not run"
    (hit,) = client.search(None, 1, image=later, fusion="gen")
    want = local_encoder.encode(Item(image=Image.open(later)), mode="gen")
    assert hit.source == source and not hit.payload.get("gen_status")
    assert hit.payload["reasoning"] == want.reasoning and hit.gen_score == pytest.approx(1.0, abs=1e-4)
    assert client.delete(source) == 1


class _OnTheService:
    """The standard suites read their parameters from properties: hand them the service's URL."""

    @pytest.fixture(autouse=True)
    def _service(self, served):
        type(self).url = served["url"]


class TestServedEmbeddingsStandard(_OnTheService, EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self):
        return lc.UMEEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"base_url": self.url, "api_key": KEY}


class TestServedRetrieverStandard(_OnTheService, RetrieversIntegrationTests):
    @property
    def retriever_constructor(self):
        return lc.UMERetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"index": UMEClient(self.url, KEY), "k": 4, "fusion": "disc"}

    @property
    def retriever_query_example(self) -> str:
        return "a red circle"


def test_sigterm_mid_ingest_loses_nothing(tmp_path, tiny_ckpt, local_encoder):
    """SIGTERM while an index request runs: the service exits 0, and an ingest run again
    afterwards ends with exactly the points of one uninterrupted ingest."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(10):
        shape_image(root / f"img{i}.png", ("red", "blue", "green", "black", "gray")[i % 5], ("circle", "square")[i % 2])
    make_pdf(root / "doc.pdf", [f"page {i}" for i in range(4)])
    store = tmp_path / "store"
    service = Service("--model", str(tiny_ckpt), "--store", str(store), "--allow-root", str(root),
                      "--max-new-tokens", str(MAX_NEW_TOKENS), cwd=tmp_path)
    outcome: dict = {}

    def ingest() -> None:
        try:
            outcome["report"] = UMEClient(service.url).add([str(root)])
        except Exception as exc:  # noqa: BLE001 - cut off by the shutdown: allowed, must be re-runnable
            outcome["error"] = exc

    thread = threading.Thread(target=ingest)
    thread.start()
    time.sleep(1.5)  # the request is in flight (an ingest of 14 items takes longer)
    assert service.terminate() == 0, "".join(service.log[-40:])
    thread.join(30)
    with UMEIndex(local_encoder, store) as index:
        rerun = index.add([root])
        assert not rerun.failed
        got = {pid for pid, _ in index.store.scroll({"kind": "item"}, [])}
        assert index.count() == len(got) == 14
    with UMEIndex(local_encoder, tmp_path / "fresh") as fresh:
        fresh.add([root])
        want = {pid for pid, _ in fresh.store.scroll({"kind": "item"}, [])}
    assert got == want
