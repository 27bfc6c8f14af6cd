"""Noising, targets and min-SNR weights against the scheduler's own arithmetic."""

from __future__ import annotations

import pytest
import torch

from cnet_models.facade import DDPMScheduler
from cnet_models.noise import NoiseSchedule


def _scheduler(prediction_type: str) -> DDPMScheduler:
    scheduler: DDPMScheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        prediction_type=prediction_type,
    )
    return scheduler


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(5, 4, 8, 8, generator=g)
    noise = torch.randn(5, 4, 8, 8, generator=g)
    return latents, noise, torch.tensor([0, 1, 250, 500, 999])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noising_and_targets_match_the_scheduler(prediction_type: str) -> None:
    scheduler = _scheduler(prediction_type)
    schedule = NoiseSchedule(scheduler)
    latents, noise, t = _batch()
    noised = scheduler.add_noise(latents, noise, t)  # type: ignore[arg-type]
    assert torch.equal(schedule.add_noise(latents, noise, t), noised)
    target = schedule.target(latents, noise, t)
    expected = {
        "epsilon": noise,
        "v_prediction": scheduler.get_velocity(latents, noise, t),  # type: ignore[arg-type]
        "sample": latents,
    }[prediction_type]
    assert torch.equal(target, expected)


def test_min_snr_weights_by_hand() -> None:
    *_, t = _batch()
    acp = _scheduler("epsilon").alphas_cumprod[t]
    snr = acp / (1 - acp)
    clipped = torch.clamp(snr, max=5.0)
    eps = NoiseSchedule(_scheduler("epsilon")).min_snr_weights(t, 5.0)
    v = NoiseSchedule(_scheduler("v_prediction")).min_snr_weights(t, 5.0)
    torch.testing.assert_close(eps, clipped / snr)
    torch.testing.assert_close(v, clipped / (snr + 1))
    assert eps[0] < 1 and eps[-1] == 1  # clean timesteps are down-weighted, noisy ones kept
    with pytest.raises(ValueError, match="gamma must be positive"):
        NoiseSchedule(_scheduler("epsilon")).min_snr_weights(t, 0)


def test_unknown_prediction_type_is_refused() -> None:
    scheduler = _scheduler("epsilon")
    scheduler.register_to_config(prediction_type="flow")  # type: ignore[no-untyped-call]
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        NoiseSchedule(scheduler)
