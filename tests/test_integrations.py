"""UMERetriever, the LangChain and LlamaIndex classes (standard suites + values checked against the
encoder and the index), and previews. Real framework classes, real Qdrant Edge store, real files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pymupdf
import pytest
from PIL import Image, ImageDraw

from helpers import write_mp4
from ume_retriever import Item, UMEIndex
from ume_retriever.errors import BatchEncodeError
from ume_retriever.retriever import UMERetriever as CoreRetriever

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_tests.integration_tests import EmbeddingsIntegrationTests, RetrieversIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import EmbeddingsUnitTests  # noqa: E402

from ume_retriever.integrations import langchain as lc  # noqa: E402
from ume_retriever.integrations import llama_index as li  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("icorpus")
    doc = pymupdf.open()
    for text in ("alpha page about circles", "beta page about squares"):
        doc.new_page(width=200, height=260).insert_text((20, 40), text, fontsize=12)
    doc.save(str(root / "deck.pdf"))
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((8, 8, 40, 40), fill="red")
    img.save(root / "red.png")
    Image.new("RGB", (64, 64), "blue").save(root / "blue.png")
    (root / "notes.txt").write_text("a green triangle above a yellow square")
    write_mp4(root / "ramp.mp4", num_frames=12)
    return root


@pytest.fixture(scope="module")
def shared_index(encoder, corpus, tmp_path_factory):
    index = UMEIndex(encoder, tmp_path_factory.mktemp("istore"))
    report = index.add([corpus])
    assert not report.failed and index.count() == 6
    yield index
    index.close()


def encoder_kwargs() -> dict:
    return {"device": "cpu", "dtype": "float32", "max_new_tokens": 12}


# -- LangChain standard suites -------------------------------------------------------------


class _TinyModel:
    @pytest.fixture(autouse=True)
    def _checkpoint(self, tiny_ckpt):
        type(self).checkpoint = str(tiny_ckpt)

    @property
    def embeddings_class(self):
        return lc.UMEEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"model": self.checkpoint, "encoder_kwargs": encoder_kwargs()}


class TestLangChainEmbeddingsUnit(_TinyModel, EmbeddingsUnitTests):
    pass


class TestLangChainEmbeddingsIntegration(_TinyModel, EmbeddingsIntegrationTests):
    pass


class TestLangChainRetrieverIntegration(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _index(self, shared_index):
        type(self).index = shared_index

    @property
    def retriever_constructor(self):
        return lc.UMERetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"index": self.index, "k": 4}

    @property
    def retriever_query_example(self) -> str:
        return "a red circle"


# -- values -----------------------------------------------------------------------------------


def test_langchain_embeddings_are_the_encoders_vectors(tiny_ckpt, encoder, corpus):
    emb = lc.UMEEmbeddings(model=str(tiny_ckpt), encoder_kwargs=encoder_kwargs(), query_instruction="Find it: ")
    docs = emb.embed_documents(["a red circle", "a blue square"])
    ref = encoder.encode([Item(text="a red circle"), Item(text="a blue square")], mode="disc")
    assert all(type(x) is float for x in docs[0])
    np.testing.assert_allclose(docs, [r.disc for r in ref], atol=1e-5)
    q = emb.embed_query("a red circle")
    np.testing.assert_allclose(q, encoder.encode(Item(text="a red circle", instruction="Find it: ")).disc, atol=1e-5)
    assert not np.allclose(q, docs[0], atol=1e-3)  # the instruction is in the prompt
    np.testing.assert_allclose(emb.embed_image(corpus / "red.png"),
                               encoder.encode(Item(image=corpus / "red.png")).disc, atol=1e-5)
    np.testing.assert_allclose(emb.embed_video(corpus / "ramp.mp4"),
                               encoder.encode(Item(video=corpus / "ramp.mp4")).disc, atol=1e-5)
    gen = lc.UMEEmbeddings(model=str(tiny_ckpt), encoder_kwargs=encoder_kwargs(), mode="gen")
    assert gen.encoder is emb.encoder  # one load per checkpoint and settings in a process
    np.testing.assert_allclose(gen.embed_documents(["a red circle"])[0],
                               encoder.encode("a red circle", mode="gen").gen, atol=1e-5)
    np.testing.assert_allclose(asyncio.run(emb.aembed_documents(["a red circle"]))[0], docs[0], atol=1e-6)


def test_a_bad_image_fails_loudly_without_losing_the_others(tiny_ckpt, corpus, tmp_path):
    emb = lc.UMEEmbeddings(model=str(tiny_ckpt), encoder_kwargs=encoder_kwargs())
    with pytest.raises(BatchEncodeError) as info:
        emb.embed_images([corpus / "red.png", tmp_path / "missing.png", corpus / "blue.png"])
    err = info.value
    assert "1 of 3" in str(err) and "missing.png" in str(err)
    assert [r.ok for r in err.results] == [True, False, True] and err.results[2].disc is not None
    with pytest.raises(TypeError, match="strings"):
        emb.embed_documents(["fine", 3])


def test_langchain_retriever_documents_match_the_index(shared_index, corpus):
    retriever = lc.UMERetriever(index=shared_index, k=3, fusion="weighted")
    docs = retriever.invoke("a red circle")
    hits = shared_index.search("a red circle", 3, fusion="weighted")
    assert [d.id for d in docs] == [h.id for h in hits]
    for d, h in zip(docs, hits):
        m = d.metadata
        assert (m["score"], m["disc_score"], m["gen_score"], m["reasoning"]) == (h.score, h.disc_score, h.gen_score,
                                                                                  h.reasoning)
        assert m["source"] == h.source and m["modality"] == h.payload["modality"]
    pages = retriever.invoke("page", k=5, filter={"modality": "pdf_page"})
    assert sorted(d.metadata["page"] for d in pages) == [1, 2]
    page2 = next(d for d in pages if d.metadata["page"] == 2)
    assert page2.page_content == "beta page about squares"
    assert Image.open(page2.metadata["image_path"]).size == (267, 347)  # 200x260 pt at 96 dpi
    by_image = retriever.invoke("", image=corpus / "blue.png", fusion="disc", k=1)
    assert Path(by_image[0].metadata["source"]).name == "blue.png"
    assert by_image[0].metadata["disc_score"] == pytest.approx(1.0, abs=1e-5)
    assert by_image[0].metadata["image_path"] == str(corpus / "blue.png")


def test_previews_are_the_page_and_the_middle_frame(shared_index, corpus):
    from ume_retriever.previews import preview_path

    hits = {(Path(h.source).name, h.page): h for h in shared_index.search("x", 10, fusion="disc")}
    page = Image.open(preview_path(hits[("deck.pdf", 1)].payload)).convert("RGB")
    with pymupdf.open(corpus / "deck.pdf") as doc:  # rendered independently
        pix = doc.load_page(0).get_pixmap(matrix=pymupdf.Matrix(96 / 72, 96 / 72), alpha=False)
    expected = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
    assert np.array_equal(np.asarray(page), np.asarray(expected))
    frame = np.asarray(Image.open(preview_path(hits[("ramp.mp4", None)].payload)).convert("L"), dtype=float)
    assert abs(frame.mean() - 60) < 8  # frame i of the ramp has brightness 10 * i; 1.2 s at 10 fps -> frame 6
    assert preview_path(hits[("notes.txt", None)].payload) is None


def test_llama_index_embedding_batches_text_and_images(tiny_ckpt, encoder, corpus):
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.schema import ImageNode, TextNode

    emb = li.UMEEmbedding(model=str(tiny_ckpt), encoder_kwargs=encoder_kwargs(), embed_batch_size=2)
    texts = ["a red circle", "a blue square", "a green triangle"]
    ref = [r.disc for r in encoder.encode(texts, mode="disc")]
    np.testing.assert_allclose(emb.get_text_embedding_batch(texts), ref, atol=1e-5)
    images = [str(corpus / "red.png"), str(corpus / "blue.png")]
    img_ref = [encoder.encode(Item(image=Path(p))).disc for p in images]
    np.testing.assert_allclose(emb.get_image_embedding_batch(images), img_ref, atol=1e-5)
    np.testing.assert_allclose(asyncio.run(emb.aget_image_embedding_batch(images)), img_ref, atol=1e-5)
    np.testing.assert_allclose(asyncio.run(emb.aget_query_embedding("a red circle")), ref[0], atol=1e-5)
    nodes = IngestionPipeline(transformations=[emb]).run(
        nodes=[TextNode(text="a green triangle"), ImageNode(image_path=images[1])])
    np.testing.assert_allclose(nodes[0].embedding, ref[2], atol=1e-5)
    np.testing.assert_allclose(nodes[1].embedding, img_ref[1], atol=1e-5)


def test_llama_index_retriever_nodes_and_image_queries(shared_index, corpus):
    from llama_index.core.schema import ImageNode, QueryBundle, TextNode

    retriever = li.UMERetriever(index=shared_index, similarity_top_k=6, fusion="rrf")
    results = retriever.retrieve("a red circle")
    hits = shared_index.search("a red circle", 6, fusion="rrf")
    assert [r.node.node_id for r in results] == [h.id for h in hits]
    assert [r.score for r in results] == pytest.approx([h.score for h in hits])
    for r in results:
        kind = r.node.metadata["modality"]
        assert isinstance(r.node, TextNode if kind == "text" else ImageNode)
        if kind != "text":
            assert Path(r.node.image_path).is_file()
        assert "disc_score" not in r.node.get_content(metadata_mode="llm")
    mixed = retriever.retrieve(QueryBundle("which shape is this", image_path=str(corpus / "red.png")))
    expected = shared_index.search(Item(text="which shape is this", image=str(corpus / "red.png")), 6, fusion="rrf")
    assert [r.node.node_id for r in mixed] == [h.id for h in expected]
    assert [r.node.node_id for r in mixed] != [r.node.node_id for r in results]  # the image is used
    only_image = li.UMERetriever(index=shared_index, similarity_top_k=1, fusion="disc").retrieve(
        QueryBundle("", image_path=str(corpus / "red.png")))
    assert Path(only_image[0].node.metadata["source"]).name == "red.png"
    again = asyncio.run(retriever.aretrieve("a red circle"))
    assert [r.node.node_id for r in again] == [h.id for h in hits]


def test_llama_index_query_engine_with_mock_llm(shared_index):
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine

    retriever = li.UMERetriever(index=shared_index, similarity_top_k=2, fusion="disc")
    engine = RetrieverQueryEngine.from_args(retriever, llm=MockLLM(max_tokens=8))
    response = engine.query("a green triangle")
    hits = shared_index.search("a green triangle", 2, fusion="disc")
    assert [n.node.node_id for n in response.source_nodes] == [h.id for h in hits]
    assert str(response).strip()


def test_core_retriever_and_framework_switch(tiny_ckpt, corpus, tmp_path):
    retriever = CoreRetriever.from_pretrained(tiny_ckpt, store=tmp_path / "s", k=2, fusion="weighted:disc=0.7,gen=0.3",
                                              encoder_kwargs=encoder_kwargs())
    with retriever:
        report = retriever.add([corpus / "red.png", corpus / "notes.txt", corpus / "deck.pdf"])
        assert len(report.indexed) == 4
        hits = retriever.retrieve("a red circle")
        assert len(hits) == 2
        for h in hits:
            assert h.score == pytest.approx(0.7 * h.disc_score + 0.3 * h.gen_score, abs=1e-5)
        assert [d.id for d in retriever.as_langchain().invoke("a red circle")] == [h.id for h in hits]
        assert [n.node.node_id for n in retriever.as_llama_index().retrieve("a red circle")] == [h.id for h in hits]
        with_image = retriever.retrieve("a red circle", image=corpus / "red.png", k=1, fusion="disc")
        ref = retriever.index.search(Item(text="a red circle", image=corpus / "red.png"), 1, fusion="disc")
        assert with_image[0].id == ref[0].id
        assert retriever.delete(corpus / "deck.pdf") == 2 and retriever.index.count() == 2
        with pytest.raises(ValueError, match="needs text, an image"):
            retriever.retrieve()
