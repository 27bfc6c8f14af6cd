"""Tiny offline model folders: their shape, tokenizers and pipelines, and how they are written."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cnet_models import tiny
from cnet_models.facade import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    checked,
    controlnet_forward,
    controlnet_from_unet,
    load_component,
    unet_forward,
)
from cnet_models.families import FAMILY_NAMES, detect_family
from cnet_models.tiny import write_tiny_model
from cnet_models.vocab import TINY_WORDS

TinyModels = Callable[[str], Path]
PAD_TOKENS = {
    ("sd15", "tokenizer"): "<|endoftext|>",
    ("sd21", "tokenizer"): "!",
    ("sdxl", "tokenizer"): "<|endoftext|>",
    ("sdxl", "tokenizer_2"): "!",
}


def _config(folder: Path, part: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((folder / part / "config.json").read_text())
    return config


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unet_is_detected_as_its_family(tiny_models: TinyModels, family: str) -> None:
    assert detect_family(_config(tiny_models(family), "unet")).name == family


def _generate(folder: Path, family: str) -> np.ndarray:
    """Two steps of the family's text-to-image pipeline at its default size."""
    generator = torch.Generator().manual_seed(0)
    # No height or width: the default size comes from the UNet's sample_size and the VAE.
    run = {"num_inference_steps": 2, "output_type": "np", "generator": generator}
    if family == "sdxl":
        xl = checked(
            StableDiffusionXLPipeline.from_pretrained(folder), StableDiffusionXLPipeline, "pipe"
        )
        assert xl.vae_scale_factor == 8
        return np.asarray(xl("a photo of a red cat", **run).images)
    sd = checked(StableDiffusionPipeline.from_pretrained(folder), StableDiffusionPipeline, "pipe")
    assert sd.vae_scale_factor == 8
    return np.asarray(sd("a photo of a red cat", **run).images)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pipeline_loads_and_generates(tiny_models: TinyModels, family: str) -> None:
    image = _generate(tiny_models(family), family)
    assert image.shape == (1, tiny.TINY_RESOLUTION, tiny.TINY_RESOLUTION, 3)
    assert np.isfinite(image).all()


@pytest.mark.parametrize(
    ("family", "prediction", "scaling", "upcast"),
    [
        ("sd15", "epsilon", 0.18215, False),
        ("sd21", "v_prediction", 0.18215, True),
        ("sdxl", "epsilon", 0.13025, False),
    ],
)
def test_family_settings_are_in_the_folder(
    tiny_models: TinyModels, family: str, prediction: str, scaling: float, upcast: bool
) -> None:
    folder = tiny_models(family)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == prediction
    assert scheduler["beta_schedule"] == "scaled_linear"
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.00085, 0.012)
    assert scheduler["num_train_timesteps"] == 1000
    assert _config(folder, "vae")["scaling_factor"] == scaling
    assert len(_config(folder, "vae")["block_out_channels"]) == 4  # scale factor 8
    assert bool(_config(folder, "unet")["upcast_attention"]) is upcast
    if family == "sdxl":
        assert _config(folder, "vae")["force_upcast"] is True


def test_sdxl_unet_is_sized_to_its_text_encoders(tiny_models: TinyModels) -> None:
    folder = tiny_models("sdxl")
    unet = _config(folder, "unet")
    first, second = _config(folder, "text_encoder"), _config(folder, "text_encoder_2")
    assert unet["cross_attention_dim"] == first["hidden_size"] + second["hidden_size"]
    expected = 6 * unet["addition_time_embed_dim"] + second["projection_dim"]
    assert unet["projection_class_embeddings_input_dim"] == expected


@pytest.mark.parametrize(("family", "tokenizer"), list(PAD_TOKENS))
def test_tokenizer_ids_match_the_text_encoder(
    tiny_models: TinyModels, family: str, tokenizer: str
) -> None:
    folder = tiny_models(family)
    encoder = tokenizer.replace("tokenizer", "text_encoder")
    tok = load_component(CLIPTokenizer, folder, tokenizer)
    config = _config(folder, encoder)
    assert tok.bos_token_id == config["bos_token_id"] == config["vocab_size"] - 2
    assert tok.eos_token_id == config["eos_token_id"] == config["vocab_size"] - 1
    assert tok.pad_token == PAD_TOKENS[(family, tokenizer)]
    assert tok.pad_token_id == config["pad_token_id"]
    assert len(tok) == config["vocab_size"]
    assert tok.model_max_length == 77


