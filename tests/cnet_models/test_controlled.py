"""The ControlNet built from a UNet, and ControlledUNet against diffusers called by hand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import torch

from cnet_models.conditioning import PromptEmbeddings
from cnet_models.configs import BaseModelConfig, ControlNetConfig
from cnet_models.controlled import AddedConditioning, ControlledUNet, make_controlnet, sdxl_time_ids
from cnet_models.facade import ControlNetModel
from cnet_models.families import FAMILY_NAMES
from cnet_models.loading import BaseModel, load_base_model

TinyModels = Callable[[str], Path]


@attrs.frozen
class Inputs:
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor
    control_image: torch.Tensor
    added: AddedConditioning | None

    def added_kwargs(self) -> dict[str, torch.Tensor] | None:
        return None if self.added is None else self.added.as_kwargs(torch.float32)

    def run(self, controlled: ControlledUNet, scale: float = 1.0) -> torch.Tensor:
        out: torch.Tensor = controlled(
            self.noisy_latents,
            self.timesteps,
            self.encoder_hidden_states,
            self.control_image,
            conditioning_scale=scale,
            added=self.added,
        )
        return out


def _inputs(model: BaseModel, batch: int = 2) -> Inputs:
    g = torch.Generator().manual_seed(0)
    width = model.text_encoders[-1].config.projection_dim
    assert width is not None
    text = PromptEmbeddings(
        torch.randn(batch, 77, model.cross_attention_dim, generator=g),
        torch.randn(batch, width, generator=g),
    )
    sizes = torch.tensor([[64, 64], [80, 48]][:batch])
    # The family's own added conditioning: SDXL's, None for SD 1.x / 2.x.
    added = model.family.added_conditioning(
        text, sizes, torch.tensor([[0, 0], [8, 0]][:batch]), sizes
    )
    assert (added is None) == (model.unet.config.get("addition_embed_type") is None)
    return Inputs(
        noisy_latents=torch.randn(batch, 4, 8, 8, generator=g),
        timesteps=torch.tensor([3, 700][:batch]),
        encoder_hidden_states=text.prompt_embeds,
        control_image=torch.rand(batch, 3, 64, 64, generator=g),
        added=added,
    )


def _randomise_zero_convolutions(controlnet: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_new_controlnet_copies_the_encoder_and_starts_at_zero(
    tiny_models: TinyModels, family: str
) -> None:
    model = load_base_model(BaseModelConfig(source=str(tiny_models(family))))
    controlnet = make_controlnet(model.unet, ControlNetConfig())
    unet_state = model.unet.state_dict()
    shared = [k for k in controlnet.state_dict() if k in unet_state]
    assert any(k.startswith("down_blocks.") for k in shared)
    assert any(k.startswith("mid_block.") for k in shared)
    for key in shared:
        assert torch.equal(controlnet.state_dict()[key], unet_state[key]), key
    zero_prefixes = (
        "controlnet_down_blocks",
        "controlnet_mid_block",
        "controlnet_cond_embedding.conv_out",
    )
    zero = [p for n, p in controlnet.named_parameters() if n.startswith(zero_prefixes)]
    assert zero and all(not p.any() for p in zero)
    assert all(p.requires_grad for p in controlnet.parameters())
    controlled = ControlledUNet(model.unet, controlnet)
    inputs = _inputs(model)
    with torch.no_grad():
        with_control = inputs.run(controlled)
        plain = model.unet(
            inputs.noisy_latents,
            inputs.timesteps,
            encoder_hidden_states=inputs.encoder_hidden_states,
            added_cond_kwargs=inputs.added_kwargs(),
        ).sample
    torch.testing.assert_close(with_control, plain, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_controlled_unet_equals_diffusers_by_hand(tiny_models: TinyModels, family: str) -> None:
    model = load_base_model(BaseModelConfig(source=str(tiny_models(family))))
    controlnet = make_controlnet(model.unet, ControlNetConfig())
    _randomise_zero_convolutions(controlnet)
    inputs = _inputs(model)
    controlled = ControlledUNet(model.unet, controlnet)
    with torch.no_grad():
        ours = inputs.run(controlled, 0.7)
        down, mid = controlnet(
            inputs.noisy_latents,
            inputs.timesteps,
            encoder_hidden_states=inputs.encoder_hidden_states,
            controlnet_cond=inputs.control_image,
            conditioning_scale=0.7,
            added_cond_kwargs=inputs.added_kwargs(),
            return_dict=False,
        )
        theirs = model.unet(
            inputs.noisy_latents,
            inputs.timesteps,
            encoder_hidden_states=inputs.encoder_hidden_states,
            added_cond_kwargs=inputs.added_kwargs(),
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        uncontrolled = inputs.run(controlled, 0.0)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, uncontrolled)  # the residuals really reach the UNet


def test_gradients_reach_only_the_controlnet(tiny_models: TinyModels) -> None:
    model = load_base_model(BaseModelConfig(source=str(tiny_models("sdxl"))))
    controlnet = make_controlnet(
        model.unet, ControlNetConfig(gradient_checkpointing=True, unet_gradient_checkpointing=True)
    )
    _randomise_zero_convolutions(controlnet)
    controlled = ControlledUNet(model.unet, controlnet)
    torch.autograd.backward(_inputs(model).run(controlled).square().mean())
    grads = [p.grad for p in controlled.trainable_parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads if g is not None)
    assert all(p.grad is None for p in model.unet.parameters())
    assert controlnet.is_gradient_checkpointing and model.unet.is_gradient_checkpointing


def test_frozen_half_unet_with_float32_controlnet(tiny_models: TinyModels) -> None:
    model = load_base_model(
        BaseModelConfig(source=str(tiny_models("sd15")), frozen_dtype="bfloat16")
    )
    controlnet = make_controlnet(model.unet, ControlNetConfig())
    assert controlnet.dtype == torch.float32 and model.unet.dtype == torch.bfloat16
    out = _inputs(model).run(ControlledUNet(model.unet, controlnet))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_continue_from_a_saved_controlnet(tiny_models: TinyModels, tmp_path: Path) -> None:
    model = load_base_model(BaseModelConfig(source=str(tiny_models("sd15"))))
    first = make_controlnet(model.unet, ControlNetConfig(conditioning_channels=1))
    _randomise_zero_convolutions(first)
    first.save_pretrained(str(tmp_path / "cn"))
    again = make_controlnet(model.unet, ControlNetConfig(pretrained=str(tmp_path / "cn")))
    assert again.config["conditioning_channels"] == 1
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_sdxl_time_ids_follow_the_pipeline_order() -> None:
    ids = sdxl_time_ids(
        torch.tensor([[1024, 768]]), torch.tensor([[16, 0]]), torch.tensor([[832, 1216]])
    )
    assert ids.tolist() == [[1024.0, 768.0, 16.0, 0.0, 832.0, 1216.0]]


def _encoder_features(controlnet: ControlNetModel, images: torch.Tensor) -> torch.Tensor:
    """The control-image encoder's last hidden layer (the input of its zero output conv)."""
    embedding = controlnet.controlnet_cond_embedding
    hidden = torch.nn.functional.silu(embedding.conv_in(images))
    for block in embedding.blocks:
        hidden = torch.nn.functional.silu(block(hidden))
    return hidden


