"""``UMERetriever``: the one object a RAG app builds.

It owns an encoder and a two-vector index, adds files and items, retrieves with fusion, and
hands out the LangChain or LlamaIndex retriever over the same index (switching framework is
one call; nothing is re-encoded).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .fusion import Fusion
from .backfill import BackfillReport
from .index import GenWhen, Hit, IngestReport, UMEIndex
from .inputs.query import build_query
from .model.protocol import EncoderLike
from .store import DISC, GEN, FilterSpec

if TYPE_CHECKING:
    from .integrations.langchain import UMERetriever as LangChainRetriever
    from .integrations.llama_index import UMERetriever as LlamaIndexRetriever

logger = logging.getLogger(__name__)


class UMERetriever:
    """Disc + gen retrieval over files and items, for RAG apps.

    >>> r = UMERetriever.from_pretrained("zhibinlan/UME-R1-2B", store="./ume-index")
    >>> r.add(["reports/", "slides.pdf", "diagram.png"])
    >>> for hit in r.retrieve("revenue by region in 2023", k=5):
    ...     print(hit.source, hit.page, hit.score, hit.reasoning)
    """

    def __init__(self, index: UMEIndex, *, k: int = 10, fusion: Fusion | str | None = None,
                 filter: FilterSpec | None = None, gen_samples: int = 1):  # noqa: A002
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.index = index
        self.k = k
        self.fusion = Fusion.parse(fusion or index.default_fusion)
        self.filter = filter
        self.gen_samples = gen_samples
        self._backfill_stop = threading.Event()
        self._backfill_thread: threading.Thread | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        store: str | os.PathLike | None = None,
        *,
        url: str | None = None,
        api_key: str | None = None,
        collection: str = "ume",
        vectors: Sequence[str] = (DISC, GEN),
        k: int = 10,
        fusion: Fusion | str = "rrf",
        encoder_kwargs: dict[str, Any] | None = None,
        **index_kwargs: Any,
    ) -> "UMERetriever":
        """Load a UME-R1 checkpoint (hub name or folder) and open its index: the embedded store
        at ``store`` (default ``./ume-index``) or a Qdrant server/cluster at ``url``.
        ``encoder_kwargs`` go to ``UMEEncoder.from_pretrained`` (device, dtype, backend, ...)."""
        from .model.encoder import UMEEncoder

        encoder = UMEEncoder.from_pretrained(model, **(encoder_kwargs or {}))
        index = UMEIndex(encoder, store if url is None else None, url=url, api_key=api_key, collection=collection,
                         vectors=vectors, default_fusion=fusion, **index_kwargs)
        return cls(index, k=k, fusion=fusion)

    @classmethod
    def from_url(cls, url: str, api_key: str | None = None, *, k: int = 10, fusion: Fusion | str = "rrf",
                 timeout: float | None = None) -> "UMERetriever":
        """The same retriever over a ``ume serve`` service (no model here): ``retrieve``,
        ``add`` (paths on the server), ``delete`` and the LangChain/LlamaIndex retrievers go
        through ``UMEClient``. ``api_key``: the service's key (default $UME_API_KEY)."""
        from .client import DEFAULT_TIMEOUT_S, UMEClient

        client = UMEClient(url, api_key, timeout=timeout or DEFAULT_TIMEOUT_S)
        return cls(client, k=k, fusion=fusion)  # type: ignore[arg-type] - the client is index-shaped

    @property
    def encoder(self) -> EncoderLike:
        return self.index.encoder

    def add(self, inputs: Iterable[Any] | str | os.PathLike, *, show_progress: bool = False, prune: bool = False,
            retry_quarantined: bool = False, optimize: bool | None = None, gen: GenWhen = "now") -> IngestReport:
        """Index files, folders and items (see ``UMEIndex.add``); unchanged content is skipped.
        A large ingest ends by building the store's vector indexes (``optimize``).
        ``gen="later"``: searchable at once with disc vectors; gen vectors come from
        ``backfill_gen`` or the background thread of ``start_backfill``."""
        return self.index.add(inputs, show_progress=show_progress, prune=prune, retry_quarantined=retry_quarantined,
                              optimize=optimize, gen=gen)

    def backfill_gen(self, limit: int | None = None, show_progress: bool = False) -> BackfillReport:
        """Compute pending gen vectors now, in this thread (see ``UMEIndex.backfill_gen``)."""
        return self.index.backfill_gen(limit, show_progress)

    def start_backfill(self, *, poll_seconds: float = 5.0, batch_size: int | None = None) -> None:
        """Backfill pending gen vectors in a background thread while the app serves queries.

        The thread works in windows of ``batch_size`` (default: the index's) times the index's
        ``flush_batches`` items; a query waits for at most one model batch of it (the encoder
        runs one batch at a time). When nothing is pending it looks again every
        ``poll_seconds``, so later ``add(..., gen="later")`` calls are picked up. ``close()``
        (or ``stop_backfill()``) stops it between windows; what it had finished is kept."""
        if self._backfill_thread is not None and self._backfill_thread.is_alive():
            return
        if getattr(self.index, "backfills_itself", False):
            logger.info("the service computes pending gen vectors itself: no backfill thread here")
            return
        self._backfill_stop.clear()

        def run() -> None:
            while not self._backfill_stop.is_set():
                try:
                    report = self.index.backfill_gen(batch_size=batch_size, stop=self._backfill_stop)
                except Exception:  # noqa: BLE001 - keep serving; retried at the next poll
                    logger.exception("background gen backfill failed; retrying in %.0fs", poll_seconds)
                    report = None
                if report is None or int(report) == 0 or report.stopped:
                    self._backfill_stop.wait(poll_seconds)

        self._backfill_thread = threading.Thread(target=run, name="ume-gen-backfill", daemon=True)
        self._backfill_thread.start()

    def stop_backfill(self, timeout: float | None = None) -> None:
        """Stop the background backfill (after the window in progress) and wait for it."""
        self._backfill_stop.set()
        if self._backfill_thread is not None:
            self._backfill_thread.join(timeout)

    def delete(self, source: str | os.PathLike) -> int:
        """Remove a source's points; returns how many items it had."""
        return self.index.delete(source)

    def retrieve(
        self,
        query: Any = None,
        k: int | None = None,
        *,
        image: Any = None,
        fusion: Fusion | str | None = None,
        filter: FilterSpec | None = None,  # noqa: A002
        **search_kwargs: Any,
    ) -> list[Hit]:
        """The best ``k`` hits for a text, image or mixed query (defaults from the constructor).
        Other keywords go to ``UMEIndex.search`` (gen_samples, instruction, temperature, seed)."""
        search_kwargs.setdefault("gen_samples", self.gen_samples)
        return self.index.search(build_query(query, image), k or self.k, fusion=fusion or self.fusion,
                                 filter=filter if filter is not None else self.filter, **search_kwargs)

    def as_langchain(self, **kwargs: Any) -> "LangChainRetriever":
        """A LangChain ``BaseRetriever`` over this index (``langchain`` extra)."""
        from .integrations.langchain import UMERetriever as LangChainRetriever

        kwargs = {"k": self.k, "fusion": self.fusion,
                  "filter": self.filter, "gen_samples": self.gen_samples, **kwargs}
        return LangChainRetriever(index=self.index, **kwargs)

    def as_llama_index(self, **kwargs: Any) -> "LlamaIndexRetriever":
        """A LlamaIndex ``BaseRetriever`` over this index (``llama-index`` extra)."""
        from .integrations.llama_index import UMERetriever as LlamaIndexRetriever

        kwargs = {"similarity_top_k": self.k, "fusion": self.fusion, "filter": self.filter,
                  "gen_samples": self.gen_samples, **kwargs}
        return LlamaIndexRetriever(index=self.index, **kwargs)

    def close(self) -> None:
        self.stop_backfill()
        self.index.close()

    def __enter__(self) -> "UMERetriever":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
