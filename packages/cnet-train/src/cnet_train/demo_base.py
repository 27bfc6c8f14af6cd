"""The demo's base model: a tiny model of the family, first fitted to the fill data, cached.

A ControlNet steers a base model that already knows its images; the demo starts the same way a
real run starts from a pretrained Stable Diffusion. A tiny random base knows nothing, so a
ControlNet trained on it only learns to correct the base, and what it learns has nothing to do
with the condition. So the demo first fits the tiny VAE (to reconstruct fill images) and then
the tiny UNet (to denoise their latents given the caption, which names the colours and the
shape but not where the shape is). What is left for the ControlNet is what only the outline
says: where the shape goes and what it looks like.

The fit takes about a minute on a laptop CPU and is cached, keyed by a hash of everything that
produced it (family, fit settings, format version, torch and diffusers versions), under
`$XDG_CACHE_HOME/cnet/demo-base/` (`~/.cache/cnet/demo-base/` by default), written atomically,
weights as safetensors (diffusers' `save_pretrained`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from cnet_data.synthetic import fill_samples
from cnet_models.atomic import replace_dir_atomically
from cnet_models.configs import BaseModelConfig
from cnet_models.facade import AutoencoderKL, UNet2DConditionModel, unet_forward
from cnet_models.families import FamilyName
from cnet_models.loading import BaseModel, load_base_model
from cnet_models.noise import NoiseSchedule
from cnet_models.tiny import write_tiny_model

FORMAT_VERSION = 1
"""Bumped whenever the fit below changes in a way its settings do not record."""


@attrs.frozen
class BaseFitConfig:
    """How the demo's tiny base model is fitted to the fill data before the ControlNet trains."""

    samples: int = 384
    """Generated fill samples (a seed of their own: none is a demo training or held-out one)."""
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (80, 48), (48, 80))
    """(width, height) of the samples, cycled; the demo's buckets."""
    batch_size: int = 8
    """Samples per step (one size per batch)."""
    vae_steps: int = 300
    """Optimizer steps of the VAE (reconstruction only; see `fit_vae`)."""
    vae_lr: float = 2e-3
    """Adam learning rate of the VAE."""
    unet_steps: int = 1200
    """Optimizer steps of the UNet (the family's diffusion loss, caption-conditioned)."""
    unet_lr: float = 1e-3
    """Adam learning rate of the UNet."""
    caption_dropout: float = 0.1
    """Fraction of empty prompts in the UNet fit, so that classifier-free guidance works."""
    data_seed: int = 1000
    """Seed of the generated samples."""
    seed: int = 0
    """Seed of the tiny model's initial weights and of the fit's draws."""


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/cnet/demo-base`, or `~/.cache/cnet/demo-base`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cnet" / "demo-base"


def fit_key(family: FamilyName, fit: BaseFitConfig) -> str:
    """A hash of everything that determines the fitted weights (the cache key)."""
    recipe = {
        "format": FORMAT_VERSION,
        "family": family,
        "fit": attrs.asdict(fit),
        "torch": torch.__version__,
        "diffusers": importlib.metadata.version("diffusers"),
        "cnet-models": importlib.metadata.version("cnet-models"),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def fitted_base_model(
    family: FamilyName, *, fit: BaseFitConfig = BaseFitConfig(), root: Path | None = None
) -> Path:
    """The folder of the fitted tiny base model of `family`: from the cache, or fitted now.

    A folder in the cache is complete or absent (it is renamed into place when written), so a
    run killed mid-fit fits again next time rather than loading half a model.
    """
    path = (root if root is not None else cache_root()) / f"{family}-{fit_key(family, fit)}"
    if not (path / "model_index.json").is_file():
        print(f"fitting the demo's tiny {family} base model to the fill data (cached in {path})")
        replace_dir_atomically(path, lambda folder: _fit_into(family, fit, folder))
    return path


def _fit_into(family: FamilyName, fit: BaseFitConfig, folder: Path) -> None:
    write_tiny_model(family, folder, seed=fit.seed)
    base = load_base_model(BaseModelConfig(source=str(folder), frozen_dtype="float32"))
    batches = _image_batches(fit)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fit.seed)
        fit_vae(base.vae, batches, fit)
        fit_unet(base, batches, fit)
    base.vae.save_pretrained(folder / "vae")
    base.unet.save_pretrained(folder / "unet")


def _image_batches(fit: BaseFitConfig) -> list[tuple[torch.Tensor, list[str]]]:
    """The fit's samples as batches of one size each: (images in [-1, 1], captions)."""
    by_size: dict[tuple[int, int], list[tuple[torch.Tensor, str]]] = {}
    for sample in fill_samples(fit.samples, sizes=fit.sizes, seed=fit.data_seed):
        pixels = torch.from_numpy(np.asarray(sample.image, dtype=np.float32))
        image = pixels.permute(2, 0, 1) / 127.5 - 1.0
        by_size.setdefault(sample.image.size, []).append((image, sample.caption))
    batches = []
    for items in by_size.values():
        for start in range(0, len(items) - fit.batch_size + 1, fit.batch_size):
            chunk = items[start : start + fit.batch_size]
            batches.append((torch.stack([i for i, _ in chunk]), [c for _, c in chunk]))
    return batches


def _cycle(batches: Sequence[tuple[torch.Tensor, list[str]]], steps: int) -> Iterator[int]:
    """`steps` batch indices: a fresh random order of all batches per pass."""
    done = 0
    while done < steps:
        for i in torch.randperm(len(batches)).tolist()[: steps - done]:
            done += 1
            yield i


def fit_vae(
    vae: AutoencoderKL, batches: Sequence[tuple[torch.Tensor, list[str]]], fit: BaseFitConfig
) -> None:
    """Fit the VAE as a plain autoencoder (through its posterior's mean), make its posterior
    deterministic, and set its scaling factor to 1 / the latents' standard deviation, as
    Stable Diffusion's was chosen, so that the UNet sees unit-scale latents.

    Why not the usual KL-regularised fit: under Adam the KL term's pull on the log-variance
    is a full-size step whatever its weight, so the posterior's noise grows to drown the
    8x8 latents of a tiny model within a few hundred steps. A random VAE's posterior is as
    wide as its mean (unit variance), so the latents of a random base are mostly noise too.
    Stable Diffusion's own VAE is nearly deterministic; so is this one after the fit."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=fit.vae_lr)
    for i in _cycle(batches, fit.vae_steps):
        images = batches[i][0]
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
        loss = F.mse_loss(recon, images)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
    vae.eval().requires_grad_(False)
    _make_posterior_deterministic(vae)
    with torch.no_grad():
        latents = torch.cat([vae.encode(b).latent_dist.mode().flatten() for b, _ in batches])
    # diffusers leaves register_to_config unannotated.
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))  # type: ignore[no-untyped-call]


def _make_posterior_deterministic(vae: AutoencoderKL) -> None:
    """Set the posterior's log-variance to -30 (a standard deviation of 3e-7) everywhere, so
    that a training run's `latent_dist.sample()` is the mean the decoder was fitted on."""
    conv = vae.quant_conv
    if conv is None or conv.bias is None:
        raise ValueError("the demo's VAE has no quant_conv to set its posterior's variance in")
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:].zero_()
        conv.bias[half:].fill_(-30.0)


def fit_unet(
    base: BaseModel, batches: Sequence[tuple[torch.Tensor, list[str]]], fit: BaseFitConfig
) -> None:
    """Fit the UNet with the family's diffusion loss on the fitted VAE's latents, conditioned
    on the captions (some dropped), as a text-to-image base model is trained."""
    unet: UNet2DConditionModel = base.unet
    schedule = NoiseSchedule(base.scheduler)
    encoder = base.prompt_encoder()
    scale = base.vae_scaling_factor
    unet.train().requires_grad_(True)
    optimizer = torch.optim.Adam(unet.parameters(), lr=fit.unet_lr)
    for i in _cycle(batches, fit.unet_steps):
        images, captions = batches[i]
        kept = ["" if torch.rand(()) < fit.caption_dropout else c for c in captions]
        with torch.no_grad():
            latents = base.vae.encode(images).latent_dist.mode() * scale
            text = encoder.encode(kept)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, schedule.num_train_timesteps, (len(captions),))
        size = torch.tensor([images.shape[2], images.shape[3]]).repeat(len(captions), 1)
        conditioning = base.family.added_conditioning(text, size, torch.zeros_like(size), size)
        added = None if conditioning is None else conditioning.as_kwargs(unet.dtype)
        prediction = unet_forward(
            unet,
            schedule.add_noise(latents, noise, timesteps),
            timesteps,
            encoder_hidden_states=text.prompt_embeds,
            added_cond_kwargs=added,
            residuals=None,
        )
        loss = F.mse_loss(prediction, schedule.target(latents, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
    unet.eval().requires_grad_(False)
