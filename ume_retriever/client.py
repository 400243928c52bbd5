"""``UMEClient``: the client of ``ume serve`` (httpx), sync and async.

    from ume_retriever.client import UMEClient
    client = UMEClient("http://gpu-box:8000", api_key="...")
    vectors = client.embed(["a red circle", Item(image="photo.png")])
    hits = client.search("revenue by region", k=5)
    report = client.add(["/data/reports"])           # server-side paths under an --allow-root
    report = client.upload(["slides.pdf"])           # local files, sent to the service
    await client.asearch("revenue by region")        # every method has an `a...` twin

It also stands where an in-process ``UMEIndex`` and encoder stand: ``search`` returns
``Hit``s, ``add`` an ``IngestReport``, ``encode`` ``EncodeResult``s with per-input errors, so
``UMERetriever.from_url``, the LangChain and the LlamaIndex classes run against a service with
the same code. Each operation is defined once, as a request and a parser (``_Call``); the
sync and async methods only send it.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Sequence, TypeVar

import numpy as np

from .errors import InputError, UMEError
from .fusion import Fusion
from .index import Hit, IngestEntry, IngestReport
from .inputs.item import Item, as_item
from .results import EncodeResult, GenOutcome

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 300.0


class ServiceError(UMEError):
    """The service answered with an error: ``status`` (HTTP), ``type`` and its message."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None):  # noqa: A002
        super().__init__(f"{status} {type or 'error'}: {message}")
        self.status = status
        self.message = message
        self.type = type
        self.param = param


@dataclass
class _Call(Generic[T]):
    """One HTTP request and how to read its JSON answer."""

    method: str
    path: str
    parse: Callable[[Any], T]
    json: Any = None
    files: Any = None
    data: Any = None
    timeout: float | None | str = "default"


