"""Loading, checking, overriding and writing the training config (`cnet_train.config_io`)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cnet_data.sources import SourceConfig
from cnet_models.configs import BaseModelConfig
from cnet_models.ema import EMAConfig
from cnet_train.config import DataConfig, EMASettings, TrainConfig
from cnet_train.config_io import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    write_resolved_config,
)

MINIMAL = """\
run_dir: runs/minimal
model:
  source: models/sd15
data:
  source:
    path: data/train.jsonl
"""

# Every section, and in each a value that differs from the default where one exists.
FULL = """\
run_dir: runs/full
seed: 7
model:
  source: stabilityai/stable-diffusion-xl-base-1.0
  family: sdxl
  vae: madebyollin/sdxl-vae-fp16-fix
  frozen_dtype: float16
  revision: main
  variant: fp16
  local_files_only: true
data:
  source:
    path: data/pairs
    format: folder
    image_key: img
    conditioning_key: cond
    caption_key: caption
    image_dir: imgs
    conditioning_dir: conds
    caption_suffix: .caption
  index: runs/full/index
  scan: {max_pixels: 1000000, verify: decode, on_bad: fail, workers: 3}
  buckets: {area: 262144, min_side: 256, max_side: 1024, step: 64}
  augment: {random_crop: false, flip_probability: 0.5, resample: lanczos, max_pixels: 1000000}
  batch_size: 2
  num_workers: 0
  prefetch_factor: 3
  pin_memory: false
  caption_dropout: 0.1
controlnet:
  pretrained: lllyasviel/sd-controlnet-canny
  conditioning_channels: 1
  conditioning_embedding_out_channels: [16, 32, 96, 256]
  gradient_checkpointing: true
  unet_gradient_checkpointing: true
cache: {path: runs/full/cache, batch_size: 16}
optimizer: {name: adamw8bit, lr: 2e-5, betas: [0.8, 0.99], weight_decay: 0.0, eps: 1.0e-6}
schedule: {name: cosine, warmup_steps: 100}
loss: {min_snr_gamma: 5.0, noise_offset: 0.05, conditioning_scale: 0.5}
ema:
  enabled: false
  config:
    decay: 0.999
    warmup: false
    inv_gamma: 2.0
    power: 0.75
    update_after_step: 10
    min_decay: 0.5
    every_n_steps: 4
    device: cpu
validation:
  every_n_steps: 250
  prompts: [a red car, "a cat: sitting"]
  images: [val/car.png, val/cat.png]
  num_inference_steps: 10
  guidance_scale: 5.0
  resolution: 512
  seed: 3
export: {every_n_steps: 1000, keep_last: 3}
checkpoint: {every_n_steps: 200, keep_last: 1, resume: none}
trainer:
  max_steps: 5000
  precision: "bf16-mixed"
  strategy: deepspeed
  deepspeed_stage: 3
  offload_optimizer: true
  accelerator: gpu
  devices: 8
  num_nodes: 2
  accumulate_grad_batches: 4
  gradient_clip_val: null
  compile: true
  log_every_n_steps: 5
"""


def _write(folder: Path, text: str, name: str = "run.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _minimal_with(extra: dict[str, Any]) -> dict[str, Any]:
    """The minimal config with `extra`'s sections merged in (one level deep)."""
    data: dict[str, Any] = yaml.safe_load(MINIMAL)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def _problems(data: dict[str, Any], overrides: Sequence[str] = ()) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data, overrides)
    assert caught.value.problems, "a ConfigError from structuring must list its problems"
    for problem in caught.value.problems:
        assert problem in str(caught.value)
    return caught.value.problems


# --- loading and writing back


def test_full_config_loads_every_section_and_round_trips(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, FULL))
    assert config.model.family == "sdxl" and config.model.local_files_only is True
    assert config.data.source.format == "folder"
    assert config.data.buckets.area == 262144
    assert config.data.augment.resample == "lanczos"
    assert config.controlnet.conditioning_embedding_out_channels == (16, 32, 96, 256)
    assert config.optimizer.lr == 2e-5 and config.optimizer.betas == (0.8, 0.99)
    assert config.ema.config.device == "cpu" and config.ema.enabled is False
    assert config.validation.images == (Path("val/car.png"), Path("val/cat.png"))
    assert config.validation.prompts == ("a red car", "a cat: sitting")
    assert config.trainer.devices == 8 and config.trainer.gradient_clip_val is None
    assert config.checkpoint.resume == "none"

    again = load_config(_write(tmp_path, dump_config(config), "dumped.yaml"))
    assert again == config


def test_config_to_dict_is_plain_yaml_data_in_schema_order(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, FULL))
    data = config_to_dict(config)
    # safe_dump refuses Path and tuple objects: this passing means only plain types remain.
    yaml.safe_dump(data)
    assert data["run_dir"] == "runs/full"
    assert data["optimizer"]["betas"] == [0.8, 0.99]
    assert data["validation"]["images"] == ["val/car.png", "val/cat.png"]
    schema_order = [a.name for a in attrs.fields(TrainConfig)]
    assert list(data) == schema_order
    top_level = [line.split(":")[0] for line in dump_config(config).splitlines() if line[0] != " "]
    assert top_level == schema_order
    assert config_from_dict(data) == config


def test_minimal_config_gets_the_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL))
    assert config == TrainConfig(
        run_dir=Path("runs/minimal"),
        model=BaseModelConfig(source="models/sd15"),
        data=DataConfig(source=SourceConfig(path=Path("data/train.jsonl"))),
    )
    # Relative paths stay as written: nothing is resolved against the file or the cwd.
    assert not config.run_dir.is_absolute()
    assert config.data.scan.on_bad == "skip"


def test_write_resolved_config_is_atomic_and_loads_back(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, FULL))
    run_dir = tmp_path / "run" / "nested"
    (run_dir).mkdir(parents=True)
    (run_dir / "config.yaml").write_text("stale: true\n", encoding="utf-8")
    written = write_resolved_config(config, run_dir)
    assert written == run_dir / "config.yaml"
    assert load_config(written) == config
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_dump_keeps_unicode_readable_and_exact() -> None:
    data = yaml.safe_load(MINIMAL)
    data["validation"] = {"prompts": ["café au lait", "line\x85break", "\u2028"]}
    config = config_from_dict(data)
    text = dump_config(config)
    assert config_from_dict(yaml.safe_load(text)) == config
    plain = config_from_dict(yaml.safe_load(MINIMAL), ["validation.prompts=[café]"])
    assert "café" in dump_config(plain)


def test_write_resolved_config_creates_the_run_dir(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL))
    written = write_resolved_config(config, tmp_path / "new_run")
    assert load_config(written) == config


# --- overrides


def test_overrides_parse_values_as_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, FULL)
    config = load_config(
        path,
        [
            "optimizer.lr=1e-5",
            "trainer.compile=false",
            "trainer.gradient_clip_val=0.5",
            "data.index=null",
            "optimizer.betas=[0.5, 0.6]",
            "validation.prompts=[one, two, three]",
            "trainer.devices=auto",
            "controlnet.conditioning_embedding_out_channels=null",
            "model.source=/models/with=sign",
        ],
    )
    assert config.optimizer.lr == 1e-5 and isinstance(config.optimizer.lr, float)
    assert config.trainer.compile is False
    assert config.trainer.gradient_clip_val == 0.5
    assert config.data.index is None
    assert config.optimizer.betas == (0.5, 0.6)
    assert config.validation.prompts == ("one", "two", "three")
    assert config.trainer.devices == "auto"
    assert config.controlnet.conditioning_embedding_out_channels is None
    assert config.model.source == "/models/with=sign"


def test_later_overrides_win_and_the_input_is_not_modified() -> None:
    data = _minimal_with({})
    before = yaml.safe_dump(data)
    config = config_from_dict(data, ["seed=1", "seed=2", "data.batch_size=8"])
    assert config.seed == 2 and config.data.batch_size == 8
    assert yaml.safe_dump(data) == before


def test_override_creates_sections_absent_from_the_file(tmp_path: Path) -> None:
    config = load_config(
        _write(tmp_path, MINIMAL), ["ema.config.decay=0.99", "ema.config.device=cpu"]
    )
    assert config.ema == EMASettings(config=EMAConfig(decay=0.99, device="cpu"))
    from_null = config_from_dict(_minimal_with({"loss": None}), ["loss.noise_offset=0.1"])
    assert from_null.loss.noise_offset == 0.1


def test_override_of_an_unknown_path_names_it_and_lists_the_valid_keys() -> None:
    (problem,) = _problems(_minimal_with({}), ["optimizer.lrr=1e-4"])
    assert problem.startswith("optimizer.lrr: unknown key 'lrr' (did you mean lr?)")
    assert "valid keys in optimizer: name, lr, betas, weight_decay, eps" in problem

    (problem,) = _problems(_minimal_with({}), ["traner.max_steps=10"])
    assert problem.startswith("traner.max_steps: unknown key 'traner' (did you mean trainer?)")
    assert "valid keys at the top level: run_dir, model, data, seed," in problem


def test_overrides_that_cannot_apply_are_reported_with_the_file_problems() -> None:
    problems = _problems(
        _minimal_with({"data": {"batch_size": 0}}),
        ["data.batch_size.x=1", "seed", "optimizer.lr=[unclosed"],
    )
    assert len(problems) == 4
    assert problems[0] == "data.batch_size.x: data.batch_size is a value, not a section"
    assert problems[1].startswith("override 'seed': expected KEY=VALUE")
    assert problems[2].startswith("optimizer.lr: value '[unclosed' is not valid YAML")
    assert problems[3] == "data.batch_size: must be at least 1, got 0"


def test_override_into_a_non_mapping_section_is_refused() -> None:
    problems = _problems(_minimal_with({"loss": 3}), ["loss.noise_offset=0.1"])
    assert problems[0].startswith("loss.noise_offset: cannot set it, loss is 3")
    assert "loss: expected a section (a mapping of keys), got 3" in problems


def test_override_values_are_checked_as_strictly_as_the_file() -> None:
    (problem,) = _problems(_minimal_with({}), ["trainer.compile='false'"])
    assert problem.startswith("trainer.compile: expected true or false, got the string 'false'")


# --- strict scalars


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"data": {"batch_size": 7.9}}, "data.batch_size: expected an integer, got 7.9"),
        ({"data": {"batch_size": True}}, "data.batch_size: expected an integer, got true"),
        ({"data": {"batch_size": "8"}}, "data.batch_size: expected an integer, got '8'"),
        (
            {"trainer": {"compile": "false"}},
            "trainer.compile: expected true or false, got the string 'false' (drop the quotes)",
        ),
        ({"trainer": {"compile": 0}}, "trainer.compile: expected true or false, got 0"),
        ({"optimizer": {"lr": "fast"}}, "optimizer.lr: expected a number, got 'fast'"),
        ({"optimizer": {"lr": True}}, "optimizer.lr: expected a number, got true"),
        ({"optimizer": {"lr": "nan"}}, "optimizer.lr: expected a number, got 'nan'"),
        ({"model": {"source": 123}}, "model.source: expected a string, got 123"),
        ({"run_dir": ""}, "run_dir: expected a path (a non-empty string), got ''"),
        ({"run_dir": 5}, "run_dir: expected a path (a non-empty string), got 5"),
        (
            {"trainer": {"devices": "many"}},
            "trainer.devices: expected an integer or 'auto', got 'many'",
        ),
        (
            {"trainer": {"devices": 2.0}},
            "trainer.devices: expected an integer or 'auto', got 2.0",
        ),
        (
            {"loss": {"min_snr_gamma": "high"}},
            "loss.min_snr_gamma: expected a number, got 'high'",
        ),
    ],
)
def test_scalars_are_strict(section: dict[str, Any], expected: str) -> None:
    assert _problems(_minimal_with(section)) == (expected,)


def test_float_fields_take_numbers_that_pyyaml_reads_as_strings(tmp_path: Path) -> None:
    text = MINIMAL + "optimizer:\n  lr: 3e-5\n  eps: 1E-8\n  weight_decay: 0\n"
    assert yaml.safe_load(text)["optimizer"]["lr"] == "3e-5"  # why the float hook takes strings
    config = load_config(_write(tmp_path, text))
    assert config.optimizer.lr == 3e-5 and isinstance(config.optimizer.lr, float)
    assert config.optimizer.eps == 1e-8
    assert config.optimizer.weight_decay == 0.0 and isinstance(config.optimizer.weight_decay, float)


def test_literals_list_the_allowed_values() -> None:
    problems = _problems(
        _minimal_with(
            {"trainer": {"strategy": "ddpx", "precision": 32}, "model": {"family": "sd3"}}
        )
    )
    assert "trainer.strategy: 'ddpx' is not one of auto, ddp, deepspeed, fsdp" in problems
    assert "model.family: 'sd3' is not one of sd15, sd21, sdxl" in problems
    # YAML's 32 is a number, the literal is the string '32': the message says so.
    assert any(
        p.startswith("trainer.precision: 32 is not one of 32, bf16-mixed, 16-mixed (a number")
        for p in problems
    )


def test_integer_literal_refuses_true_and_strings() -> None:
    for value in (True, "2", 2.0):
        (problem,) = _problems(_minimal_with({"trainer": {"deepspeed_stage": value}}))
        assert problem.startswith("trainer.deepspeed_stage: ") and "is not one of 2, 3" in problem


def test_tuples_come_from_lists_of_the_right_length_and_items() -> None:
    problems = _problems(
        _minimal_with(
            {
                "optimizer": {"betas": [0.9]},
                "validation": {"prompts": ["fine", 3, "fine", None], "images": "a.png"},
            }
        )
    )
    assert problems == (
        "optimizer.betas: expected a list of 2 items, got 1",
        "validation.prompts[1]: expected a string, got 3",
        "validation.prompts[3]: expected a string, got null",
        "validation.images: expected a list, got 'a.png'",
    )


# --- keys


def test_unknown_keys_suggest_the_nearest_known_key() -> None:
    problems = _problems(
        _minimal_with(
            {
                "optimiser": {"lr": 1e-4},
                "data": {"batch_sise": 2, "source": {"path": "x", "formatt": "jsonl"}},
                "zzz": 1,
            }
        )
    )
    assert "optimiser: unknown key (did you mean optimizer?)" in problems
    assert "data.batch_sise: unknown key (did you mean batch_size?)" in problems
    assert "data.source.formatt: unknown key (did you mean format?)" in problems
    (far,) = [p for p in problems if p.startswith("zzz:")]
    assert far.startswith("zzz: unknown key (valid keys: run_dir, model, data,")
    assert len(problems) == 4


def test_missing_required_keys_are_named() -> None:
    problems = _problems({"model": {}, "data": {"source": {}}})
    assert problems == (
        "run_dir: required key is missing",
        "model.source: required key is missing",
        "data.source.path: required key is missing",
    )


def test_a_section_that_is_not_a_mapping_is_named() -> None:
    assert _problems(_minimal_with({"trainer": ["ddp"]})) == (
        "trainer: expected a section (a mapping of keys), got ['ddp']",
    )


# --- validators and many errors at once


def test_validator_errors_carry_the_key_path() -> None:
    problems = _problems(
        _minimal_with(
            {
                "data": {"batch_size": 0, "caption_dropout": 1.5, "buckets": {"step": 0}},
                "ema": {"config": {"decay": 2.0, "update_after_step": -1}},
                "checkpoint": {"keep_last": 0},
            }
        )
    )
    assert "data.batch_size: must be at least 1, got 0" in problems
    assert "data.caption_dropout: must be in [0, 1], got 1.5" in problems
    assert "ema.config.decay: must be in [0, 1], got 2.0" in problems
    assert "ema.config.update_after_step: must be >= 0: -1" in problems
    assert "checkpoint.keep_last: must be at least 1, got 0" in problems
    # A check across fields (in __attrs_post_init__) is reported at its section's path.
    assert "data.buckets: buckets.step must be positive, got 0" in problems
    assert len(problems) == 6


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    text = FULL.replace("batch_size: 2", "batch_size: 2.5").replace("lr: 2e-5", "lr: fast")
    text = text.replace("strategy: deepspeed", "strategy: ddpx").replace("seed: 7", "sed: 7")
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    assert str(caught.value).startswith(f"invalid config {tmp_path / 'run.yaml'} (4 problems):")
    assert sorted(caught.value.problems) == [
        "data.batch_size: expected an integer, got 2.5",
        "optimizer.lr: expected a number, got 'fast'",
        "sed: unknown key (did you mean seed?)",
        "trainer.strategy: 'ddpx' is not one of auto, ddp, deepspeed, fsdp",
    ]


