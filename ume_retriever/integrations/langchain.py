"""LangChain: ``UMEEmbeddings`` (an ``Embeddings`` with images and video) and ``UMERetriever``
(a ``BaseRetriever`` over a ``UMEIndex``: both vectors, fusion, filters, image queries).

    from ume_retriever.integrations.langchain import UMEEmbeddings, UMERetriever
    emb = UMEEmbeddings(model="zhibinlan/UME-R1-2B")          # disc vectors (mode="gen": reasoning first)
    retriever = UMERetriever(index=index, k=5)
    docs = retriever.invoke("quarterly revenue chart", k=3, image="chart.png")

Async: LangChain's default ``aembed_*``/``ainvoke`` run the sync method in an executor; the
encoder serialises model calls itself, so there is one implementation, not sync/async twins.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator

from ..fusion import Fusion
from ..inputs.item import Item
from ..inputs.query import build_query
from ..model.protocol import EncoderLike
from ..previews import preview_path
from .embedder import embed_as_floats, shared_encoder
from .hits import hit_metadata, hit_text

__all__ = ["UMEEmbeddings", "UMERetriever"]


class UMEEmbeddings(BaseModel, Embeddings):
    """UME-R1 embeddings for LangChain.

    ``model``: a hub name (``zhibinlan/UME-R1-2B``), a checkpoint folder, or a loaded
    ``UMEEncoder``; or ``base_url`` (+ ``api_key``): a ``ume serve`` service does the
    embedding. ``mode``: "disc" (one forward pass, default) or "gen" (the model reasons,
    then embeds; slower). ``query_instruction``/``document_instruction``: MMEB-style task
    instructions put before the text (None: none). Vectors are lists of python floats,
    L2-normalised. Besides text: ``embed_image(s)``, ``embed_video(s)`` and ``embed_items``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: Any = Field(default=None, description="Hub name, checkpoint folder or UMEEncoder "
                                                  "(with base_url: the served model name, None: the service's).")
    base_url: str | None = Field(default=None, description="A `ume serve` service to embed with (no local model).")
    api_key: SecretStr | None = Field(default=None, description="The service's key (default $UME_API_KEY).")
    mode: Literal["disc", "gen"] = "disc"
    batch_size: int | None = Field(default=None, description="Inputs per forward pass (encoder default if None).")
    query_instruction: str | None = None
    document_instruction: str | None = None
    encoder_kwargs: dict[str, Any] = Field(default_factory=dict,
                                           description="Passed to UMEEncoder.from_pretrained (device, dtype, ...).")
    _encoder: Any = PrivateAttr(default=None)

    def model_post_init(self, __context: Any) -> None:
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        self._encoder = shared_encoder(self.model, self.encoder_kwargs, base_url=self.base_url, api_key=key)

    @property
    def encoder(self) -> EncoderLike:
        return self._encoder

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embed_items([Item(text=t, instruction=self.document_instruction) for t in _texts(texts)])

    def embed_query(self, text: str) -> list[float]:
        return self.embed_items([Item(text=_texts([text])[0], instruction=self.query_instruction)])[0]

    def embed_image(self, image: Any) -> list[float]:
        """One image: a path, PIL image or bytes."""
        return self.embed_images([image])[0]

    def embed_images(self, images: Sequence[Any]) -> list[list[float]]:
        return self.embed_items([Item(image=img, instruction=self.document_instruction) for img in images])

    def embed_video(self, video: Any) -> list[float]:
        """One video: a file path or a list of frames."""
        return self.embed_videos([video])[0]

    def embed_videos(self, videos: Sequence[Any]) -> list[list[float]]:
        return self.embed_items([Item(video=v, instruction=self.document_instruction) for v in videos])

    def embed_items(self, items: Sequence[Any]) -> list[list[float]]:
        """Any inputs ``UMEEncoder.encode`` takes (``Item``s mixing text, images and video)."""
        return embed_as_floats(self._encoder, items, self.mode, self.batch_size)


def _texts(texts: Sequence[Any]) -> list[str]:
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; item(s) {bad[:5]} are {type(texts[bad[0]]).__name__} "
                        "(use embed_images / embed_items for media)")
    return list(texts)


class UMERetriever(BaseRetriever):
    """A LangChain retriever over a ``UMEIndex`` (disc + gen vectors, fused in Qdrant).

    ``k``, ``fusion`` ("rrf", "weighted", "dbsf", "disc", "gen", "weighted:disc=0.3,gen=0.7" or a
    ``Fusion``), ``filter`` (``{"modality": "pdf_page"}``, ``{"page": {"lte": 3}}``) and
    ``gen_samples`` are defaults that ``invoke(query, k=..., fusion=..., filter=..., image=...)``
    overrides per call. ``image`` makes an image (or text + image) query.

    Each ``Document``: ``page_content`` is the item's text (a page's extracted text), else the
    model's reasoning; ``metadata`` holds id, source, page, modality, score (fused), disc_score,
    gen_score, reasoning and ``image_path`` (a viewable preview) for pages, images and videos.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: Any = Field(description="The UMEIndex to search.")
    k: int = Field(default=4, ge=1)
    fusion: Any = Field(default=None, description="Fusion spec; None: the index's default.")
    filter: dict[str, Any] | None = None
    gen_samples: int = Field(default=1, ge=1)
    preview_dir: str | None = Field(default=None, description="Where page/video previews are rendered.")

    @field_validator("fusion")
    @classmethod
    def _check_fusion(cls, value: Any) -> Any:
        return None if value is None else Fusion.parse(value)

    def _get_relevant_documents(
        self,
        query: str,
        *,
        run_manager: CallbackManagerForRetrieverRun,
        k: int | None = None,
        fusion: Fusion | str | None = None,
        filter: dict[str, Any] | None = None,  # noqa: A002
        image: Any = None,
        gen_samples: int | None = None,
    ) -> list[Document]:
        hits = self.index.search(
            build_query(query or None, image), k or self.k, fusion=fusion or self.fusion,
            filter=filter if filter is not None else self.filter, gen_samples=gen_samples or self.gen_samples,
        )
        return [
            Document(page_content=hit_text(h), metadata=hit_metadata(h, preview_path(h.payload, self.preview_dir)), id=h.id)
            for h in hits
        ]
