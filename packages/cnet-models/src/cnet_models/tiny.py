"""Tiny random SD 1.5-, SD 2.1- and SDXL-shaped model folders, written offline.

Each tiny part starts from the family's full-size config (`archs/`) and shrinks only the sizes,
so it keeps every structural flag of the real one (linear projections and upcast attention for
2.1, the text-time added conditioning for SDXL, v-prediction, the VAE's scaling factor). The
folder is in diffusers format and loads with the family's pipeline, fully offline.

    python -m cnet_models.tiny sdxl /tmp/tiny-sdxl
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from cnet_models.atomic import replace_dir_atomically
from cnet_models.facade import (
    AutoencoderKL,
    CLIPTextConfig,
    DDPMScheduler,
    UNet2DConditionModel,
    checked,
)
from cnet_models.families import FAMILY_NAMES, ModelFamily, family_by_name
from cnet_models.fullsize import load_arch_config, text_encoder_class
from cnet_models.vocab import TokenizerIds, write_clip_tokenizer

TINY_RESOLUTION = 64
"""Default image side of the tiny models (8x8 latents), what their pipelines generate."""

# Sizes only; the structure comes from the full-size config, the block layout cut to two from
# the family's spec. (32, 64) channels keep the default 32 norm groups valid, and two blocks
# are the fewest with a down- and an up-sample.
_TINY_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "attention_head_dim": [2, 4],
    "sample_size": TINY_RESOLUTION // 8,
}
# Four blocks, as the real VAE: three downsamples give the scale factor 8 that ControlNet's
# conditioning embedding assumes.
_TINY_VAE: dict[str, Any] = {
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": TINY_RESOLUTION,
}
# Two layers, so that SDXL's penultimate hidden state is a real intermediate layer.
_TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}


def tiny_text_config(family: str, part: str, ids: TokenizerIds) -> dict[str, Any]:
    """A text encoder config whose vocabulary and special ids are those of its tokenizer.

    The ids matter: CLIP pools the hidden state at the first `eos_token_id`, so a wrong id
    would read SDXL's pooled embedding from the wrong token.
    """
    return {**load_arch_config(family, part), **_TINY_TEXT, **attrs.asdict(ids)}


def tiny_unet_config(family: str, text_configs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A UNet config sized to the tiny text encoders it is conditioned on."""
    config = {**load_arch_config(family, "unet"), **_TINY_UNET}
    # The pipelines concatenate the encoders' hidden states along the feature axis.
    config["cross_attention_dim"] = sum(c["hidden_size"] for c in text_configs)
    return family_by_name(family).tiny_unet_config(config, text_configs)


def tiny_vae_config(family: str) -> dict[str, Any]:
    return {**load_arch_config(family, "vae"), **_TINY_VAE}


def write_tiny_model(family: str, path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random model folder of `family` at `path` and return `path`.

    The same seed gives the same bytes. The folder is built beside `path` and renamed into
    place when complete, so an existing folder at `path` is replaced only by a whole new one.
    """
    spec = family_by_name(family)  # an unknown family fails before anything is written
    path = Path(path)
    replace_dir_atomically(path, lambda folder: _write_parts(spec, folder, seed))
    return path


def _write_parts(family: ModelFamily, folder: Path, seed: int) -> None:
    text_configs = []
    parts = zip(family.tokenizers, family.text_encoders, family.tiny_pad_tokens, strict=True)
    for i, (tokenizer, encoder, pad_token) in enumerate(parts):
        ids = write_clip_tokenizer(folder / tokenizer, pad_token=pad_token)
        config = tiny_text_config(family.name, encoder, ids)
        kind = text_encoder_class(config)
        with _seeded(seed, 10 + i):
            kind(CLIPTextConfig.from_dict(config)).save_pretrained(folder / encoder)
        text_configs.append(config)
    with _seeded(seed, 1):
        unet = UNet2DConditionModel.from_config(tiny_unet_config(family.name, text_configs))
        checked(unet, UNet2DConditionModel, "tiny UNet").save_pretrained(folder / "unet")
    with _seeded(seed, 2):
        vae = AutoencoderKL.from_config(tiny_vae_config(family.name))
        checked(vae, AutoencoderKL, "tiny VAE").save_pretrained(folder / "vae")
    scheduler = DDPMScheduler.from_config(load_arch_config(family.name, "scheduler"))
    checked(scheduler, DDPMScheduler, "scheduler").save_pretrained(folder / "scheduler")
    _write_model_index(family, folder / "model_index.json")


@contextlib.contextmanager
def _seeded(seed: int, part: int) -> Iterator[None]:
    """Initialise one part from its own seed on the CPU, leaving the caller's RNG untouched.

    A seed per part keeps each part's weights independent of how the others are built.
    """
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed * 100 + part)
        yield


def _write_model_index(family: ModelFamily, path: Path) -> None:
    """The pipeline's component table (the optional image parts null) and the family's own
    entries (SD's safety checker off, SDXL's zeros for the empty prompt)."""
    index: dict[str, Any] = {
        "_class_name": family.pipeline,
        "_diffusers_version": importlib.metadata.version("diffusers"),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for tokenizer in family.tokenizers:
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
    for encoder in family.text_encoders:
        kind = text_encoder_class(load_arch_config(family.name, encoder))
        index[encoder] = ["transformers", kind.__name__]
    index.update(family.model_index_entries())
    path.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnet_models.tiny",
        description="Write a tiny random model folder (diffusers format) for tests and demos.",
    )
    parser.add_argument("family", choices=FAMILY_NAMES, help="model family")
    parser.add_argument("out", type=Path, help="folder to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    args = parser.parse_args(argv)
    path = write_tiny_model(args.family, args.out, seed=args.seed)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote tiny {args.family} model to {path} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
