"""Merge the generate requests that training processes post at the same time into one engine call.

With one engine and many training processes, running requests one after another would leave
vLLM batching a single process's prompts at a time. Here whichever request thread holds the
engine serves every request waiting by then: while one call runs, the others queue up and go
together in the next. Seeds are per prompt, so merging changes no rollout. If a merged call
fails, its requests are retried one by one, so one bad request does not fail the others.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from .generator import Rollout
from .wire import SamplingRequest

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    prompts: list[Any]
    sampling: SamplingRequest
    result: list[list[Rollout]] | None = None
    error: BaseException | None = None
    done: bool = False

    def key(self) -> tuple:
        s = self.sampling
        return (s.num_generations, s.max_new_tokens, s.temperature, s.top_p)


@dataclass
class BatchingSampler:
    engine: Any  # a RolloutEngine: sampling settings as attributes, generate(prompts, G, seeds)
    engine_lock: threading.Lock = field(default_factory=threading.Lock)
    engine_calls: int = 0
    _pending: list[_Job] = field(default_factory=list)
    _queue_lock: threading.Lock = field(default_factory=threading.Lock)

    def sample(self, prompts: list[Any], sampling: SamplingRequest) -> list[list[Rollout]]:
        job = _Job(prompts, sampling)
        with self._queue_lock:
            self._pending.append(job)
        with self.engine_lock:  # the holder serves everything pending; a job is done once we get here
            if not job.done:
                with self._queue_lock:
                    batch, self._pending = self._pending, []
                self._serve(batch)
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _serve(self, batch: list[_Job]) -> None:
        groups: dict[tuple, list[_Job]] = {}
        for job in batch:
            groups.setdefault(job.key(), []).append(job)
        for jobs in groups.values():
            try:
                self._run(jobs)
            except Exception as exc:  # noqa: BLE001 - find the request at fault, serve the rest
                if len(jobs) == 1:
                    jobs[0].error = exc
                else:
                    logger.warning("a merged generate call of %d requests failed: retrying them one by one", len(jobs))
                    for job in jobs:
                        try:
                            self._run([job])
                        except Exception as one:  # noqa: BLE001
                            job.error = one
            for job in jobs:
                job.done = True

    def _run(self, jobs: list[_Job]) -> None:
        s = jobs[0].sampling
        self.engine.max_new_tokens, self.engine.temperature, self.engine.top_p = s.max_new_tokens, s.temperature, s.top_p
        prompts = [p for job in jobs for p in job.prompts]
        seeds = [seed for job in jobs for seed in job.sampling.seeds]
        self.engine_calls += 1
        rollouts = self.engine.generate(prompts, s.num_generations, seeds)
        start = 0
        for job in jobs:
            job.result = rollouts[start:start + len(job.prompts)]
            start += len(job.prompts)

