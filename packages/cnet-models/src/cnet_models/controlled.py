"""The trainable ControlNet and `ControlledUNet`: the frozen UNet steered by it.

`ControlledUNet` returns the model prediction for (noisy latents, timesteps, text conditioning,
the family's added conditioning (`ModelFamily.added_conditioning`), control image in [0, 1],
conditioning scale): the ControlNet's residuals are added to the UNet's skip connections,
exactly as the diffusers ControlNet pipelines do at inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from typing_extensions import override

from cnet_models.conditioning import AddedConditioning
from cnet_models.configs import ControlNetConfig
from cnet_models.facade import (
    ControlNetModel,
    UNet2DConditionModel,
    controlnet_forward,
    controlnet_from_unet,
    load_controlnet,
    unet_forward,
)
from cnet_models.family_sdxl import sdxl_time_ids

__all__ = [
    "AddedConditioning",
    "ControlledUNet",
    "he_init_conditioning_embedding",
    "make_controlnet",
    "prepare_controlnet",
    "sdxl_time_ids",
]
"""`AddedConditioning` lives in `cnet_models.conditioning` and `sdxl_time_ids` in
`cnet_models.family_sdxl` (the SDXL spec builds it); both stay importable from here."""


def make_controlnet(unet: UNet2DConditionModel, config: ControlNetConfig) -> ControlNetModel:
    """A new ControlNet from the UNet (encoder copied, zero convolutions), or a loaded one."""
    if config.pretrained is not None:
        controlnet = load_controlnet(config.pretrained, None, use_safetensors=True)
    else:
        controlnet = controlnet_from_unet(
            unet,
            conditioning_channels=config.conditioning_channels,
            conditioning_embedding_out_channels=config.conditioning_embedding_out_channels,
        )
        if config.conditioning_embedding_init == "he":
            he_init_conditioning_embedding(controlnet)
    return prepare_controlnet(controlnet, unet, config)


def prepare_controlnet(
    controlnet: ControlNetModel, unet: UNet2DConditionModel, config: ControlNetConfig
) -> ControlNetModel:
    """Set `controlnet` (and the UNet's checkpointing) up for training as `config` says."""
    # Trained in float32 (under autocast), whatever dtype the frozen parts use. Typed as a
    # Module: diffusers' `to` override is wrapped in a way mypy cannot call.
    if controlnet.dtype != torch.float32:
        module: nn.Module = controlnet
        module.to(torch.float32)
    controlnet.train()
    controlnet.requires_grad_(True)
    if config.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    if config.unet_gradient_checkpointing is True:  # `auto` is resolved by the launcher
        unet.enable_gradient_checkpointing()
    return controlnet


def he_init_conditioning_embedding(controlnet: ControlNetModel) -> None:
    """He-normal weights (fan-in, for the SiLU between the layers) and zero biases for the
    control-image encoder's convolutions, all but its zero-initialised output convolution.

    PyTorch's default init scales each layer's output down (a gain of about 1/sqrt(3)), and
    the constant biases pass through where the signal fades, so at the end of a random
    eight-layer stack the output hardly depends on the control image."""
    embedding: nn.Module = controlnet.controlnet_cond_embedding
    last = embedding.get_submodule("conv_out")
    with torch.no_grad():
        for layer in embedding.modules():
            if isinstance(layer, nn.Conv2d) and layer is not last:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)


class ControlledUNet(nn.Module):
    """The frozen UNet and the trainable ControlNet, as one module for the training step."""

    def __init__(self, unet: UNet2DConditionModel, controlnet: ControlNetModel) -> None:
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet

    @override
    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        control_image: torch.Tensor,
        conditioning_scale: float = 1.0,
        added: AddedConditioning | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction (in the UNet's dtype) with the ControlNet's residuals added."""
        c_dtype = self.controlnet.dtype
        residuals = controlnet_forward(
            self.controlnet,
            noisy_latents.to(c_dtype),
            timesteps,
            encoder_hidden_states=encoder_hidden_states.to(c_dtype),
            controlnet_cond=control_image.to(c_dtype),
            conditioning_scale=conditioning_scale,
            added_cond_kwargs=None if added is None else added.as_kwargs(c_dtype),
        )
        u_dtype = self.unet.dtype
        down, mid = residuals
        return unet_forward(
            self.unet,
            noisy_latents.to(u_dtype),
            timesteps,
            encoder_hidden_states=encoder_hidden_states.to(u_dtype),
            added_cond_kwargs=None if added is None else added.as_kwargs(u_dtype),
            residuals=(_cast(down, u_dtype), mid.to(u_dtype)),
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.controlnet.parameters() if p.requires_grad]


def _cast(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(dtype) for t in tensors)
