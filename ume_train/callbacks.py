"""``TimeBudget``: train for a wall-clock budget instead of a step count.

On a shared or unknown machine a step count guessed in advance either overruns the time one
has or leaves the schedule unfinished. This callback drives the learning rate as a cosine (with
linear warmup) over TRAINING time and stops when the budget is spent, so a run always ends its
schedule on time. Time spent in other callbacks (evaluations) is not counted.
"""

from __future__ import annotations

import math
import time

from transformers import TrainerCallback


class TimeBudget(TrainerCallback):
    """Cosine learning rate over ``minutes`` of training time (``warmup`` fraction linear), then stop.

    ``stop_after`` (minutes) ends training earlier while keeping the schedule planned for
    ``minutes`` (a checkpoint stopped mid-schedule). Use with ``max_steps`` large and
    ``lr_scheduler_type="constant"``: this callback sets the rate itself before every step.
    """

    def __init__(self, minutes: float, peak_lr: float, warmup: float = 0.03, stop_after: float | None = None):
        if minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        self.budget_s = minutes * 60
        self.stop_s = min(stop_after * 60, self.budget_s) if stop_after else self.budget_s
        self.peak_lr = peak_lr
        self.warmup = warmup
        self.train_s = 0.0
        self._t: float | None = None

    def lr_factor(self) -> float:
        progress = min(self.train_s / self.budget_s, 1.0)
        if progress < self.warmup:
            return progress / self.warmup
        return 0.5 * (1 + math.cos(math.pi * (progress - self.warmup) / (1 - self.warmup)))

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            for group in optimizer.param_groups:
                # lr_scale: a group trained at another rate than peak_lr (SFTConfig.vision_lr)
                group["lr"] = self.peak_lr * self.lr_factor() * group.get("lr_scale", 1.0)
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t is not None:
            self.train_s += time.perf_counter() - self._t
        if self.train_s >= self.stop_s:
            control.should_training_stop = True

    @property
    def done(self) -> bool:
        return self.train_s >= self.stop_s
