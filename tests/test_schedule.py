"""The learning-rate schedule every node job and the baseline walk: over the run's global steps."""

import pytest

from node_payload.common.run_config import TrainTable
from node_payload.train import Schedule


def test_cosine_runs_over_global_steps_to_zero() -> None:
    schedule = Schedule.for_run(TrainTable(lr=0.1), job_steps=10, positions=8)
    assert schedule.total_steps == 80
    rates = [schedule.lr(step) for step in range(80)]
    assert rates[0] == pytest.approx(0.1)
    assert rates == sorted(rates, reverse=True)
    assert rates[40] == pytest.approx(0.05, rel=0.05)  # half way: half the rate
    assert 0 < rates[-1] < 0.001  # the last round ends near 0, not at a floor


def test_warmup_rises_linearly_then_decays() -> None:
    schedule = Schedule.for_run(TrainTable(lr=0.2, warmup=0.1), job_steps=10, positions=10)
    assert schedule.warmup_steps == 10
    assert [schedule.lr(s) for s in (0, 4, 9)] == pytest.approx([0.02, 0.1, 0.2])
    assert schedule.lr(10) == pytest.approx(0.2)
    assert schedule.lr(99) < 0.001


def test_constant_schedule_keeps_its_rate_after_warmup() -> None:
    schedule = Schedule.for_run(TrainTable(lr=0.05, lr_schedule="constant"), 4, 3)
    assert {schedule.lr(s) for s in range(12)} == {0.05}
