"""The demo learns control: its ControlNet's held-out control gain rises clearly above 1.

`cnet-train demo` is run as a user runs it (the console entry point, the fitted base model
from the user's cache, `$XDG_CACHE_HOME/cnet/demo-base`, fitted there if it is not yet: the
first run on a machine pays about three minutes for it, later runs none), and the gain it logs
at its last validation, measured on 16 samples it never trained on, must clear the threshold.
The threshold comes from the demo's gain over seeds (see MIN_GAIN); the zeroed-condition check
that keeps the metric honest is `test_control_gain.py::test_zeroed_condition_path_has_gain_one`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from cnet_models.configs import BaseModelConfig
from cnet_models.facade import load_controlnet
from cnet_models.families import FamilyName
from cnet_models.loading import load_base_model
from cnet_models.tiny import write_tiny_model
from cnet_train import demo_base
from cnet_train.callbacks.history import CONTROL_GAIN_CSV
from cnet_train.cli import main
from cnet_train.demo import DEMO_STEPS
from cnet_train.demo_base import BaseFitConfig, fit_key, fitted_base_model

MIN_GAIN = 1.15
"""The issue's aim: the shuffled-condition loss 15% above the true-condition loss. Measured at
step 600 over seeds 0-3 on one CPU: 1.233, 1.664, 1.547, 1.430; on another (an Intel Xeon),
seeds 0-2: 1.111, 1.251, 1.241. The demo runs seed 1 (`DEMO_SEED`)."""

QUICK = BaseFitConfig(samples=16, batch_size=4, vae_steps=2, unet_steps=2)


@pytest.mark.slow
def test_the_demo_learns_control(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    # Rows: step, gain, loss with the own condition, loss with another sample's condition.
    rows = list(csv.reader((tmp_path / "demo" / "run" / CONTROL_GAIN_CSV).open()))
    steps = [int(r[0]) for r in rows]
    assert steps[-1] == DEMO_STEPS
    gains = [float(r[1]) for r in rows]
    assert gains[-1] > MIN_GAIN, f"control gain by step: {dict(zip(steps, gains, strict=True))}"
    assert f"step {DEMO_STEPS}: control gain" in printed

    # The same trained ControlNet with its condition path cut measures 1: the gain above is
    # the outline's doing, not something the metric produces by itself.
    export = tmp_path / "demo" / "run" / "exports" / f"step-{DEMO_STEPS:08d}" / "controlnet"
    controlnet = load_controlnet(str(export), None, use_safetensors=True)
    with torch.no_grad():
        controlnet.controlnet_cond_embedding.conv_out.weight.zero_()
        controlnet.controlnet_cond_embedding.conv_out.bias.zero_()
    controlnet.save_pretrained(tmp_path / "cut")
    config = str(tmp_path / "demo" / "run" / "config.yaml")
    for weights, expected in ((export, gains[-1]), (tmp_path / "cut", 1.0)):
        assert main(["evaluate", config, str(weights), "--json"]) == 0
        (result,) = json.loads(capsys.readouterr().out)["results"].values()
        assert result["gain"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_fitted_base_is_cached_and_changes_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: FamilyName
) -> None:
    path = fitted_base_model(family, fit=QUICK, root=tmp_path)
    fitted = load_base_model(BaseModelConfig(source=str(path)))
    random = load_base_model(BaseModelConfig(source=str(write_tiny_model(family, tmp_path / "r"))))
    changed = [
        not torch.equal(a, b)
        for a, b in zip(fitted.unet.parameters(), random.unet.parameters(), strict=True)
    ]
    assert any(changed)
    assert fitted.vae_scaling_factor != random.vae_scaling_factor
    # The fitted VAE's posterior is deterministic: a sample is its mean.
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        posterior = fitted.vae.encode(images).latent_dist
        assert torch.allclose(posterior.sample(), posterior.mode(), atol=1e-5)
    # A second call finds the cache and fits nothing.
    monkeypatch.setattr(demo_base, "_fit_into", _must_not_fit)
    assert fitted_base_model(family, fit=QUICK, root=tmp_path) == path
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cache_key_follows_the_recipe() -> None:
    assert fit_key("sd15", QUICK) == fit_key("sd15", QUICK)
    assert fit_key("sd15", QUICK) != fit_key("sd21", QUICK)
    assert fit_key("sd15", QUICK) != fit_key("sd15", BaseFitConfig(samples=17, batch_size=4))


def test_cache_root_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo_base.cache_root() == tmp_path / "cnet" / "demo-base"


def _must_not_fit(*_: object) -> None:
    raise AssertionError("the cached base model was fitted again")
