"""`cnet-train demo`: the whole product offline on a CPU in a few minutes.

A tiny random base model of the chosen family and a generated fill dataset (a filled shape on a
background; condition: its outline; caption: the colours and the shape) go through indexing,
training, validation and export, and the demo prints where everything landed.
"""

from __future__ import annotations

import json
from pathlib import Path

from cnet_data.atomic import atomic_write_text
from cnet_data.buckets import BucketConfig
from cnet_data.sources import SourceConfig
from cnet_data.synthetic import write_fill_dataset
from cnet_models.configs import BaseModelConfig
from cnet_models.ema import EMAConfig
from cnet_models.families import FamilyName
from cnet_models.tiny import write_tiny_model
from cnet_train.config import (
    CheckpointConfig,
    DataConfig,
    EMASettings,
    ExportConfig,
    OptimizerConfig,
    TrainConfig,
    TrainerConfig,
    ValidationConfig,
)

DEMO_SIZES = ((64, 64), (80, 48), (48, 80))


def demo_config(out: Path, family: FamilyName, *, steps: int, samples: int) -> TrainConfig:
    """Write the demo's model and dataset under `out`; return the config that trains on them.

    Its paths are absolute: a config file's relative paths resolve against the file's folder,
    and the demo's `demo.yaml` lives inside `out`."""
    out = Path(out).absolute()
    model = write_tiny_model(family, out / "model")
    manifest = write_fill_dataset(out / "dataset", samples, sizes=DEMO_SIZES, seed=1)
    # Validation on the first samples: the demo asks whether training fitted them.
    records = [json.loads(line) for line in manifest.read_text().splitlines()[:4]]
    conditions = [manifest.parent / r["conditioning_image"] for r in records]
    captions = [str(r["text"]) for r in records]
    return TrainConfig(
        run_dir=out / "run",
        model=BaseModelConfig(source=str(model), frozen_dtype="float32"),
        data=DataConfig(
            source=SourceConfig(manifest),
            buckets=BucketConfig(area=64 * 64, min_side=32, max_side=128, step=16),
            batch_size=4,
            num_workers=0,
            caption_dropout=0.1,
        ),
        optimizer=OptimizerConfig(lr=1e-3),
        ema=EMASettings(config=EMAConfig(decay=0.99)),
        validation=ValidationConfig(
            prompts=tuple(captions),
            images=tuple(conditions),
            num_inference_steps=4,
            guidance_scale=3.0,
            resolution=64,
        ),
        export=ExportConfig(every_n_steps=0),
        checkpoint=CheckpointConfig(every_n_steps=max(1, steps // 2), resume="none"),
        trainer=TrainerConfig(
            max_steps=steps, precision="32", accelerator="cpu", devices=1, log_every_n_steps=5
        ),
    )


def run_demo(
    out: Path, family: FamilyName = "sd15", *, steps: int = 150, samples: int = 48
) -> Path:
    """Build, train, validate and export; print where the results are; return the export."""
    from cnet_train.config_io import dump_config
    from cnet_train.trainer import fit

    config = demo_config(Path(out), family, steps=steps, samples=samples)
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
