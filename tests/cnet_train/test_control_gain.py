"""Control gain: 1 for a ControlNet that cannot see its condition, off 1 for one that does,
deterministic, logged during training, and the same from an export as from its checkpoint."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from typing_extensions import override

from cnet_data.batch import Batch
from cnet_models.controlled import AddedConditioning, ControlledUNet
from cnet_train.callbacks.control_gain import ControlGainCallback
from cnet_train.callbacks.history import CONTROL_GAIN_CSV, StepTable
from cnet_train.cli import main
from cnet_train.config import CheckpointConfig, ExportConfig, TrainConfig, ValidationConfig
from cnet_train.control_gain import (
    ControlGain,
    ControlGainConfig,
    held_out_batches,
    measure_control_gain,
)
from cnet_train.demo import demo_config
from cnet_train.module import ControlNetModule

SMALL = ControlGainConfig(samples=4, repeats=1, batch_size=2)
"""4 samples in the demo's 3 buckets: each bucket gets a partner, 6 samples in 3 batches."""
ZERO_INITIALISED = ("controlnet_down_blocks", "controlnet_mid_block", "cond_embedding.conv_out")
"""The ControlNet's zero convolutions: until they move, the condition cannot reach the UNet."""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    base = demo_config(tmp_path_factory.mktemp("gain"), "sd15", steps=2, samples=12)
    return attrs.evolve(base, control_gain=SMALL)


@pytest.fixture(scope="module")
def batches(config: TrainConfig) -> list[Batch]:
    return held_out_batches(config)


