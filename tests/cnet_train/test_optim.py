"""The learning-rate schedules: diffusers' `get_scheduler` by its names, stepped once per
optimizer step, and the config that refuses what a schedule would silently ignore."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import yaml

from cnet_train.config import ScheduleConfig
from cnet_train.config_io import ConfigError, config_from_dict
from cnet_train.optim import POLYNOMIAL_END_LR, build_scheduler

PEAK = 1e-3
WARMUP = 4
STEPS = 20
MIDDLE = WARMUP + (STEPS - WARMUP) // 2
"""The middle of the decay after the warm-up."""
MINIMAL = yaml.safe_load("run_dir: r\nmodel: {source: m}\ndata: {source: {path: d.jsonl}}\n")


def _rates(config: ScheduleConfig, lr: float = PEAK) -> list[float]:
    """The learning rate of each optimizer step 0..STEPS, as Lightning steps the scheduler."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, config, STEPS)
    rates = []
    for _ in range(STEPS + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize(
    ("config", "middle", "end"),
    [
        (ScheduleConfig("constant_with_warmup", WARMUP), PEAK, PEAK),
        (ScheduleConfig("linear", WARMUP), PEAK / 2, 0.0),
        (ScheduleConfig("cosine", WARMUP), PEAK / 2, 0.0),
        # Two cycles: the middle of the decay is where the second one restarts at the peak.
        (ScheduleConfig("cosine_with_restarts", WARMUP, num_cycles=2), PEAK, 0.0),
        (
            ScheduleConfig("polynomial", WARMUP, power=2.0),
            (PEAK - POLYNOMIAL_END_LR) * 0.5**2 + POLYNOMIAL_END_LR,
            POLYNOMIAL_END_LR,
        ),
    ],
    ids=lambda v: v.name if isinstance(v, ScheduleConfig) else None,
)
def test_schedule_values_at_start_warmup_middle_and_end(
    config: ScheduleConfig, middle: float, end: float
) -> None:
    rates = _rates(config)
    assert rates[0] == 0.0  # diffusers' warm-up starts from zero
    assert rates[WARMUP // 2] == pytest.approx(PEAK / 2)  # linear on the way up
    assert rates[WARMUP] == pytest.approx(PEAK)
    assert rates[MIDDLE] == pytest.approx(middle, abs=1e-12)
    assert rates[STEPS] == pytest.approx(end, abs=1e-12)


def test_cosine_with_restarts_falls_within_each_cycle() -> None:
    rates = _rates(ScheduleConfig("cosine_with_restarts", WARMUP, num_cycles=2))
    quarter = WARMUP + (STEPS - WARMUP) // 4  # the middle of the first cycle
    assert rates[quarter] == pytest.approx(PEAK / 2)
    assert rates[MIDDLE - 1] < rates[quarter] < rates[WARMUP]


def test_constant_is_the_peak_from_the_first_step() -> None:
    assert _rates(ScheduleConfig()) == [PEAK] * (STEPS + 1)


def test_polynomial_needs_a_peak_above_its_end() -> None:
    with pytest.raises(ValueError, match=r"optimizer\.lr is 1e-07"):
        _rates(ScheduleConfig("polynomial", WARMUP), lr=POLYNOMIAL_END_LR)


def _problems(schedule: dict[str, Any]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({**MINIMAL, "schedule": schedule})
    return caught.value.problems


def test_constant_with_a_warmup_is_refused_naming_constant_with_warmup() -> None:
    (problem,) = _problems({"name": "constant", "warmup_steps": 100})
    assert problem.startswith("schedule: ")
    assert "use constant_with_warmup" in problem and "is 100" in problem


@pytest.mark.parametrize(
    ("schedule", "reader"),
    [
        ({"name": "cosine", "num_cycles": 3}, "cosine_with_restarts"),
        ({"name": "linear", "power": 2.0}, "polynomial"),
    ],
)
def test_a_shape_option_the_schedule_ignores_is_refused(
    schedule: dict[str, Any], reader: str
) -> None:
    (problem,) = _problems(schedule)
    assert f"read only by schedule.name {reader}, not by {schedule['name']}" in problem


def test_the_schedule_names_are_diffusers_names() -> None:
    from diffusers.optimization import SchedulerType

    names = {"constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"}
    for name in [*names, "polynomial"]:
        assert SchedulerType(name).value == name
        assert config_from_dict({**MINIMAL, "schedule": {"name": name}}).schedule.name == name
    assert "piecewise_constant" in _problems({"name": "piecewise_constant"})[0]
