"""TimeBudget: the learning rate follows a cosine over training time and training stops on budget."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from ume_train.callbacks import TimeBudget


def test_cosine_over_time_with_warmup():
    budget = TimeBudget(minutes=10, peak_lr=1.0, warmup=0.1)
    expected = {0: 0.0, 30: 0.5, 60: 1.0, 330: 0.5, 600: 0.0, 900: 0.0}  # seconds -> factor, by hand
    for seconds, factor in expected.items():
        budget.train_s = seconds
        assert budget.lr_factor() == pytest.approx(factor, abs=1e-12)
    budget.train_s = 195  # a quarter of the way through the cosine part
    assert budget.lr_factor() == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_sets_the_rate_and_stops_when_spent(monkeypatch):
    clock = iter([0.0, 100.0, 100.0, 400.0])  # step 1 takes 100 s, step 2 takes 300 s
    monkeypatch.setattr("ume_train.callbacks.time.perf_counter", lambda: next(clock))
    budget = TimeBudget(minutes=10, peak_lr=2.0, warmup=0.0, stop_after=5)
    opt = SimpleNamespace(param_groups=[{"lr": None}, {"lr": None, "lr_scale": 3.0}])  # SFTConfig.vision_lr
    control = SimpleNamespace(should_training_stop=False)
    budget.on_step_begin(None, None, control, optimizer=opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0) and opt.param_groups[1]["lr"] == pytest.approx(6.0)
    budget.on_step_end(None, None, control)
    assert not control.should_training_stop
    budget.on_step_begin(None, None, control, optimizer=opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 100 / 600)))
    assert opt.param_groups[1]["lr"] == pytest.approx(3 * opt.param_groups[0]["lr"])
    budget.on_step_end(None, None, control)
    assert control.should_training_stop and budget.done  # 400 s >= stop_after 300 s
    with pytest.raises(ValueError):
        TimeBudget(minutes=0, peak_lr=1.0)
