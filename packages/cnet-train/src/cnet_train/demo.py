"""`cnet-train demo`: the whole product offline on a CPU in about two minutes.

A tiny base model of the chosen family and a generated fill dataset (a filled shape on a
background; condition: its outline; caption: the colours and the shape, never where it is) go
through indexing, training, validation and export, and the demo prints where everything landed.

The base is first fitted to the fill data (`demo_base`, cached), as a real run starts from a
pretrained Stable Diffusion, so that the ControlNet has something to steer and its control gain
shows it learning where the shape goes. The ControlNet's control-image encoder starts from He
init (`controlnet.conditioning_embedding_init: he`), under which it learns to use the outline
within the demo's few hundred steps; under PyTorch's default init it has not started to by
then (see the option's docstring). `--random-base` skips the fit: a fast plumbing check whose
ControlNet cannot learn control (a random base's latents are mostly noise).
"""

from __future__ import annotations

import json
from pathlib import Path

from cnet_data.atomic import atomic_write_text
from cnet_data.buckets import BucketConfig
from cnet_data.scan import scan
from cnet_data.sources import SourceConfig
from cnet_data.synthetic import write_fill_dataset
from cnet_models.configs import BaseModelConfig, ControlNetConfig
from cnet_models.ema import EMAConfig
from cnet_models.families import FamilyName
from cnet_models.tiny import write_tiny_model
from cnet_train.conditioning_config import ConditioningConfig
from cnet_train.config import (
    CheckpointConfig,
    DataConfig,
    EMASettings,
    ExportConfig,
    LossConfig,
    OptimizerConfig,
    TrainConfig,
    TrainerConfig,
    ValidationConfig,
)
from cnet_train.control_gain import ControlGainConfig

DEMO_SIZES = ((64, 64), (80, 48), (48, 80))
HELD_OUT_SAMPLES = 16
DEMO_STEPS = 600
"""Optimizer steps of `cnet-train demo`: where its held-out control gain is clearly above 1."""
DEMO_SEED = 1
"""The demo run's seed. The fitted base model and the run's numerics differ with the CPU's
kernels, and so does the gain a seed reaches: at step 600, seeds 0 / 1 / 2 gave 1.233 / 1.664
/ 1.547 on one CPU and 1.111 / 1.251 / 1.241 on another (an Intel Xeon). Seed 0 falls short of
the 1.15 the demo aims for on the second; seed 1 clears it on both."""


def demo_config(
    out: Path,
    family: FamilyName,
    *,
    steps: int,
    samples: int,
    base: Path | None = None,
    seed: int = 0,
) -> TrainConfig:
    """Write the demo's dataset (and model, without `base`) under `out`; return the config
    that trains on them.

    `base`: the base model folder (the demo's fitted one, `demo_base.fitted_base_model`);
    None writes a tiny random model under `out` (what plumbing tests need, and fast). Its
    paths are absolute: a config file's relative paths resolve against the file's folder, and
    the demo's `demo.yaml` lives inside `out`."""
    out = Path(out).absolute()
    model = write_tiny_model(family, out / "model") if base is None else Path(base).absolute()
    manifest = write_fill_dataset(out / "dataset", samples, sizes=DEMO_SIZES, seed=1)
    held_out = _held_out_index(out)
    # Validation on the first samples: the demo asks whether training fitted them.
    records = [json.loads(line) for line in manifest.read_text().splitlines()[:4]]
    conditions = [manifest.parent / r["conditioning_image"] for r in records]
    captions = [str(r["text"]) for r in records]
    return TrainConfig(
        run_dir=out / "run",
        seed=seed,
        model=BaseModelConfig(source=str(model), frozen_dtype="float32"),
        data=DataConfig(
            source=SourceConfig(manifest),
            buckets=BucketConfig(area=64 * 64, min_side=32, max_side=128, step=16),
            batch_size=4,
            num_workers=0,
        ),
        conditioning=ConditioningConfig(caption_dropout=0.1),
        controlnet=ControlNetConfig(conditioning_embedding_init="he"),
        optimizer=OptimizerConfig(lr=1e-3),
        # Min-SNR weighting moves the loss's weight from the lowest-noise steps (denoised
        # from the noisy latent alone) to the mid and high noise where the outline says
        # where the shape goes: the gain at 300 steps rose from 1.27 to 1.35 with it.
        loss=LossConfig(min_snr_gamma=5.0),
        ema=EMASettings(config=EMAConfig(decay=0.99)),
        validation=ValidationConfig(
            prompts=tuple(captions),
            images=tuple(conditions),
            # A random base renders noise however many steps it takes: plumbing runs take 4.
            num_inference_steps=4 if base is None else 20,
            guidance_scale=3.0,
            resolution=64,
            # A few validations show the control gain rising; a plumbing run of a few steps
            # validates once, at the end.
            every_n_steps=steps // 3 if steps >= 30 else 0,
        ),
        control_gain=ControlGainConfig(index=held_out, repeats=8),
        export=ExportConfig(every_n_steps=0),
        checkpoint=CheckpointConfig(every_n_steps=max(1, steps // 2), resume="none"),
        trainer=TrainerConfig(
            max_steps=steps, precision="32", accelerator="cpu", devices=1, log_every_n_steps=5
        ),
    )


def _held_out_index(out: Path) -> Path:
    """Index 16 fill samples that training never sees (another seed): the control gain's
    held-out set, so that the demo's gain is not a memorised fit of its 48 training pairs."""
    manifest = write_fill_dataset(out / "held-out", HELD_OUT_SAMPLES, sizes=DEMO_SIZES, seed=2)
    path = out / "held-out" / "index"
    if not (path / "index.json").is_file():
        builder, _ = scan(SourceConfig(manifest), progress=False)
        builder.write(path, root=manifest.parent)
    return path


def run_demo(
    out: Path,
    family: FamilyName = "sd15",
    *,
    steps: int = DEMO_STEPS,
    samples: int = 48,
    random_base: bool = False,
) -> Path:
    """Build, train, validate and export; print where the results are; return the export."""
    from cnet_train.config_io import dump_config
    from cnet_train.demo_base import fitted_base_model
    from cnet_train.trainer import fit

    base = None if random_base else fitted_base_model(family)
    config = demo_config(Path(out), family, steps=steps, samples=samples, base=base, seed=DEMO_SEED)
    atomic_write_text(Path(out) / "demo.yaml", dump_config(config))
    trainer, _ = fit(config, enable_progress_bar=True)
    exports = sorted((config.run_dir / "exports").glob("step-*"))
    if not exports:
        raise RuntimeError(f"the demo run in {config.run_dir} produced no export")
    export = exports[-1]
    grids = sorted((config.run_dir / "validation").glob("*.png"))
    print(f"trained {trainer.global_step} steps of a tiny {family} ControlNet on {samples} samples")
    print(f"config:            {Path(out) / 'demo.yaml'}")
    print(f"ControlNet:        {export / 'controlnet'}")
    if (export / "controlnet_ema").exists():
        print(f"EMA ControlNet:    {export / 'controlnet_ema'}")
    if grids:
        print(f"validation grid:   {grids[-1]}")
    print(f"loss curve:        {config.run_dir / 'loss.png'}")
    print(f"TensorBoard logs:  {config.run_dir / 'logs'}")
    return export
