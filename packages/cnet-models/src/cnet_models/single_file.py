"""A base model kept as one checkpoint file (A1111 / Forge / ComfyUI style), loaded for training.

`model.source: path/model.safetensors` is read by diffusers' own `from_single_file`, with the
component configs, tokenizers and scheduler of `model.config` (a diffusers folder or hub id;
by default the family's reference model, `configs.REFERENCE_MODELS`). The family comes from
`model.family` or from the checkpoint's keys: an SDXL checkpoint has a second text encoder
(`conditioner.embedders.1.`), SD 2.x an OpenCLIP one (`cond_stage_model.model.`), SD 1.x
CLIP (`cond_stage_model.transformer.`). Only safetensors are read: a `.ckpt` is a pickle,
which can run code when loaded.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from cnet_models.facade import ModelFolderError
from cnet_models.families import FamilyName

_FAMILY_KEYS: tuple[tuple[FamilyName, str], ...] = (
    ("sdxl", "conditioner.embedders.1."),
    ("sd21", "cond_stage_model.model."),
    ("sd15", "cond_stage_model.transformer."),
)


def checked_single_file(source: str) -> Path:
    """`source` as an existing `.safetensors` file; `ModelFolderError` naming what is wrong."""
    path = Path(source).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ModelFolderError(
            f"model.source {source} is a {path.suffix} checkpoint: cnet reads single files as "
            ".safetensors only (a pickled checkpoint can run code when loaded); convert it to "
            "safetensors first"
        )
    if not path.is_file():
        raise ModelFolderError(f"single-file checkpoint {source} does not exist")
    return path


def checkpoint_family(path: Path) -> FamilyName:
    """The family of a single-file checkpoint, by its text encoders' key prefixes."""
    with safe_open(str(path), framework="pt") as checkpoint:
        keys = list(checkpoint.keys())
    for family, prefix in _FAMILY_KEYS:
        if any(key.startswith(prefix) for key in keys):
            return family
    raise ModelFolderError(
        f"single-file checkpoint {path} has no SD 1.5, SD 2.1 or SDXL text encoder keys "
        "(cond_stage_model. / conditioner.embedders.); set model.family and model.config, or "
        "convert it to a diffusers folder"
    )
