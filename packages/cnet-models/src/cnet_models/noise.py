"""The diffusion training arithmetic, from the scheduler's own config.

Noising, the prediction target (epsilon, v or sample, whichever the model folder's scheduler
says) and min-SNR loss weights. The cumulative alphas come from the scheduler, never from
constants, and are computed the way diffusers computes them so targets match
`scheduler.add_noise` and `scheduler.get_velocity` exactly.
"""

from __future__ import annotations

import torch

from cnet_models.facade import DDPMScheduler


class NoiseSchedule:
    """A scheduler's alphas as tensors on the training device."""

    def __init__(self, scheduler: DDPMScheduler) -> None:
        self.prediction_type = str(scheduler.config["prediction_type"])
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"scheduler prediction_type {self.prediction_type!r} is not one of epsilon, "
                "v_prediction, sample"
            )
        self.num_train_timesteps = int(scheduler.config["num_train_timesteps"])
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().clone().to(torch.float32)

    def _coefficients(
        self, timesteps: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast against `like`."""
        alphas = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (alphas**0.5).reshape(shape), ((1 - alphas) ** 0.5).reshape(shape)

    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * latents + sigma * noise

    def target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the model should predict for these noised latents."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return latents
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * noise - sigma * latents

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        alphas = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return alphas / (1 - alphas)

    def min_snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Per-sample loss weights of Min-SNR-gamma (Hang et al., 2023) for this target.

        min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v (whose loss
        already carries a factor SNR + 1 relative to the x0 loss), min(SNR, gamma) for sample.
        """
        if gamma <= 0:
            raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
        snr = self.snr(timesteps)
        clipped = torch.clamp(snr, max=gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped
