"""Caption dropout gives what the family's pipeline feeds unconditioned at inference: all-zero
embeddings for SDXL (`force_zeros_for_empty_prompt`), the encoded empty prompt for SD 1.5 / 2.1,
unless the config says otherwise; with and without the embedding cache; and the validation
pipeline renders with the same choice."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from cnet_data.batch import Batch
from cnet_models.families import FAMILIES, unconditional_zeros, zeros_for_empty_prompt
from cnet_models.pipelines import controlnet_pipeline, generate, read_model_index
from cnet_models.text import PromptEmbeddings
from cnet_train.conditioning_config import ConditioningConfig
from cnet_train.config import CacheConfig, TrainConfig
from cnet_train.data import ControlNetDataModule
from cnet_train.embed import embed_captions
from cnet_train.module import ControlNetModule

MakeConfig = Callable[..., TrainConfig]


def _first_batch(config: TrainConfig) -> Batch:
    data = ControlNetDataModule(config)
    data.setup("fit")
    batch: Batch = next(iter(data.train_dataloader()))
    return batch


def _dropping(probability: float, choice: Any = "auto") -> ConditioningConfig:
    return ConditioningConfig(caption_dropout=probability, caption_dropout_embedding=choice)


def _dropped(make_config: MakeConfig, family: str, choice: str, *, cached: bool) -> Any:
    """(module, conditioning of a batch with every caption dropped, the batch)."""
    config = make_config(family, conditioning=_dropping(1.0, choice))
    if cached:
        config = attrs.evolve(config, cache=CacheConfig(path=config.run_dir / "cache"))
        embed_captions(config)
    module = ControlNetModule(config)
    module.setup("fit")
    batch = _first_batch(config)
    return module, module.condition(batch, module.step_generator(0)), batch


def _is_zero(text: PromptEmbeddings) -> bool:
    parts = [text.prompt_embeds, text.pooled_prompt_embeds]
    return all(not bool(p.any()) for p in parts if p is not None)


def _assert_empty_prompt(module: ControlNetModule, text: PromptEmbeddings) -> None:
    empty = module.prompt_encoder.empty_prompt()
    assert not _is_zero(empty)  # the two choices differ for these models
    batch = text.prompt_embeds.shape[0]
    torch.testing.assert_close(text.prompt_embeds, empty.prompt_embeds.expand(batch, -1, -1))
    if empty.pooled_prompt_embeds is not None:
        assert text.pooled_prompt_embeds is not None
        pooled = empty.pooled_prompt_embeds.expand(batch, -1)
        torch.testing.assert_close(text.pooled_prompt_embeds, pooled)


@pytest.mark.parametrize("cached", [False, True], ids=["online", "cache"])
@pytest.mark.parametrize(
    ("family", "choice", "zeros"),
    [
        ("sdxl", "auto", True),
        ("sd15", "auto", False),
        ("sdxl", "empty_prompt", False),
        ("sd15", "zeros", True),
    ],
)
def test_dropped_captions_follow_the_choice(
    make_config: MakeConfig, family: str, choice: str, zeros: bool, cached: bool
) -> None:
    module, text, batch = _dropped(make_config, family, choice, cached=cached)
    assert module.zero_unconditional is zeros
    assert (module.cache is not None) is cached
    assert text.prompt_embeds.shape[0] == len(batch["caption"])
    if family == "sdxl":
        assert text.pooled_prompt_embeds is not None
    if zeros:
        assert _is_zero(text)
    else:
        _assert_empty_prompt(module, text)


def test_kept_captions_are_not_zeroed(make_config: MakeConfig) -> None:
    config = make_config("sdxl", conditioning=_dropping(0.0))
    module = ControlNetModule(config)
    batch = _first_batch(config)
    text = module.condition(batch, module.step_generator(0))
    expected = module.prompt_encoder.encode(list(batch["caption"]))
    torch.testing.assert_close(text.prompt_embeds, expected.prompt_embeds)
    assert module.zero_unconditional  # zeros would be used, had a caption been dropped


def test_some_dropped_some_kept_with_zeros(make_config: MakeConfig) -> None:
    config = make_config("sdxl", conditioning=_dropping(0.5), data_batch_size=4)
    module = ControlNetModule(config)
    batch = _first_batch(config)
    encoded = module.prompt_encoder.encode(list(batch["caption"]))
    for step in range(20):
        text = module.condition(batch, module.step_generator(step))
        zero_rows = [not bool(row.any()) for row in text.prompt_embeds]
        if any(zero_rows) and not all(zero_rows):
            break
    else:
        pytest.fail("no step dropped some captions and kept others")
    for i, zero in enumerate(zero_rows):
        assert text.pooled_prompt_embeds is not None
        assert bool(text.pooled_prompt_embeds[i].any()) is not zero  # pooled follows
        if not zero:
            torch.testing.assert_close(text.prompt_embeds[i], encoded.prompt_embeds[i])


def test_a_folder_that_turns_zeros_off_is_followed(make_config: MakeConfig) -> None:
    config = make_config("sdxl", conditioning=_dropping(1.0))
    index_path = Path(config.model.source) / "model_index.json"
    index = json.loads(index_path.read_text())
    assert index["force_zeros_for_empty_prompt"] is True  # the tiny SDXL folder says so
    index["force_zeros_for_empty_prompt"] = False
    index_path.write_text(json.dumps(index))
    module = ControlNetModule(config)
    assert not module.zero_unconditional
    _assert_empty_prompt(module, module.condition(_first_batch(config), module.step_generator(0)))
    # The validation pipeline, left to itself, reads the same folder.
    pipe = controlnet_pipeline(module.base, module.controlnet)
    assert pipe.config["force_zeros_for_empty_prompt"] is False


def test_what_a_folder_says_counts_only_where_the_pipeline_reads_it(tmp_path: Path) -> None:
    sdxl, sd15 = FAMILIES["sdxl"], FAMILIES["sd15"]
    assert zeros_for_empty_prompt(sdxl, None)  # SDXL pipelines' default
    assert zeros_for_empty_prompt(sdxl, {})
    assert not zeros_for_empty_prompt(sdxl, {"force_zeros_for_empty_prompt": False})
    assert not zeros_for_empty_prompt(sd15, {"force_zeros_for_empty_prompt": True})
    assert unconditional_zeros("zeros", sd15, None)
    assert not unconditional_zeros("empty_prompt", sdxl, None)
    assert read_model_index(str(tmp_path)) is None  # no model_index.json: the family decides


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_validation_renders_with_the_choice(make_config: MakeConfig, family: str) -> None:
    module = ControlNetModule(make_config(family))
    control = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))

    def render(zeros: bool | None) -> np.ndarray:
        pipe = controlnet_pipeline(module.base, module.controlnet, zeros=zeros)
        (image,) = generate(
            pipe, ["a red circle"], [control], resolution=64, steps=2, guidance_scale=5.0, seeds=[0]
        )
        return np.asarray(image)

    zeros, empty = render(True), render(False)
    assert not np.array_equal(zeros, empty)
    # Left to itself, the pipeline does what the family's pipeline does (and training too).
    default = render(None)
    expected = zeros if module.zero_unconditional else empty
    np.testing.assert_array_equal(default, expected)