def _outlines(count: int) -> torch.Tensor:
    """Thin white squares on black at different places: sparse images, like edge maps."""
    images = torch.zeros(count, 3, 64, 64)
    for i in range(count):
        top, left = 4 + 9 * i, 30 - 7 * i
        images[i, :, top : top + 24, left : left + 2] = 1.0
        images[i, :, top : top + 2, left : left + 24] = 1.0
    return images


def test_he_init_lets_the_control_image_through_and_still_starts_at_zero(
    tiny_models: TinyModels,
) -> None:
    model = load_base_model(BaseModelConfig(source=str(tiny_models("sd15"))))
    images = _outlines(4)
    spread = {}
    for init in ("default", "he"):
        torch.manual_seed(0)
        controlnet = make_controlnet(model.unet, ControlNetConfig(conditioning_embedding_init=init))
        with torch.no_grad():
            spread[init] = float(_encoder_features(controlnet, images).std(dim=0).mean())
            residuals = ControlledUNet(model.unet, controlnet).controlnet(
                torch.randn(4, 4, 8, 8),
                torch.tensor([10, 300, 600, 900]),
                encoder_hidden_states=torch.randn(4, 77, model.cross_attention_dim),
                controlnet_cond=images,
                return_dict=False,
            )
        # The output conv and the zero convs are untouched: a new ControlNet adds nothing.
        assert not controlnet.controlnet_cond_embedding.conv_out.weight.any()
        assert all(not r.any() for r in [*residuals[0], residuals[1]])
    # Under the default init the control images barely differ at the encoder's output.
    assert spread["he"] > 30 * spread["default"]


def test_he_init_leaves_a_pretrained_controlnet_as_saved(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    model = load_base_model(BaseModelConfig(source=str(tiny_models("sd15"))))
    trained = make_controlnet(model.unet, ControlNetConfig())
    trained.save_pretrained(tmp_path / "cn")
    loaded = make_controlnet(
        model.unet,
        ControlNetConfig(pretrained=str(tmp_path / "cn"), conditioning_embedding_init="he"),
    )
    for (name, a), b in zip(
        trained.state_dict().items(), loaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
