"""The HTTP ingress of ``ume serve``: routes, authentication, request limits, JSON errors.

    GET    /health          model, store, counts, pending gen, replicas (no key needed)
    GET    /v1/models       the served model (OpenAI-style)
    POST   /v1/embeddings   OpenAI-compatible; extensions: mode, input objects, on_error
    POST   /v1/search       fused disc + gen search
    POST   /v1/index        {"paths": [...]} under an --allow-root, or a multipart upload
    DELETE /v1/sources      {"source": ...}

Every error is ``{"error": {"message", "type", "param"}}`` with its status; a bad request
never takes the service down.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type of the
# route methods that serve.ingress wraps.
import asyncio
import hmac
import logging
import os
import time
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..fusion import Fusion
from .batching import EncodeCall
from .config import ServeConfig
from .wire import (APIError, DeleteRequest, EmbeddingsRequest, ImageLimits, IndexRequest, SearchRequest,
                   embedding_items, query_item, vector_json)

logger = logging.getLogger(__name__)
Body = TypeVar("Body", bound=BaseModel)

app = FastAPI(title="UME-R1 retrieval service", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    return JSONResponse(APIError(exc.status_code, f"{message}: {request.method} {request.url.path}").body(),
                        status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(APIError(422, _describe(exc.errors())).body(), status_code=422)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)


def _describe(errors: Any) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {e.get('msg')}")
    return "; ".join(parts[:5]) or "invalid request"


def _under_roots(path: str, roots: tuple[str, ...] | Any) -> bool:
    """Whether ``path`` (links resolved) is inside one of ``roots``."""
    real = os.path.realpath(os.path.expanduser(path))
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


# Everything the class uses must be defined above it: serve.ingress captures the module's
# names when the class is decorated.
@serve.deployment(name="ingress")
@serve.ingress(app)
class UMEService:
    def __init__(self, encoder: Any, index: Any, config: ServeConfig):
        self.encoder = encoder
        self.index = index
        self.config = config
        self.limits = ImageLimits(config.max_image_bytes, config.max_image_pixels)
        self.started = time.time()

    # -- plumbing -------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    async def _body(self, request: Request, limit: int) -> bytes:
        """The request body, refused past ``limit`` bytes or when it takes too long to arrive."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes is over the {limit}-byte limit")
        chunks: list[bytes] = []
        size = 0

        async def collect() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body is over the {limit}-byte limit")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(collect(), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.config.body_timeout_s:g}s") from None
        return b"".join(chunks)

    async def _parse(self, request: Request, model: type[Body]) -> Body:
        body = await self._body(request, self.config.max_body_bytes)
        try:
            return model.model_validate_json(body or b"{}")
        except ValidationError as exc:
            raise APIError(422, _describe(exc.errors())) from None

    async def _call(self, response: Any, timeout: float | None) -> Any:
        """Await a deployment call; unavailable or overloaded back ends answer 503, slow ones 504."""
        try:
            return await asyncio.wait_for(response, timeout) if timeout else await response
        except asyncio.TimeoutError:
            response.cancel()
            raise APIError(504, f"no answer within {timeout:g}s (the model is busy; try again)") from None
        except BackPressureError:
            raise APIError(503, "the service is at capacity; try again shortly") from None
        except Exception as exc:  # noqa: BLE001 - an actor that died, a replica being replaced
            if isinstance(exc, RayError):
                logger.exception("back-end deployment failed")
                raise APIError(503, f"a back end is unavailable ({type(exc).__name__}); try again") from None
            raise

    async def _index_call(self, response: Any, timeout: float | None) -> Any:
        answer = await self._call(response, timeout)
        if answer[0] == "error":
            raise APIError(answer[1], answer[2])
        return answer[1]

    # -- routes ---------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        info = await self._index_call(self.index.health.remote(), 30)
        return {"status": "ok", **info, "replicas": {"encoder": self.config.replicas,
                                                     "index": self.config.search_replicas},
                "max_batch_size": self.config.max_batch_size, "auth": bool(self.config.api_key),
                "uptime_s": round(time.time() - self.started, 1)}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(self.started),
                                            "owned_by": "ume"} for name in self.config.served_names]}

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        req = await self._parse(request, EmbeddingsRequest)
        if req.model not in self.config.served_names:
            raise APIError(404, f"model {req.model!r} is not served here; this service serves "
                                f"{', '.join(self.config.served_names)}", "model")
        inputs = embedding_items(req, self.limits, self.config.max_inputs)
        bad = [x for x in inputs if isinstance(x, APIError)]
        if bad and req.on_error == "fail":
            raise bad[0]
        items = [x for x in inputs if not isinstance(x, APIError)]
        reply = await self._call(self.encoder.encode.remote(EncodeCall(items, req.mode)), self.config.request_timeout_s)
        failed = [r for r in reply.results if r.error is not None]
        if failed and req.on_error == "fail":
            shown = "; ".join(f"input[{r.index}]: {r.error}" for r in failed[:5])
            raise APIError(400, f"{len(failed)} of {len(items)} inputs could not be embedded: {shown}",
                           f"input[{failed[0].index}]")
        results = iter(reply.results)
        data = []
        for i, x in enumerate(inputs):
            entry: dict[str, Any] = {"object": "embedding", "index": i}
            r = x if isinstance(x, APIError) else next(results)
            if isinstance(r, APIError) or r.error is not None:
                entry.update(embedding=None, error=r.message if isinstance(r, APIError) else str(r.error))
            else:
                vector = r.disc if req.mode == "disc" else r.gen
                if req.dimensions is not None and req.dimensions != len(vector):
                    raise APIError(400, f"dimensions={req.dimensions}: this model's vectors have {len(vector)}",
                                   "dimensions")
                entry["embedding"] = vector_json(vector, req.encoding_format)
                if req.mode == "gen":
                    entry.update(reasoning=r.reasoning, gen_outcome=r.gen_outcome.value if r.gen_outcome else None)
            data.append(entry)
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}}

    @app.post("/v1/search")
    async def search(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        req = await self._parse(request, SearchRequest)
        if req.k > self.config.max_k:
            raise APIError(422, f"k: at most {self.config.max_k}, got {req.k}", "k")
        if req.gen_samples > self.config.max_gen_samples:
            raise APIError(422, f"gen_samples: at most {self.config.max_gen_samples}, got {req.gen_samples}",
                           "gen_samples")
        if req.fusion is not None:
            try:
                Fusion.parse(req.fusion)
            except ValueError as exc:
                raise APIError(400, str(exc), "fusion") from None
        item = query_item(req, self.limits)
        hits = await self._index_call(
            self.index.search.remote(item, req.k, req.fusion, req.filter, req.gen_samples, req.instruction),
            self.config.request_timeout_s)
        return {"hits": hits}

    @app.post("/v1/index")
    async def index_files(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await self._index_uploads(request)
        req = await self._parse(request, IndexRequest)
        if not self.config.allow_roots:
            raise APIError(403, "this service reads no server-side paths (start it with --allow-root DIR); "
                                "upload files instead (multipart field 'files')", "paths")
        for path in req.paths:
            if not os.path.isabs(path):
                raise APIError(400, f"{path}: give absolute server-side paths", "paths")
            if not _under_roots(path, self.config.allow_roots):
                raise APIError(403, f"{path}: not under an allowed root ({', '.join(self.config.allow_roots)})",
                               "paths")
        return await self._index_call(self.index.add.remote(req.paths, req.gen, req.prune), None)

    async def _index_uploads(self, request: Request) -> dict[str, Any]:
        body = await self._body(request, self.config.max_upload_bytes)
        request._body = body  # Starlette parses the form from the body read (and capped) above
        form = await request.form(max_files=self.config.max_inputs, max_part_size=self.config.max_upload_bytes)
        uploads = [f for f in form.getlist("files") if hasattr(f, "read")]
        if not uploads:
            raise APIError(400, "a multipart upload needs one or more 'files' fields", "files")
        gen = form.get("gen", "now")
        if gen not in ("now", "later"):
            raise APIError(422, f"gen: 'now' or 'later', got {gen!r}", "gen")
        files = [(f.filename or "upload", await f.read()) for f in uploads]
        return await self._index_call(self.index.add_uploads.remote(files, gen), None)

    @app.delete("/v1/sources")
    async def delete_source(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        req = await self._parse(request, DeleteRequest)
        return await self._index_call(self.index.delete.remote(req.source), self.config.request_timeout_s)