def test_tiny_words_are_single_tokens(tiny_models: TinyModels) -> None:
    tok = load_component(CLIPTokenizer, tiny_models("sd15"), "tokenizer")
    for word in TINY_WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
    # Unknown words still encode, byte by byte, and decode back.
    text = tok.decode(tok("Zebra, 42!").input_ids, skip_special_tokens=True)
    assert isinstance(text, str)
    assert text.replace(" ", "") == "zebra,42!"


def test_sdxl_pooled_embedding_is_read_at_the_end_token(tiny_models: TinyModels) -> None:
    folder = tiny_models("sdxl")
    tok = load_component(CLIPTokenizer, folder, "tokenizer_2")
    encoder = load_component(CLIPTextModelWithProjection, folder, "text_encoder_2")
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt")
    input_ids = ids.input_ids
    eos = int((input_ids[0] == tok.eos_token_id).nonzero()[0])
    assert eos == 6  # <start> a photo of a cat <end>: every word one token
    with torch.no_grad():
        out = encoder(input_ids)
        at_eos = encoder.text_projection(out.last_hidden_state[0, eos])
        at_last = encoder.text_projection(out.last_hidden_state[0, -1])
    torch.testing.assert_close(out.text_embeds[0], at_eos)
    assert not torch.allclose(out.text_embeds[0], at_last, atol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_controlnet_from_tiny_unet_runs(tiny_models: TinyModels, family: str) -> None:
    unet = load_component(UNet2DConditionModel, tiny_models(family), "unet")
    controlnet = controlnet_from_unet(unet)
    batch, width = 2, unet.config.cross_attention_dim
    latents = torch.randn(batch, 4, 8, 8)
    timesteps = torch.tensor([10, 500])
    text = torch.randn(batch, 77, width)
    control = torch.rand(batch, 3, 64, 64)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL's added conditioning
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * 8
        added = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.rand(batch, 6) * 64}
    with torch.no_grad():
        down, mid = controlnet_forward(
            controlnet,
            latents,
            timesteps,
            encoder_hidden_states=text,
            controlnet_cond=control,
            conditioning_scale=1.0,
            added_cond_kwargs=added,
        )
        plain, controlled = (
            unet_forward(
                unet,
                latents,
                timesteps,
                encoder_hidden_states=text,
                added_cond_kwargs=added,
                residuals=residuals,
            )
            for residuals in (None, (down, mid))
        )
    assert len(down) == len(controlnet.controlnet_down_blocks)
    assert mid.shape == (batch, 64, 4, 4)
    # Zero convolutions: a new ControlNet adds nothing until it is trained.
    assert all(not r.any() for r in (*down, mid))
    torch.testing.assert_close(controlled, plain)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    first = _files(write_tiny_model("sdxl", tmp_path / "a", seed=3))
    second = _files(write_tiny_model("sdxl", tmp_path / "b", seed=3))
    other = _files(write_tiny_model("sdxl", tmp_path / "c", seed=4))
    assert first == second
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert other[weights] != first[weights]
    assert other["tokenizer/vocab.json"] == first["tokenizer/vocab.json"]


def test_writing_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    write_tiny_model("sd15", tmp_path / "m")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_failed_write_keeps_the_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write_tiny_model("sd15", tmp_path / "model")
    (target / "marker").write_text("old")
    before = _files(target)

    def fail(*args: object) -> None:
        raise RuntimeError("disk full")

    # The last step before the rename: everything else has been written by then.
    monkeypatch.setattr(tiny, "_write_model_index", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_tiny_model("sdxl", target)
    assert _files(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left


def test_successful_write_replaces_the_folder(tmp_path: Path) -> None:
    target = write_tiny_model("sd15", tmp_path / "model")
    (target / "marker").write_text("old")
    write_tiny_model("sdxl", target)
    assert not (target / "marker").exists()
    assert (target / "text_encoder_2" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_refuses_to_replace_a_file(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.write_text("not a model")
    with pytest.raises(FileExistsError, match="not a folder"):
        write_tiny_model("sd15", target)
    assert target.read_text() == "not a model"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_unknown_family_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sd15, sd21, sdxl"):
        write_tiny_model("sd3", tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cnet_models.tiny", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_command_writes_a_model(tmp_path: Path) -> None:
    result = _run_cli("sd15", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "sd15" in result.stdout
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_command_rejects_an_unknown_family(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In process: the same argparse path as `python -m`, without a second start of diffusers.
    with pytest.raises(SystemExit) as exited:
        tiny.main(["sd3", str(tmp_path / "out")])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'sd3'" in error
    assert "sdxl" in error
    assert not (tmp_path / "out").exists()
