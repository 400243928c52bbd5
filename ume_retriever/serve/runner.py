"""Start and stop the service: Ray (local or a cluster), the three deployments, the HTTP proxy.

``run_service(config)`` blocks until Ctrl-C or SIGTERM, then shuts down cleanly: Serve lets
in-flight requests finish (up to ``graceful_shutdown_s``; an ingest cut past that is
re-runnable, the manifest being written last per file) and the index replica closes its
store. A local Ray instance started here is stopped; a cluster given by address is left
running with our application deleted from it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable

from .config import ServeConfig

logger = logging.getLogger(__name__)
APP_NAME = "ume"


def build_application(config: ServeConfig, gpus_per_encoder: float = 0.0) -> Any:
    """The Serve application graph: ingress -> (encoder replicas, index replica(s))."""
    from .app import UMEService
    from .deployments import EncoderService, IndexService

    grace = config.graceful_shutdown_s
    encoder = EncoderService.options(
        num_replicas=config.replicas,
        # a batch is formed from queued requests: the replica must accept at least a batch's worth
        max_ongoing_requests=max(4 * config.max_batch_size, 32),
        ray_actor_options={"num_gpus": gpus_per_encoder, "num_cpus": 0 if gpus_per_encoder else 1},
        graceful_shutdown_timeout_s=grace,
    ).bind(config)
    index = IndexService.options(
        num_replicas=config.search_replicas, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=grace,
    ).bind(encoder, config)
    return UMEService.options(
        max_ongoing_requests=512, ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=grace,
    ).bind(encoder, index, config)


def run_service(config: ServeConfig, ready: Callable[[str], None] | None = None,
                stop: threading.Event | None = None) -> None:
    """Serve until a signal (or ``stop``) arrives. ``ready(url)`` is called once it answers."""
    import ray
    from ray import serve

    stop = stop or threading.Event()
    previous: dict = {}
    started_ray = False
    try:
        if config.ray_address:
            ray.init(address=config.ray_address, logging_level=logging.WARNING)
        else:
            # a new local instance (never one another process started); logical CPUs: one per
            # encoder replica at least, whatever this machine has
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, config.replicas), include_dashboard=False,
                     logging_level=logging.WARNING)
            started_ray = True
        # after ray.init, which installs its own SIGTERM handler (one that aborts the driver)
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        serve.start(http_options={"host": config.host, "port": config.port,
                                  "keep_alive_timeout_s": config.keep_alive_s})
        serve.run(build_application(config, gpus), name=APP_NAME, route_prefix="/")
        url = f"http://{config.host}:{config.port}"
        _warm_up(url)
        logger.info("serving %s on %s (%d encoder replica(s), %s)", config.model, url, config.replicas,
                       "GPU" if gpus else "CPU")
        if ready is not None:
            ready(url)
        while not stop.wait(0.5):
            pass
        logger.info("shutting down: waiting for requests in flight (up to %.0fs)", config.graceful_shutdown_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            if started_ray:
                serve.shutdown()
            elif ray.is_initialized():
                serve.delete(APP_NAME)
        finally:
            if ray.is_initialized():
                ray.shutdown()


def _warm_up(url: str) -> None:
    """One /health through every hop before saying "ready": the first request routed through a
    fresh deployment handle waits seconds for its routing table (measured: ~10 s on 2 cores)."""
    import httpx

    host = url.replace("://0.0.0.0", "://127.0.0.1").replace("://[::]", "://[::1]")
    try:
        httpx.get(host + "/health", timeout=120).raise_for_status()
    except httpx.HTTPError as exc:
        logger.warning("the service does not answer /health yet (%s); serving anyway", exc)