def _module_with_condition_path(config: TrainConfig) -> ControlNetModule:
    """A ControlNet whose condition reaches the UNet: its zero convolutions made random."""
    module = ControlNetModule(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.controlnet.named_parameters():
            if any(part in name for part in ZERO_INITIALISED):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def _measure(module: ControlNetModule, batches: list[Batch]) -> ControlGain:
    return measure_control_gain(module, batches, repeats=2)


def test_held_out_batches_are_fixed_and_pair_samples_of_one_size(
    config: TrainConfig, batches: list[Batch]
) -> None:
    again = held_out_batches(config)
    assert [b["index"].tolist() for b in batches] == [b["index"].tolist() for b in again]
    for batch in batches:
        assert len(batch["index"]) >= 2
        assert len(set(batch["bucket"].tolist())) == 1
    assert sum(len(b["index"]) for b in batches) >= SMALL.samples


def test_zeroed_condition_path_has_gain_one(config: TrainConfig, batches: list[Batch]) -> None:
    module = _module_with_condition_path(config)
    live = _measure(module, batches)
    assert live.true_loss != live.shuffled_loss  # the condition reaches the prediction
    embedding = module.controlnet.controlnet_cond_embedding.conv_out
    with torch.no_grad():
        embedding.weight.zero_()
        embedding.bias.zero_()
    zeroed = _measure(module, batches)
    assert zeroed.gain == pytest.approx(1.0, abs=1e-6)
    assert zeroed.shuffled_loss == pytest.approx(zeroed.true_loss, rel=1e-6)
    for r in zeroed.by_timestep:
        assert r.gain == pytest.approx(1.0, abs=1e-6)


def test_measurement_is_deterministic_and_restores_training_mode(
    config: TrainConfig, batches: list[Batch]
) -> None:
    module = _module_with_condition_path(config)
    module.controlnet.train()
    first = _measure(module, batches)
    assert module.controlnet.training
    assert _measure(module, batches) == first
    assert measure_control_gain(module, batches, repeats=2, seed=1) != first
    # Stratified timesteps: every range of the schedule is measured.
    ranges = [(r.low, r.high) for r in first.by_timestep]
    assert ranges == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert sum(r.draws for r in first.by_timestep) == 2 * sum(len(b["index"]) for b in batches)


def test_batches_of_one_are_refused(config: TrainConfig, batches: list[Batch]) -> None:
    module = ControlNetModule(config)
    single = cast("Batch", {k: v[:1] for k, v in dict[str, Any](batches[0]).items()})
    with pytest.raises(ValueError, match="at least 2 samples"):
        measure_control_gain(module, [single])


class _OracleControlled(ControlledUNet):
    """Denoises exactly when the control image is the sample's own image: noise recovered from
    the noisy latents and the clean latents computed from the control image."""

    def __init__(self, module: _OracleModule) -> None:
        super().__init__(module.unet, module.controlnet)
        self.alphas = module.schedule.alphas_cumprod

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
        clean = _latents(control_image * 2 - 1)
        a = self.alphas.to(noisy_latents.device)[timesteps].view(-1, 1, 1, 1)
        return (noisy_latents - a.sqrt() * clean) / (1 - a).sqrt()


class _OracleModule(ControlNetModule):
    """A model that needs its condition: latents are a fixed function of the image, and the
    prediction is right only with the sample's own conditioning image."""

    @property
    @override
    def controlled(self) -> ControlledUNet:
        return _OracleControlled(self)

    @override
    def encode_images(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return _latents(images)


def _latents(images: torch.Tensor) -> torch.Tensor:
    pooled = F.avg_pool2d(images.float(), 8)
    return torch.cat([pooled, pooled[:, :1]], dim=1)


def test_a_model_that_uses_its_condition_has_gain_above_one(
    config: TrainConfig, batches: list[Batch]
) -> None:
    module = _OracleModule(config)
    own: list[Batch] = [{**b, "conditioning_image": (b["image"] + 1) / 2} for b in batches]
    gain = measure_control_gain(module, own, repeats=2)
    assert gain.true_loss < 1e-3 < gain.shuffled_loss
    assert gain.gain > 10
    assert all(r.gain > 1 for r in gain.by_timestep)


def test_step_table_keeps_rows_up_to_the_resume_step(tmp_path: Path) -> None:
    table = StepTable(tmp_path / CONTROL_GAIN_CSV, 3)
    table.append([(2, (1.1, 0.5, 0.55)), (4, (1.2, 0.4, 0.48))])
    with table.path.open("a") as fh:
        fh.write("6,1.3,0.3")  # torn by a kill
    assert [s for s, _ in table.rows()] == [2, 4]
    table.truncate_after(3)
    assert table.rows() == [(2, (1.1, 0.5, 0.55))]
    assert table.path.read_text().endswith("\n")


# -- a tiny run: the callback, then `cnet-train evaluate` on its export and checkpoint ---------


@pytest.fixture(scope="module")
def run(config: TrainConfig) -> tuple[TrainConfig, ControlGainCallback, str]:
    """Two steps, validation (hence the control gain) at the last, checkpoint and export."""
    from cnet_train.trainer import fit

    run_config = attrs.evolve(
        config,
        validation=ValidationConfig(every_n_steps=2),
        export=ExportConfig(every_n_steps=0),
        checkpoint=CheckpointConfig(every_n_steps=1, keep_last=2, resume="none"),
    )
    logger = CSVLogger(str(run_config.run_dir), name="csv", version="")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer, _ = fit(run_config, enable_progress_bar=False, logger=logger)
    callback = next(c for c in trainer.callbacks if isinstance(c, ControlGainCallback))  # type: ignore[attr-defined]
    return run_config, callback, printed.getvalue()


def test_callback_logs_prints_and_draws_the_gain(
    run: tuple[TrainConfig, ControlGainCallback, str],
) -> None:
    config, callback, printed = run
    assert [step for step, _ in callback.points] == [2]
    gain = callback.points[0][1]
    assert f"step 2: control gain {gain.gain:.3f}" in printed
    with (config.run_dir / "csv" / "metrics.csv").open() as fh:
        logged = [row for row in csv.DictReader(fh) if row.get("val/control_gain")]
    assert len(logged) == 1 and logged[0]["step"] == "2"
    assert float(logged[0]["val/control_gain"]) == pytest.approx(gain.gain)
    assert float(logged[0]["val/loss_true_condition"]) == pytest.approx(gain.true_loss)
    assert float(logged[0]["val/loss_shuffled_condition"]) == pytest.approx(gain.shuffled_loss)
    rows = StepTable(config.run_dir / CONTROL_GAIN_CSV, 3).rows()
    assert [s for s, _ in rows] == [2]
    assert rows[0][1][0] == pytest.approx(gain.gain, rel=1e-5)
    with Image.open(config.run_dir / "loss.png") as png:
        assert png.height == 2 * 360  # training loss above, control gain below


def _evaluate(
    config: TrainConfig, weights: Path, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["evaluate", str(config.run_dir / "config.yaml"), str(weights), "--json"]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out["results"]  # type: ignore[no-any-return]


def test_evaluate_reports_the_same_figures_for_an_export_and_its_checkpoint(
    run: tuple[TrainConfig, ControlGainCallback, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, callback, _ = run
    export = config.run_dir / "exports" / "step-00000002"
    checkpoint = sorted((config.run_dir / "checkpoints").glob("*.ckpt"))[-1]
    assert "2" in checkpoint.stem
    from_export = _evaluate(config, export, capsys)
    from_checkpoint = _evaluate(config, checkpoint, capsys)
    assert set(from_export) == {"controlnet", "controlnet_ema"}
    for name in from_export:
        a, b = from_export[name], from_checkpoint[name]
        assert a["gain"] == pytest.approx(b["gain"], rel=1e-9)
        assert a["true_loss"] == pytest.approx(b["true_loss"], rel=1e-9)
        assert [r["gain"] for r in a["by_timestep"]] == pytest.approx(
            [r["gain"] for r in b["by_timestep"]], rel=1e-9
        )
    # The measurement during training used the same weights, held-out set and draws.
    assert from_export["controlnet"]["gain"] == pytest.approx(callback.points[0][1].gain)
    # One ControlNet folder, and the table for people.
    capsys.readouterr()
    assert main(["evaluate", str(config.run_dir / "config.yaml"), str(export / "controlnet")]) == 0
    table = capsys.readouterr().out
    assert f"control gain {from_export['controlnet']['gain']:.4f}" in table
    assert "750-999" in table


def test_evaluate_names_weights_it_cannot_read(
    run: tuple[TrainConfig, ControlGainCallback, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, _, _ = run
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    code = main(["evaluate", str(config.run_dir / "config.yaml"), str(empty)])
    err = capsys.readouterr().err
    assert code == 1
    assert "cnet-train evaluate: error: weights" in err and str(empty) in err
    assert "hint:" in err


def test_a_cache_without_the_held_out_captions_is_refused_before_the_first_step(
    tmp_path: Path,
) -> None:
    from cnet_train.config import CacheConfig
    from cnet_train.embed import embed_captions
    from cnet_train.errors import CacheIncompleteError
    from cnet_train.trainer import fit

    config = demo_config(tmp_path / "run", "sd15", steps=1, samples=12)
    assert config.control_gain.index is not None  # the demo's own held-out set
    config = attrs.evolve(config, cache=CacheConfig(path=tmp_path / "cache"))
    without = attrs.evolve(config, control_gain=attrs.evolve(config.control_gain, index=None))
    embed_captions(without)  # the training captions only
    with pytest.raises(CacheIncompleteError, match=r"lacks \d+ caption\(s\) of control_gain"):
        fit(config, enable_progress_bar=False)
    assert not any(config.run_dir.glob("checkpoints/*"))
    # A run that never measures the gain (no validation) does not need them.
    unmeasured = attrs.evolve(config, validation=ValidationConfig(), run_dir=tmp_path / "quiet")
    assert fit(unmeasured, enable_progress_bar=False)[0].global_step == 1
    embed_captions(config)  # adds the held-out captions; the run then measures from the cache
    _, module = fit(config, enable_progress_bar=False)
    assert module.cache is not None and (config.run_dir / CONTROL_GAIN_CSV).is_file()
