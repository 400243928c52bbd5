"""LlamaIndex: ``UMEEmbedding`` (a ``MultiModalEmbedding``) and ``UMERetriever`` (a
``BaseRetriever`` over a ``UMEIndex`` that honours ``QueryBundle.image_path``).

    from ume_retriever.integrations.llama_index import UMEEmbedding, UMERetriever
    embed_model = UMEEmbedding(model="zhibinlan/UME-R1-2B")
    retriever = UMERetriever(index=index, similarity_top_k=5)
    nodes = retriever.retrieve(QueryBundle("a bar chart", image_path="query.png"))

LlamaIndex keeps one dense vector per node, and its Qdrant store one dense (+ one sparse)
vector: the two-vector store and the fused search are ``UMEIndex``'s; this retriever adapts
them. Async methods run the sync ones in a worker thread (the encoder serialises model calls).
"""

from __future__ import annotations

import asyncio
from typing import Any, List, Literal, Sequence

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.embeddings import MultiModalEmbedding
from llama_index.core.schema import BaseNode, ImageNode, MetadataMode, NodeWithScore, QueryBundle, TextNode
from pydantic import Field, PrivateAttr, SecretStr

from ..fusion import Fusion
from ..inputs.item import Item
from ..inputs.query import build_query
from ..model.protocol import EncoderLike
from ..previews import preview_path
from .embedder import embed_as_floats, shared_encoder
from .hits import hit_metadata, hit_text

__all__ = ["UMEEmbedding", "UMERetriever"]

Embedding = List[float]
# Shown to an LLM: where the hit is from and what the model reasoned; not ids and scores.
_HIDDEN_FROM_LLM = ["id", "score", "disc_score", "gen_score", "image_path", "gen_outcome", "locator", "model",
                    "revision"]


class UMEEmbedding(MultiModalEmbedding):
    """UME-R1 embeddings for LlamaIndex: batched text and image embedding, disc or gen.

    ``model``: hub name, checkpoint folder or a loaded ``UMEEncoder``; or ``base_url`` (+
    ``api_key``): a ``ume serve`` service does the embedding. ``mode``: "disc" (one
    forward pass) or "gen" (reasoning first). Used as an ingestion transformation, it embeds
    ``ImageNode``s by their image and other nodes by their text.
    """

    model: Any = Field(default=None, description="Hub name, checkpoint folder or UMEEncoder "
                                                  "(with base_url: the served model name, None: the service's).")
    base_url: str | None = Field(default=None, description="A `ume serve` service to embed with (no local model).")
    api_key: SecretStr | None = Field(default=None, description="The service's key (default $UME_API_KEY).")
    mode: Literal["disc", "gen"] = "disc"
    query_instruction: str | None = None
    document_instruction: str | None = None
    encoder_kwargs: dict = Field(default_factory=dict, description="Passed to UMEEncoder.from_pretrained.")
    _encoder: Any = PrivateAttr(default=None)

    def __init__(self, model: Any = None, **kwargs: Any):
        kwargs.setdefault("model_name", str(getattr(model, "name_or_path", model or kwargs.get("base_url"))))
        super().__init__(model=model, **kwargs)
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        self._encoder = shared_encoder(self.model, self.encoder_kwargs, base_url=self.base_url, api_key=key)

    @classmethod
    def class_name(cls) -> str:
        return "UMEEmbedding"

    @property
    def encoder(self) -> EncoderLike:
        return self._encoder

    def _embed(self, items: Sequence[Item]) -> list[Embedding]:
        return embed_as_floats(self._encoder, items, self.mode, self.embed_batch_size)

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([Item(text=query, instruction=self.query_instruction)])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return self._embed([Item(text=t, instruction=self.document_instruction) for t in texts])

    def _get_image_embedding(self, img_file_path: Any) -> Embedding:
        return self._get_image_embeddings([img_file_path])[0]

    def _get_image_embeddings(self, img_file_paths: List[Any]) -> List[Embedding]:
        return self._embed([Item(image=_image_input(p), instruction=self.document_instruction) for p in img_file_paths])

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    async def _aget_image_embedding(self, img_file_path: Any) -> Embedding:
        return await asyncio.to_thread(self._get_image_embedding, img_file_path)

    async def _aget_image_embeddings(self, img_file_paths: List[Any]) -> List[Embedding]:
        return await asyncio.to_thread(self._get_image_embeddings, img_file_paths)

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """Ingestion transformation: image nodes by their image, the others by their text."""
        is_image = [isinstance(n, ImageNode) and bool(n.image_path or n.image or n.image_url) for n in nodes]
        images = [n for n, flag in zip(nodes, is_image) if flag]
        others = [n for n, flag in zip(nodes, is_image) if not flag]  # by position: node == compares every field
        if others:
            vectors = self.get_text_embedding_batch([n.get_content(metadata_mode=MetadataMode.EMBED) for n in others])
            for node, vector in zip(others, vectors):
                node.embedding = vector
        if images:
            vectors = self.get_image_embedding_batch([_node_image(n) for n in images])
            for node, vector in zip(images, vectors):
                node.embedding = vector
        return nodes


def _image_input(value: Any) -> Any:
    """LlamaIndex passes image paths as str; ours reads str as text, so paths become Paths."""
    from pathlib import Path

    return Path(value) if isinstance(value, str) else value


def _node_image(node: ImageNode) -> Any:
    if node.image_path:
        return node.image_path
    return node.resolve_image().read()  # base64 image or URL content, as bytes


class UMERetriever(BaseRetriever):
    """A LlamaIndex retriever over a ``UMEIndex``: disc + gen vectors fused in Qdrant.

    Text, image (``QueryBundle.image_path``) and text + image queries. Pages, images and
    videos come back as ``ImageNode``s whose ``image_path`` is a viewable preview; text as
    ``TextNode``s. ``metadata``: source, page, modality, score (fused), disc_score, gen_score,
    reasoning. ``fusion``/``filter``/``gen_samples`` as in ``UMEIndex.search``.
    """

    def __init__(
        self,
        index: Any,
        similarity_top_k: int = 10,
        *,
        fusion: Fusion | str | None = None,
        filter: dict[str, Any] | None = None,  # noqa: A002
        gen_samples: int = 1,
        preview_dir: str | None = None,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ):
        if similarity_top_k < 1:
            raise ValueError(f"similarity_top_k must be >= 1, got {similarity_top_k}")
        self.index = index
        self.similarity_top_k = similarity_top_k
        self.fusion = None if fusion is None else Fusion.parse(fusion)
        self.filter = filter
        self.gen_samples = gen_samples
        self.preview_dir = preview_dir
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        query = build_query(query_bundle.query_str or None, query_bundle.image_path)
        hits = self.index.search(query, self.similarity_top_k, fusion=self.fusion, filter=self.filter,
                                 gen_samples=self.gen_samples)
        out = []
        for hit in hits:
            preview = preview_path(hit.payload, self.preview_dir)
            meta = hit_metadata(hit, preview)
            common = {"id_": hit.id, "text": hit_text(hit), "metadata": meta,
                      "excluded_llm_metadata_keys": [k for k in _HIDDEN_FROM_LLM if k in meta],
                      "excluded_embed_metadata_keys": list(meta)}
            node = ImageNode(image_path=preview, **common) if preview else TextNode(**common)
            out.append(NodeWithScore(node=node, score=hit.score))
        return out

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)