class UMEClient:
    """A client of one ``ume serve`` service.

    ``api_key``: the service's key (None: $UME_API_KEY when set). ``timeout``: seconds per
    request (embeddings, searches); ingests wait as long as they take.
    """

    backfills_itself = True  # the service computes pending gen vectors on its own

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 model: str | None = None):
        import httpx

        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("UME_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = timeout
        self._model = model
        self._info: dict[str, Any] | None = None
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout)
        self._ahttp: Any = None  # made on first async use, inside the caller's event loop
        self.default_fusion = Fusion.parse("rrf")

    # -- transport ------------------------------------------------------------------------------

    def _send(self, call: _Call[T]) -> T:
        response = self._http.request(call.method, call.path, json=call.json, files=call.files, data=call.data,
                                      **self._timeout(call))
        return call.parse(_answer(response))

    async def _asend(self, call: _Call[T]) -> T:
        import httpx

        if self._ahttp is None:
            self._ahttp = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self.timeout)
        response = await self._ahttp.request(call.method, call.path, json=call.json, files=call.files,
                                             data=call.data, **self._timeout(call))
        return call.parse(_answer(response))

    def _timeout(self, call: _Call) -> dict[str, Any]:
        return {} if call.timeout == "default" else {"timeout": call.timeout}

    # -- service info ---------------------------------------------------------------------------

    def _health_call(self) -> _Call[dict]:
        return _Call("GET", "/health", lambda body: body)

    def health(self) -> dict[str, Any]:
        """Model, store, point counts, pending gen vectors, replicas."""
        return self._send(self._health_call())

    async def ahealth(self) -> dict[str, Any]:
        return await self._asend(self._health_call())

    @property
    def model(self) -> str:
        """The served model name (asked of the service once)."""
        if self._model is None:
            self._model = self._send(_Call("GET", "/v1/models", lambda body: body["data"][0]["id"]))
        return self._model

    def _described(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self.health()
        return self._info

    @property
    def name_or_path(self) -> str:
        return self._described()["model"]

    @property
    def encoder(self) -> "UMEClient":
        """The client embeds too: where an encoder is expected, it stands in."""
        return self

    # -- embeddings -----------------------------------------------------------------------------

    def _encode_call(self, inputs: Sequence[Any], mode: str, instruction: str | None) -> _Call[list[EncodeResult]]:
        if mode not in ("disc", "gen"):
            raise ValueError(f"the service embeds with mode 'disc' or 'gen', got {mode!r}")
        body = {"model": self.model, "input": [_input_json(v, i) for i, v in enumerate(inputs)], "mode": mode,
                "encoding_format": "base64", "on_error": "report"}
        if instruction is not None:
            body["instruction"] = instruction
        return _Call("POST", "/v1/embeddings", lambda answer: _encode_results(answer, mode), json=body)

    def encode(self, inputs: Any | Sequence[Any], mode: str = "disc", *, instruction: str | None = None,
               output: str = "numpy", **_ignored: Any) -> EncodeResult | list[EncodeResult]:
        """One ``EncodeResult`` per input, in order (a bad input carries its ``error``; the
        others are still embedded), like ``UMEEncoder.encode``. Options that only an
        in-process encoder has (batch_size, sampling) are ignored: the service decides."""
        single = not isinstance(inputs, (list, tuple))
        results = self._send(self._encode_call([inputs] if single else list(inputs), mode, instruction))
        return _as_output(results, output, single)

    async def aencode(self, inputs: Any | Sequence[Any], mode: str = "disc", *, instruction: str | None = None,
                      output: str = "numpy", **_ignored: Any) -> EncodeResult | list[EncodeResult]:
        single = not isinstance(inputs, (list, tuple))
        results = await self._asend(self._encode_call([inputs] if single else list(inputs), mode, instruction))
        return _as_output(results, output, single)

    def embed(self, inputs: Sequence[Any], mode: str = "disc", *, instruction: str | None = None) -> list[np.ndarray]:
        """One vector per input; raises ``ServiceError``/``UMEError`` if any input fails."""
        return [_vector_of(r, mode) for r in self.encode(list(inputs), mode, instruction=instruction)]

    async def aembed(self, inputs: Sequence[Any], mode: str = "disc", *,
                     instruction: str | None = None) -> list[np.ndarray]:
        results = await self.aencode(list(inputs), mode, instruction=instruction)
        return [_vector_of(r, mode) for r in results]

    # -- search ---------------------------------------------------------------------------------

    def _search_call(self, query: Any, k: int, image: Any, fusion: Fusion | str | None, filter: dict | None,  # noqa: A002
                     gen_samples: int, instruction: str | None) -> _Call[list[Hit]]:
        item = as_item(query) if query is not None else Item()
        if image is not None:
            item = Item(text=item.text, image=image, instruction=item.instruction)
        if item.video is not None or item.images:
            raise InputError("query", "the service takes text and one image per query (no video, no image lists)")
        body: dict[str, Any] = {"k": k, "gen_samples": gen_samples}
        if item.text is not None:
            body["query"] = item.text
        if item.image is not None:
            body["image"] = image_data_url(item.image)
        if fusion is not None:
            body["fusion"] = str(Fusion.parse(fusion))
        if filter is not None:
            body["filter"] = filter
        if instruction or item.instruction:
            body["instruction"] = instruction or item.instruction
        return _Call("POST", "/v1/search", lambda answer: [_hit(h) for h in answer["hits"]], json=body)

    def search(self, query: Any = None, k: int = 10, *, image: Any = None, fusion: Fusion | str | None = None,
               filter: dict[str, Any] | None = None, gen_samples: int = 1,  # noqa: A002
               instruction: str | None = None, **_ignored: Any) -> list[Hit]:
        """The ``k`` best hits for a text and/or image query (see ``UMEIndex.search``)."""
        return self._send(self._search_call(query, k, image, fusion, filter, gen_samples, instruction))

    async def asearch(self, query: Any = None, k: int = 10, *, image: Any = None, fusion: Fusion | str | None = None,
                      filter: dict[str, Any] | None = None, gen_samples: int = 1,  # noqa: A002
                      instruction: str | None = None, **_ignored: Any) -> list[Hit]:
        return await self._asend(self._search_call(query, k, image, fusion, filter, gen_samples, instruction))

    # -- ingest ---------------------------------------------------------------------------------

    def _add_call(self, paths: Sequence[Any] | str, gen: str, prune: bool) -> _Call[IngestReport]:
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        body = {"paths": [os.fspath(p) for p in paths], "gen": gen, "prune": prune}
        return _Call("POST", "/v1/index", _report, json=body, timeout=None)

    def add(self, paths: Sequence[str | os.PathLike] | str, *, gen: str = "now", prune: bool = False,
            **_ignored: Any) -> IngestReport:
        """Index files and folders ON THE SERVER (absolute paths under one of its
        ``--allow-root`` folders); ``upload`` sends local files."""
        return self._send(self._add_call(paths, gen, prune))

    async def aadd(self, paths: Sequence[str | os.PathLike] | str, *, gen: str = "now", prune: bool = False,
                   **_ignored: Any) -> IngestReport:
        return await self._asend(self._add_call(paths, gen, prune))

    def _upload_call(self, files: Sequence[str | os.PathLike] | str, gen: str) -> _Call[IngestReport]:
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        parts = [("files", (Path(f).name, Path(f).read_bytes())) for f in files]
        return _Call("POST", "/v1/index", _report, files=parts, data={"gen": gen}, timeout=None)

    def upload(self, files: Sequence[str | os.PathLike] | str, *, gen: str = "now") -> IngestReport:
        """Send local files to the service and index them (kept in its upload folder)."""
        return self._send(self._upload_call(files, gen))

    async def aupload(self, files: Sequence[str | os.PathLike] | str, *, gen: str = "now") -> IngestReport:
        return await self._asend(self._upload_call(files, gen))

    def _delete_call(self, source: str | os.PathLike) -> _Call[int]:
        return _Call("DELETE", "/v1/sources", lambda answer: int(answer["deleted"]), json={"source": os.fspath(source)})

    def delete(self, source: str | os.PathLike) -> int:
        """Remove a source's points (its path as indexed on the server); the number removed."""
        return self._send(self._delete_call(source))

    async def adelete(self, source: str | os.PathLike) -> int:
        return await self._asend(self._delete_call(source))

    def backfill_gen(self, *_args: Any, **_kwargs: Any) -> Any:
        raise UMEError("a service computes pending gen vectors itself (unless started with --no-backfill); "
                       "GET /health shows how many are pending")

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    async def aclose(self) -> None:
        if self._ahttp is not None:
            await self._ahttp.aclose()
            self._ahttp = None

    def __enter__(self) -> "UMEClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> "UMEClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def _answer(response: Any) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            raise ServiceError(response.status_code, str(error.get("message")), error.get("type"), error.get("param"))
        raise ServiceError(response.status_code, response.text[:500] or response.reason_phrase)
    return body


def image_data_url(image: Any) -> str:
    """A data URL of an image given as a path, bytes or a PIL image."""
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise InputError(type(image).__name__, "an image must be a path, bytes or a PIL image")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            mime = Image.MIME.get(img.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError):
        mime = "application/octet-stream"  # the service says what is wrong with it
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _input_json(value: Any, index: int) -> Any:
    item = as_item(value)
    if item.video is not None or item.images:
        raise InputError("video or image list", "the service embeds text and one image per input", index)
    if item.image is None and item.instruction is None:
        return item.text
    out: dict[str, Any] = {}
    if item.text is not None:
        out["text"] = item.text
    if item.image is not None:
        out["image"] = image_data_url(item.image)
    if item.instruction is not None:
        out["instruction"] = item.instruction
    return out


def _vector_of(result: EncodeResult, mode: str) -> np.ndarray:
    result.raise_for_error()
    return result.disc if mode == "disc" else result.gen


def _vector(value: Any) -> np.ndarray:
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)


