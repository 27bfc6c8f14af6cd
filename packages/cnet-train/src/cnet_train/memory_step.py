"""One training step of the run's networks on the meta device, with its bytes counted.

The step is the module's (`ControlNetModule.loss`): the frozen encoders without gradients, then
the ControlNet and the frozen UNet (under autocast for a mixed precision), the loss, the
backward. Inputs have the shapes of one per-device batch at the given bucket.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import attrs
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from cnet_models.arch_source import MetaNetworks
from cnet_models.controlled import ControlledUNet
from cnet_models.families import family_by_name
from cnet_models.text import PromptEmbeddings
from cnet_train.memory_trace import AsOnGPU, LiveBytes

HALF_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@attrs.frozen
class StepMemory:
    """Bytes one step holds beyond the weights, gradients and optimizer state."""

    encode_peak: int
    """The most the frozen encoders (the VAE; the text encoders when captions are encoded in
    the step) hold at once, before the trainable forward."""
    saved: int
    """What the trainable forward leaves alive for the backward (the saved activations)."""
    backward_extra: int
    """The most the backward holds on top of `saved`, not counting the gradients it writes."""


@attrs.frozen
class StepShape:
    """The batch one step sees on one device."""

    batch: int
    height: int
    width: int
    """Pixels of the bucket."""
    encode_text: bool
    """Whether the text encoders run in the step (no embedding cache)."""
    encode_images: bool = True
    """Whether the VAE encodes in the step (no latent cache)."""


def trace_step(
    nets: MetaNetworks, family: str, shape: StepShape, precision: str, scale: float = 1.0
) -> StepMemory:
    """Run one step of `nets` on meta inputs of `shape` and count what it holds."""
    with torch.no_grad():
        encode_peak = _encode_peak(nets, shape)
    live = LiveBytes()
    inputs = _step_inputs(nets, family, shape)
    half = HALF_DTYPES.get(precision)
    _recompute_as_on_gpu(nets, half)
    with live:
        with AsOnGPU(half):
            prediction = ControlledUNet(nets.unet, nets.controlnet)(
                *inputs[:4], conditioning_scale=scale, added=inputs[4]
            )
        loss = F.mse_loss(prediction.float(), torch.empty_like(prediction, dtype=torch.float32))
        del prediction
        saved = live.now
        live.reset_peak()
        with AsOnGPU(half):  # a checkpointed block's recompute casts as its forward did
            torch.autograd.backward(loss)
    grads = sum(_nbytes(p.grad) for p in nets.controlnet.parameters())
    for p in nets.controlnet.parameters():
        p.grad = None
    return StepMemory(encode_peak, saved, max(0, live.peak - saved - grads))


def _recompute_as_on_gpu(nets: MetaNetworks, half: torch.dtype | None) -> None:
    """A checkpointed block's recompute in the backward casts as its forward did (autocast's
    state is restored for it by checkpointing; `AsOnGPU`'s is restored here)."""

    def checkpoint(module: torch.nn.Module, *args: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(
            module.__call__,
            *args,
            use_reentrant=False,
            context_fn=lambda: (nullcontext(), AsOnGPU(half)),
        )

    for model in (nets.unet, nets.controlnet):
        if model.is_gradient_checkpointing:
            model.enable_gradient_checkpointing(checkpoint)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.untyped_storage().nbytes()


def _encode_peak(nets: MetaNetworks, shape: StepShape) -> int:
    live = LiveBytes()
    images = _meta(shape.batch, 3, shape.height, shape.width, dtype=nets.vae.dtype)
    with live:
        if shape.encode_images:
            with AsOnGPU(None):
                encoded: Any = nets.vae.encode(images, return_dict=False)[0]
            del encoded
        if shape.encode_text:
            for encoder in nets.text_encoders:
                length = encoder.config.max_position_embeddings
                ids = torch.zeros(shape.batch, length, dtype=torch.long, device="meta")
                out = encoder(ids, output_hidden_states=True)
                del out
    return live.peak


def _meta(*size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(size, dtype=dtype, device="meta")


def _step_inputs(nets: MetaNetworks, family: str, shape: StepShape) -> tuple[Any, ...]:
    """(noisy latents, timesteps, prompt embeddings, control image, added conditioning)."""
    b, unet = shape.batch, nets.unet.config
    factor = 2 ** (len(nets.vae.config["block_out_channels"]) - 1)
    latents = _meta(b, unet["in_channels"], shape.height // factor, shape.width // factor)
    timesteps = torch.zeros(b, dtype=torch.long, device="meta")
    length = nets.text_encoders[0].config.max_position_embeddings
    embeds = _meta(b, length, unet["cross_attention_dim"])
    spec = family_by_name(family)
    last = len(spec.text_encoders) - 1
    encoder = nets.text_encoders[last]
    # A pooled embedding comes from an encoder with a projection head (SDXL's second).
    width: int | None = encoder.config.projection_dim
    pooled = _meta(b, width) if width and hasattr(encoder, "text_projection") else None
    channels = nets.controlnet.config["conditioning_channels"]
    control = _meta(b, channels, shape.height, shape.width)
    sizes = torch.tensor([[shape.height, shape.width]] * b, device="meta")
    added = spec.added_conditioning(
        PromptEmbeddings(embeds, pooled), sizes, torch.zeros_like(sizes), sizes
    )
    return latents, timesteps, embeds, control, added
