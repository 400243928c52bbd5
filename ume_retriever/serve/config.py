"""``ServeConfig``: everything ``ume serve`` is started with, validated before anything loads."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Sequence

MiB = 1024 * 1024


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@dataclass
class ServeConfig:
    """How the service runs: model, store, network, security limits, Ray and batching.

    ``api_key`` None means no authentication, allowed only on a loopback address unless
    ``insecure``. ``allow_roots``: server-side folders ``POST /v1/index`` may read (none: that
    route only takes uploads). The ``max_*`` fields cap what one request may ask for.
    """

    model: str
    store: str | None = "ume-index"  # embedded store folder (None with url)
    url: str | None = None  # a Qdrant server or cluster instead
    qdrant_api_key: str | None = None
    collection: str = "ume"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False
    allow_roots: Sequence[str] = ()
    upload_dir: str | None = None  # where uploaded files are kept (default: <store>/uploads)
    served_model_name: str | None = None  # the name /v1/models lists (default: model)
    # encoders
    replicas: int = 1
    search_replicas: int = 1
    device: str | None = None
    dtype: str | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    backfill: bool = True  # compute pending gen vectors (gen="later") in the service
    # Ray
    ray_address: str | None = None
    # limits
    max_body_bytes: int = 16 * MiB
    max_upload_bytes: int = 512 * MiB
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = 50_000_000
    max_inputs: int = 256
    max_k: int = 1000
    max_gen_samples: int = 8
    body_timeout_s: float = 30.0  # a client must send its whole request body within this
    request_timeout_s: float = 300.0  # embeddings and searches; index requests are not limited
    graceful_shutdown_s: float = 60.0  # in-flight requests get this long to finish on shutdown
    keep_alive_s: int = 5
    extra_served_names: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if (self.store is None) == (self.url is None):
            raise ValueError("give an embedded store folder or a Qdrant url, one of them")
        if not self.api_key and not is_loopback(self.host) and not self.insecure:
            raise ValueError(f"refusing to listen on {self.host} without an API key: anyone who can reach it "
                             "could read and change the index. Set --api-key (or UME_API_KEY), listen on "
                             "127.0.0.1, or pass --insecure if something in front of it authenticates")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("the API key must be at least 8 characters")
        for name in ("replicas", "search_replicas", "max_batch_size", "max_inputs", "max_k", "max_gen_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.url is None and self.search_replicas > 1:
            raise ValueError("the embedded store is single-process: one search replica only "
                             "(use a Qdrant server, --url, for several)")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        self.allow_roots = tuple(os.path.realpath(os.path.expanduser(r)) for r in self.allow_roots)
        for root in self.allow_roots:
            if not os.path.isdir(root):
                raise ValueError(f"--allow-root {root}: not a folder")

    @property
    def served_names(self) -> tuple[str, ...]:
        """Model names a request may ask for (the OpenAI ``model`` field)."""
        names = [self.served_model_name or self.model, self.model, *self.extra_served_names]
        return tuple(dict.fromkeys(n for n in names if n))

    @property
    def uploads(self) -> str:
        if self.upload_dir:
            return os.path.abspath(self.upload_dir)
        base = self.store if self.store is not None else os.path.join(os.getcwd(), "ume-uploads")
        return os.path.abspath(os.path.join(base, "uploads") if self.store is not None else base)