def _encode_results(answer: dict, mode: str) -> list[EncodeResult]:
    results = []
    for entry in sorted(answer["data"], key=lambda e: e["index"]):
        r = EncodeResult(index=entry["index"])
        if entry.get("error"):
            r.error = UMEError(entry["error"])
        elif mode == "disc":
            r.disc = _vector(entry["embedding"])
        else:
            r.gen = _vector(entry["embedding"])
            r.reasoning = entry.get("reasoning")
            r.gen_outcome = GenOutcome(entry["gen_outcome"]) if entry.get("gen_outcome") else None
        results.append(r)
    return results


def _as_output(results: list[EncodeResult], output: str, single: bool) -> Any:
    if output == "list":
        for r in results:
            r.disc = None if r.disc is None else [float(x) for x in r.disc]
            r.gen = None if r.gen is None else [float(x) for x in r.gen]
    return results[0] if single else results


def _hit(h: dict) -> Hit:
    return Hit(id=h["id"], score=h["score"], disc_score=h.get("disc_score"), gen_score=h.get("gen_score"),
               payload=h.get("payload") or {}, reasoned=bool(h.get("reasoned")), query_reasoning=h.get("query_reasoning"))


def _report(answer: dict) -> IngestReport:
    report = IngestReport(entries=[IngestEntry(**e) for e in answer["entries"]], deleted_stale=answer["stale_removed"],
                          seconds=answer["seconds"], optimized=answer["optimized"], gen_pending=answer["gen_pending"],
                          gen_now=[IngestEntry(**e) for e in answer.get("gen_now", [])])
    return report
