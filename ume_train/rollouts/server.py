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

Hardening: with an API key (``--api-key`` or ``$UME_ROLLOUT_API_KEY``) every route wants
``Authorization: Bearer KEY`` (401 otherwise; compared in constant time), and without one the
server refuses to listen on anything but a loopback address unless told ``--insecure``. A
body must state its Content-Length (400 when missing, negative or unreadable) and stay within
``max_body_bytes`` (413, before a byte of it is read). Every socket read and write times out
(``timeout`` seconds; a client that promises a body and never sends it gets a 408 and its
thread back). Sampling settings and token ids are checked before they reach the engine
(``wire.RequestLimits``).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
import threading
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import torch

from ume_retriever.model.checkpoint import pixel_caps, set_pixel_caps

from .batching import BatchingSampler
from .generator import Rollout, TransformersRollouts
from .weight_sync import from_bytes, load_full_weights
from .wire import API_KEY_ENV, RequestLimits, config_fingerprint, decode_generate_request, encode_rollouts

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 60.0  # seconds a socket read or write may wait (idle keep-alive included)


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False  # "" listens on every interface
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_listen_address(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse (``ValueError``, one line) to serve a non-loopback address without an API key:
    whoever reaches the port could replace the model's weights."""
    if api_key or insecure or is_loopback(host):
        return
    raise ValueError(f"refusing to listen on {host!r} without an API key: anyone who can reach it could replace "
                     f"the model's weights; pass --api-key (or set {API_KEY_ENV}), or --insecure to serve it anyway")


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
                 port: int = 8000, engine_name: str = "", api_key: str | None = None, insecure: bool = False,
                 limits: RequestLimits | None = None, timeout: float = DEFAULT_TIMEOUT):
        """``api_key``: the bearer token every request must carry (None: no authentication,
        which only a loopback ``host`` or ``insecure=True`` allows). ``limits``: what one request
        may hold. ``timeout``: seconds any socket read or write may wait."""
        check_listen_address(host, api_key, insecure)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.engine = engine
        self.api_key = api_key or None
        self.limits = limits or RequestLimits()
        self.timeout = timeout
        self.vocab_size = fingerprint.get("vocab_size")  # token ids at or above it are refused
        self.info = {"status": "ok", "model": model, "engine": engine_name or type(engine).__name__,
                     "fingerprint": fingerprint, "pixel_caps": getattr(engine, "pixel_caps", None),
                     "limits": asdict(self.limits)}
        self.weight_updates = 0
        self.sampler = BatchingSampler(engine)
        self._lock = self.sampler.engine_lock  # weight updates wait for sampling and the other way round
        self._thread: threading.Thread | None = None
        self._serving = False
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "RolloutServer":
        self._serving = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rollout-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        logger.info("rollout server (%s, %s) on %s%s", self.info["engine"], self.info["model"], self.url,
                    "" if self.api_key else " (no API key)")
        self._serving = True
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        if self._serving:  # httpd.shutdown() waits for a serve_forever loop: never started, it would wait forever
            self.httpd.shutdown()
        self.httpd.server_close()

    # -- routes -----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {**self.info, "weight_updates": self.weight_updates}

    def generate(self, body: bytes) -> dict[str, Any]:
        prompts, sampling = decode_generate_request(body, vocab_size=self.vocab_size, limits=self.limits)
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
            timeout = server.timeout  # StreamRequestHandler sets it on the socket: every read and write

            def _reply(self, status: int, payload: dict[str, Any], *, close: bool = False,
                       headers: tuple[tuple[str, str], ...] = ()) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers:
                    self.send_header(key, value)
                if close:  # the request's body was not read: the connection cannot carry another
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(data)
                if close:
                    self._linger()

            def _linger(self) -> None:
                """Close gently after refusing a body: stop writing, then read and drop what the
                client is still sending (at most 1 MiB, 1 s). Closing on unread data sends a TCP
                reset that can destroy the reply before the client reads it."""
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_WR)
                    self.connection.settimeout(1.0)
                    left = 2**20
                    while left > 0:
                        chunk = self.connection.recv(min(left, 65536))
                        if not chunk:
                            break
                        left -= len(chunk)
                except OSError:  # timed out, or the client is gone: either way, done
                    pass

            def _authorised(self) -> bool:
                if server.api_key is None:
                    return True
                scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
                given = token.strip().encode("utf-8", "surrogateescape")
                if scheme.lower() == "bearer" and hmac.compare_digest(given, server.api_key.encode()):
                    return True
                self._reply(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong API key (send 'Authorization: "
                                                               "Bearer KEY' with the server's --api-key)"},
                            close=True, headers=(("WWW-Authenticate", 'Bearer realm="ume-rollout-server"'),))
                return False

            def _content_length(self) -> int | None:
                """The body's length, or None after refusing the request (400, 413)."""
                values = self.headers.get_all("Content-Length") or []
                error = None
                if self.headers.get("Transfer-Encoding"):
                    error = "chunked bodies are not accepted: send Content-Length"
                elif not values:
                    error = "Content-Length is required"
                elif len(set(values)) > 1:
                    error = "bad Content-Length: given more than once"
                else:
                    try:
                        length = int(values[0])
                    except ValueError:
                        error = "bad Content-Length"
                    else:
                        if length < 0:
                            error = f"bad Content-Length: {length} is negative"
                if error is not None:
                    self._reply(HTTPStatus.BAD_REQUEST, {"error": error}, close=True)
                    return None
                if length > server.limits.max_body_bytes:
                    self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                {"error": f"a body of {length} bytes is above this server's max_body_bytes="
                                          f"{server.limits.max_body_bytes} (start it with a larger --max-body-bytes)"},
                                close=True)
                    return None
                return length

            def do_GET(self) -> None:  # noqa: N802 - the http.server naming
                if not self._authorised():
                    return
                if self.path == "/health":
                    self._reply(HTTPStatus.OK, server.health())
                else:
                    self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route GET {self.path}"})

            def do_POST(self) -> None:  # noqa: N802
                if not self._authorised():
                    return
                route = posts.get(self.path)
                if route is None:
                    self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route POST {self.path}"}, close=True)
                    return
                length = self._content_length()
                if length is None:
                    return
                try:
                    body = self.rfile.read(length)
                except TimeoutError:
                    logger.warning("%s: no body after %.0f s from %s: dropped", self.path, server.timeout,
                                   self.address_string())
                    self._reply(HTTPStatus.REQUEST_TIMEOUT, {"error": f"the body did not arrive within "
                                                                      f"{server.timeout:g} s"}, close=True)
                    return
                if len(body) < length:  # the client went away mid-body
                    self.close_connection = True
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
