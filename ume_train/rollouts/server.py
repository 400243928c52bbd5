"""A rollout server: samples GRPO rollouts on its own GPUs for trainers that post prompts to it.

    ume-train rollout-server --model ./sft-ckpt --engine vllm --host 10.0.0.5 --port 8000 [--tensor-parallel-size 2]
    # trainer: GRPOConfig(rollout_backend="server", rollout_server_url="http://HOST:8000")

Why our own small server rather than ``vllm serve``: the UME prompt must reach the engine exactly
as the encoder builds it (its OpenAI routes would re-render it through a chat template), and
vLLM's HTTP weight-update routes are a development-mode API that changed shape in each of its
recent releases. This server uses vLLM's offline API only (see ``vllm_engine``).

Routes: ``GET /health`` (engine, model, config fingerprint, updates so far); ``POST /generate``
(a ``wire`` request -> JSON rollouts); ``POST /update_weights`` (a safetensors chunk of
full weights by parameter name); ``POST /finish_weight_update``. The engine runs one call
at a time (engines are not thread-safe); generate requests that arrive meanwhile are merged
into its next call (``batching``). A bad request gets a 400 with the reason and the
server stays up.
``--engine transformers`` samples with transformers ``generate`` instead (CPU or one GPU).
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import torch

from ume_retriever.model.checkpoint import pixel_caps, set_pixel_caps

from .batching import BatchingSampler
from .generator import Rollout, TransformersRollouts
from .wire import config_fingerprint, decode_generate_request, encode_rollouts
from .weight_sync import from_bytes, load_full_weights

logger = logging.getLogger(__name__)


class RolloutEngine(Protocol):
    """What the server drives. Sampling settings are attributes, set from each request."""

    max_new_tokens: int
    temperature: float
    top_p: float

    def generate(self, prompts: list, num_generations: int, seeds: list[int]) -> list[list[Rollout]]: ...

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None: ...

    def finish_weight_update(self) -> None: ...


class TransformersEngine(TransformersRollouts):
    """Server-side sampling with transformers ``generate`` on a model this process loads."""

    pixel_caps = None  # samples from the trainer's own vision tensors: no caps of its own to agree on

    def __init__(self, model_path: str, device: str = "cpu", dtype: str | None = None):
        from ume_retriever import UMEEncoder

        encoder = UMEEncoder.from_pretrained(model_path, device=device, dtype=dtype)
        super().__init__(encoder.model, encoder.processor, encoder.token_ids, max_new_tokens=1)
        self.device = torch.device(device)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        load_full_weights(self.model, weights)

    def finish_weight_update(self) -> None:
        """Nothing cached across requests."""


def load_engine(model_path: str, engine: str, **kwargs: Any) -> tuple[RolloutEngine, dict[str, Any]]:
    """The engine and the checkpoint's config fingerprint."""
    from transformers import AutoConfig

    fingerprint = config_fingerprint(AutoConfig.from_pretrained(model_path))
    if engine == "transformers":
        return TransformersEngine(model_path, device=kwargs.get("device") or "cpu", dtype=kwargs.get("dtype")), fingerprint
    if engine == "vllm":
        from transformers import AutoProcessor, GenerationConfig

        from ume_retriever.model.tokens import resolve_token_ids

        from .vllm_engine import VLLMRollouts

        processor = AutoProcessor.from_pretrained(model_path)
        set_pixel_caps(processor, kwargs.get("min_pixels"), kwargs.get("max_pixels"))
        gen_config = GenerationConfig.from_pretrained(model_path)
        token_ids = resolve_token_ids(processor.tokenizer, gen_config, model_path)
        vllm_kwargs = {k: v for k, v in kwargs.items() if k != "device" and v is not None}
        vllm_kwargs.setdefault("gpu_memory_utilization", 0.9)  # the GPUs are the server's alone
        rollouts = VLLMRollouts(model_path, processor.tokenizer, token_ids, max_new_tokens=1, colocate=False,
                                repetition_penalty=getattr(gen_config, "repetition_penalty", None) or 1.0,
                                **vllm_kwargs)
        rollouts.pixel_caps = pixel_caps(processor)  # what vLLM cuts images with: trainers must agree
        return rollouts, fingerprint
    raise ValueError(f"engine must be 'vllm' or 'transformers', got {engine!r}")


class RolloutServer:
    """An HTTP front for one engine. ``start()`` serves from a background thread; ``serve_forever()`` blocks."""

    def __init__(self, engine: RolloutEngine, *, model: str, fingerprint: dict[str, Any], host: str = "127.0.0.1",
                 port: int = 8000, engine_name: str = ""):
        self.engine = engine
        self.info = {"status": "ok", "model": model, "engine": engine_name or type(engine).__name__,
                     "fingerprint": fingerprint, "pixel_caps": getattr(engine, "pixel_caps", None)}
        self.weight_updates = 0
        self.sampler = BatchingSampler(engine)
        self._lock = self.sampler.engine_lock  # weight updates wait for sampling and the other way round
        self._thread: threading.Thread | None = None
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "RolloutServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rollout-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        logger.info("rollout server (%s, %s) on %s", self.info["engine"], self.info["model"], self.url)
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- routes -----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {**self.info, "weight_updates": self.weight_updates}

    def generate(self, body: bytes) -> dict[str, Any]:
        prompts, sampling = decode_generate_request(body)
        return encode_rollouts(self.sampler.sample(prompts, sampling))

    def update_weights(self, body: bytes) -> dict[str, Any]:
        weights, _ = from_bytes(body)
        with self._lock:
            self.engine.load_weights(weights)
        return {"loaded": len(weights)}

    def finish_weight_update(self, body: bytes) -> dict[str, Any]:
        with self._lock:
            self.engine.finish_weight_update()
            self.weight_updates += 1
        return {"weight_updates": self.weight_updates}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self
        posts = {"/generate": server.generate, "/update_weights": server.update_weights,
                 "/finish_weight_update": server.finish_weight_update}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - the http.server naming
                if self.path == "/health":
                    self._reply(HTTPStatus.OK, server.health())
                else:
                    self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route GET {self.path}"})

            def do_POST(self) -> None:  # noqa: N802
                route = posts.get(self.path)
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    self.close_connection = True  # the body's end is unknown
                    self._reply(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
                    return
                body = self.rfile.read(length)
                if route is None:
                    self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route POST {self.path}"})
                    return
                try:
                    self._reply(HTTPStatus.OK, route(body))
                except (ValueError, KeyError, TypeError) as exc:  # the request is wrong
                    logger.warning("%s: bad request: %s", self.path, exc)
                    self._reply(HTTPStatus.BAD_REQUEST, {"error": f"{type(exc).__name__}: {exc}"})
                except Exception as exc:  # noqa: BLE001 - report it; keep serving
                    logger.exception("%s failed", self.path)
                    self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base signature
                logger.debug("%s %s", self.address_string(), format % args)

        return Handler
