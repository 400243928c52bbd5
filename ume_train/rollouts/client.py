"""``ServerRollouts``: GRPO rollouts from a ``ume-train rollout-server`` (see ``server``).

Every training process posts its own prompts (the server merges what arrives together).
``sync_weights`` streams the policy's full weights in safetensors chunks, two in flight: all
processes take part in gathering sharded parameters, process 0 alone sends, and everyone
waits until the server has them, so no process samples from stale weights.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from torch import nn

from ume_retriever.model.checkpoint import pixel_caps
from ume_retriever.model.preprocess import PreparedInput

from .generator import Rollout
from .wire import API_KEY_ENV, SamplingRequest, config_fingerprint, decode_rollouts, encode_generate_request
from .weight_sync import DEFAULT_CHUNK_BYTES, named_full_weights, to_bytes, weight_chunks

logger = logging.getLogger(__name__)




class RolloutServerError(RuntimeError):
    """The rollout server refused a request or could not be reached; ``status``: its HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ServerRollouts:
    def __init__(self, url: str, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 connect_timeout: float = 600.0, request_timeout: float = 3600.0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, chunks_in_flight: int = 2, api_key: str | None = None):
        """Waits up to ``connect_timeout`` seconds for the server to come up (it may still be loading).
        ``chunks_in_flight``: weight chunks being serialised/sent at once during a sync.
        ``api_key``: the server's key (default: ``$UME_ROLLOUT_API_KEY``), sent as a bearer token."""
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.request_timeout = request_timeout
        self.chunk_bytes = chunk_bytes
        self.chunks_in_flight = max(1, chunks_in_flight)
        self.info = self._wait_for_server(connect_timeout)

    def _wait_for_server(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._request("GET", "/health", timeout=10)
            except RolloutServerError as exc:
                if exc.status == 401:  # it is up, and waiting will not change its mind
                    raise
                if time.monotonic() >= deadline:
                    raise RolloutServerError(f"no rollout server at {self.url} after {timeout:.0f} s "
                                             f"(start one with `ume-train rollout-server --model ...`): {exc}") from None
                logger.info("waiting for the rollout server at %s", self.url)
                time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))

    def _request(self, method: str, path: str, body: bytes | None = None, timeout: float | None = None) -> dict:
        limit = (getattr(self, "info", None) or {}).get("limits", {}).get("max_body_bytes")
        if body is not None and limit is not None and len(body) > limit:
            raise RolloutServerError(f"rollout server {self.url}{path}: a request of {len(body)} bytes is above the "
                                     f"server's max_body_bytes={limit}: start it with a larger --max-body-bytes",
                                     status=413)
        headers = {"Content-Type": "application/octet-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.request_timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                reason = exc.reason
            hint = ""
            if exc.code == 401:
                hint = (f" (give the trainer the server's key: rollout_server_api_key or ${API_KEY_ENV})"
                        if not self.api_key else " (the trainer's key is not the server's)")
            raise RolloutServerError(f"rollout server {self.url}{path}: {exc.code} {reason}{hint}",
                                     status=exc.code) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise RolloutServerError(f"rollout server {self.url}{path}: {type(exc).__name__}: {exc}") from None

    def check_model(self, config: Any, processor: Any = None) -> None:
        """Refuse to train against a server that holds a different model, or that would cut images
        into another visual-token grid than the policy's processor (``processor``)."""
        ours, theirs = config_fingerprint(config), self.info.get("fingerprint")
        if ours != theirs:
            raise ValueError(f"the rollout server at {self.url} serves {self.info.get('model')} whose config "
                             f"{theirs} differs from the policy's {ours}")
        served_caps = self.info.get("pixel_caps")
        if processor is not None and served_caps is not None and pixel_caps(processor) != served_caps:
            raise ValueError(f"the rollout server at {self.url} sizes images with [min, max] pixels {served_caps}, "
                             f"the policy's processor with {pixel_caps(processor)}: start the server with the "
                             f"trainer's --min-pixels/--max-pixels")

    def generate(self, prompts: list[PreparedInput], num_generations: int, seeds: list[int]) -> list[list[Rollout]]:
        sampling = SamplingRequest(num_generations=num_generations, seeds=list(seeds),
                                   max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p)
        reply = self._request("POST", "/generate", encode_generate_request(prompts, sampling))
        rollouts = decode_rollouts(reply)
        if len(rollouts) != len(prompts) or any(len(g) != num_generations for g in rollouts):
            raise RolloutServerError(f"rollout server returned {[len(g) for g in rollouts]} rollouts for "
                                     f"{len(prompts)} prompts x {num_generations}")
        return rollouts

    def sync_weights(self, model: nn.Module) -> None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        sender = not distributed or dist.get_rank() == 0
        errors: list[str] = []
        # Chunks in flight: one is serialised and sent while the server loads another.
        with ThreadPoolExecutor(max_workers=self.chunks_in_flight) as pool:
            inflight: deque[Future] = deque()
            for chunk in weight_chunks(named_full_weights(model), self.chunk_bytes):
                # Keep iterating after a failure: the other processes are in the same gathers.
                if sender and not errors:
                    inflight.append(pool.submit(self._send_chunk, chunk))
                    while len(inflight) >= self.chunks_in_flight or (inflight and inflight[0].done()):
                        errors += _failure(inflight.popleft())
            while inflight:
                errors += _failure(inflight.popleft())
        if sender and not errors:
            try:
                self._request("POST", "/finish_weight_update", b"")
            except Exception as exc:  # noqa: BLE001 - whatever it is, the others must hear of it
                errors.append(str(exc))
        error = errors[0] if errors else None
        if distributed:  # every process learns the outcome (and none samples before the update landed)
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise RolloutServerError(f"weight sync failed: {error}")

    def _send_chunk(self, chunk: dict) -> None:
        try:
            self._request("POST", "/update_weights", to_bytes(chunk))
        except RolloutServerError as exc:
            if exc.status == 413:  # name what did not fit
                names = ", ".join(list(chunk)[:3]) + (" ..." if len(chunk) > 3 else "")
                raise RolloutServerError(f"{exc} (weights {names})", status=413) from None
            raise


def _failure(future: Future) -> list[str]:
    """[the error] if the chunk's send failed, else []."""
    exc = future.exception()
    return [] if exc is None else [str(exc)]