# --- the file itself


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- run_dir: x\n- model: y\n", "must hold a mapping of keys (run_dir, model, data, ...)"),
        ("just a string\n", "got str 'just a string'"),
        ("", "got an empty file"),
        ("run_dir: [unclosed\n", "is not valid YAML"),
    ],
)
def test_a_file_that_is_not_a_mapping_is_named(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"config file .*run\.yaml") as caught:
        load_config(path)
    assert expected in str(caught.value)
    assert caught.value.problems == ()


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError, match=r"config file .*nowhere\.yaml does not exist"):
        load_config(path)


# --- property: any valid overrides give a config that round-trips


def _plain(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _paths(value: object) -> object:
    if isinstance(value, list):
        return tuple(Path(v) for v in value)
    return None if value is None else Path(str(value))


_PATH_TEXT = st.text("abc_-./", min_size=1, max_size=12)
_FLOAT = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
_EXPONENT_TEXT = st.builds(lambda m, e: f"{m}e-{e}", st.integers(1, 9), st.integers(1, 12))

# key -> (strategy of the YAML value, what the config then holds)
_VALID: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], object]]] = {
    "seed": (st.integers(0, 2**63), _plain),
    "model.family": (st.sampled_from([None, "sd15", "sd21", "sdxl"]), _plain),
    "model.vae": (st.none() | st.text(max_size=20), _plain),
    "data.index": (st.none() | _PATH_TEXT, _paths),
    "data.batch_size": (st.integers(1, 1024), _plain),
    "data.caption_dropout": (st.floats(0, 1), _plain),
    "data.augment.flip_probability": (st.floats(0, 1), _plain),
    "controlnet.conditioning_embedding_out_channels": (
        st.none() | st.lists(st.integers(1, 512), max_size=4),
        lambda v: None if v is None else tuple(v),
    ),
    "optimizer.lr": (_EXPONENT_TEXT, float),
    "optimizer.betas": (st.lists(_FLOAT, min_size=2, max_size=2), _plain),
    "loss.min_snr_gamma": (st.none() | _FLOAT, _plain),
    "ema.enabled": (st.booleans(), _plain),
    "ema.config.every_n_steps": (st.integers(1, 100), _plain),
    "validation.prompts": (st.lists(st.text(max_size=30), max_size=3), _plain),
    "validation.images": (st.lists(_PATH_TEXT, max_size=3), _paths),
    "checkpoint.resume": (st.text(max_size=20), _plain),
    "trainer.precision": (st.sampled_from(["32", "bf16-mixed", "16-mixed"]), _plain),
    "trainer.strategy": (st.sampled_from(["auto", "ddp", "deepspeed", "fsdp"]), _plain),
    "trainer.devices": (st.integers(1, 64) | st.just("auto"), _plain),
    "trainer.gradient_clip_val": (st.none() | _FLOAT, _plain),
    "trainer.compile": (st.booleans(), _plain),
}


def _as_override(key: str, value: object) -> str:
    # A string is passed as is when YAML reads it back unchanged (e.g. `3e-5`), else dumped.
    if isinstance(value, str) and key == "optimizer.lr":
        return f"{key}={value}"
    # Escaped: PyYAML writes U+0085 raw with allow_unicode and reads it back as a space.
    return f"{key}={yaml.safe_dump(value, default_flow_style=True)}"


def _dotted(config: object, key: str) -> object:
    for name in key.split("."):
        config = getattr(config, name)
    return config


@settings(max_examples=60, deadline=None)
@given(st.fixed_dictionaries({}, optional={k: strategy for k, (strategy, _) in _VALID.items()}))
def test_valid_overrides_round_trip_through_dump_and_load(chosen: dict[str, Any]) -> None:
    pair = (chosen.get("trainer.strategy"), chosen.get("trainer.precision"))
    assume(pair != ("deepspeed", "16-mixed"))  # the one refused pair, tested on its own
    overrides = [_as_override(key, value) for key, value in chosen.items()]
    config = config_from_dict(yaml.safe_load(MINIMAL), overrides)
    for key, value in chosen.items():
        assert _dotted(config, key) == _VALID[key][1](value), key
    with tempfile.TemporaryDirectory() as folder:
        written = write_resolved_config(config, Path(folder))
        assert load_config(written) == config


def test_deepspeed_refuses_16_mixed() -> None:
    (problem,) = _problems(
        _minimal_with({"trainer": {"strategy": "deepspeed", "precision": "16-mixed"}})
    )
    assert "16-mixed is not available with trainer.strategy deepspeed" in problem
    assert "use bf16-mixed" in problem
