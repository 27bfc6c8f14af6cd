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
controlnet:
  pretrained: lllyasviel/sd-controlnet-canny
  conditioning_channels: 1
  conditioning_embedding_out_channels: [16, 32, 96, 256]
  gradient_checkpointing: true
  unet_gradient_checkpointing: true
cache: {path: runs/full/cache, batch_size: 16}
optimizer: {name: adamw8bit, lr: 2e-5, betas: [0.8, 0.99], weight_decay: 0.0, eps: 1.0e-6}
schedule: {name: cosine_with_restarts, warmup_steps: 100, num_cycles: 3}
loss: {min_snr_gamma: 5.0, noise_offset: 0.05}
conditioning: {caption_dropout: 0.1, caption_dropout_embedding: zeros, scale: 0.5}
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
    # Relative paths are relative to the file's folder; hub ids stay as written.
    assert config.validation.images == (tmp_path / "val/car.png", tmp_path / "val/cat.png")
    assert config.data.index == tmp_path / "runs/full/index"
    assert config.model.source == "stabilityai/stable-diffusion-xl-base-1.0"
    assert config.model.vae == "madebyollin/sdxl-vae-fp16-fix"
    assert config.validation.prompts == ("a red car", "a cat: sitting")
    assert config.trainer.devices == 8 and config.trainer.gradient_clip_val is None
    assert config.checkpoint.resume == "none"
    assert config.conditioning.caption_dropout == 0.1 and config.conditioning.scale == 0.5
    assert config.schedule.name == "cosine_with_restarts" and config.schedule.num_cycles == 3

    again = load_config(_write(tmp_path, dump_config(config), "dumped.yaml"))
    assert again == config


def test_config_to_dict_is_plain_yaml_data_in_schema_order(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, FULL))
    data = config_to_dict(config)
    # safe_dump refuses Path and tuple objects: this passing means only plain types remain.
    yaml.safe_dump(data)
    assert data["run_dir"] == str(tmp_path / "runs/full")
    assert data["optimizer"]["betas"] == [0.8, 0.99]
    assert data["validation"]["images"] == [
        str(tmp_path / "val/car.png"),
        str(tmp_path / "val/cat.png"),
    ]
    schema_order = [a.name for a in attrs.fields(TrainConfig)]
    assert list(data) == schema_order
    top_level = [line.split(":")[0] for line in dump_config(config).splitlines() if line[0] != " "]
    assert top_level == schema_order
    assert config_from_dict(data) == config


def test_minimal_config_gets_the_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL))
    assert config == TrainConfig(
        run_dir=tmp_path / "runs/minimal",
        model=BaseModelConfig(source="models/sd15"),
        data=DataConfig(source=SourceConfig(path=tmp_path / "data/train.jsonl")),
    )
    assert config.data.scan.on_bad == "skip"
    # Without a file nothing is resolved: the paths stay as written.
    in_memory = config_from_dict(yaml.safe_load(MINIMAL))
    assert in_memory.run_dir == Path("runs/minimal")


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
    data["validation"] = {
        "prompts": ["café au lait", "line\x85break", "\u2028"],
        "images": ["a.png", "b.png", "c.png"],
    }
    config = config_from_dict(data)
    text = dump_config(config)
    assert config_from_dict(yaml.safe_load(text)) == config
    plain = config_from_dict(
        yaml.safe_load(MINIMAL), ["validation.prompts=[café]", "validation.images=[c.png]"]
    )
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
            "validation.images=[a.png, /abs/b.png, ~/c.png]",
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
    # Paths given on the command line are relative to the current directory, not the file.
    assert config.validation.images == (
        Path.cwd() / "a.png",
        Path("/abs/b.png"),
        Path.home() / "c.png",
    )
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
            {"trainer": {"strategy": "ddpx", "precision": 16}, "model": {"family": "sd3"}}
        )
    )
    assert "trainer.strategy: 'ddpx' is not one of auto, ddp, deepspeed, fsdp" in problems
    assert "model.family: 'sd3' is not one of sd15, sd21, sdxl" in problems
    assert "trainer.precision: 16 is not one of auto, 32, bf16-mixed, 16-mixed" in problems


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
                "data": {"batch_size": 0, "buckets": {"step": 0}},
                "conditioning": {"caption_dropout": 1.5},
                "ema": {"config": {"decay": 2.0, "update_after_step": -1}},
                "checkpoint": {"keep_last": 0},
            }
        )
    )
    assert "data.batch_size: must be at least 1, got 0" in problems
    assert "conditioning.caption_dropout: must be in [0, 1], got 1.5" in problems
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
    # Paths given as overrides are made absolute against the current directory.
    if isinstance(value, list):
        return tuple(Path.cwd() / v for v in value)
    return None if value is None else Path.cwd() / str(value)


def _resume(value: str) -> str | Path:
    return value if value in ("auto", "none") else Path.cwd() / value


_PATH_TEXT = st.text("abc_-./", min_size=1, max_size=12)
_FLOAT = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
_POSITIVE = st.floats(0, 1e6, exclude_min=True, allow_nan=False, allow_infinity=False)
# Hub ids (`org/name`) stay as written; nothing of such a name exists in the current directory.
_HUB_ID = st.from_regex(r"[a-z]{1,8}/[a-z]{1,6}-[0-9]", fullmatch=True)
_EXPONENT_TEXT = st.builds(lambda m, e: f"{m}e-{e}", st.integers(1, 9), st.integers(1, 12))

# key -> (strategy of the YAML value, what the config then holds)
_VALID: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], object]]] = {
    "seed": (st.integers(0, 2**32 - 1), _plain),
    "model.family": (st.sampled_from([None, "sd15", "sd21", "sdxl"]), _plain),
    "model.vae": (st.none() | _HUB_ID, _plain),
    "data.index": (st.none() | _PATH_TEXT, _paths),
    "data.batch_size": (st.integers(1, 1024), _plain),
    "conditioning.caption_dropout": (st.floats(0, 1), _plain),
    "data.augment.flip_probability": (st.floats(0, 1), _plain),
    "controlnet.conditioning_embedding_out_channels": (
        st.none() | st.lists(st.integers(1, 512), min_size=1, max_size=4),
        lambda v: None if v is None else tuple(v),
    ),
    "controlnet.conditioning_embedding_init": (st.sampled_from(["default", "he"]), _plain),
    "optimizer.lr": (_EXPONENT_TEXT, float),
    "optimizer.betas": (
        st.lists(st.floats(0, 1, exclude_max=True), min_size=2, max_size=2),
        _plain,
    ),
    "loss.min_snr_gamma": (st.none() | _POSITIVE, _plain),
    "loss.noise_offset": (_FLOAT, _plain),
    "ema.enabled": (st.booleans(), _plain),
    "ema.config.every_n_steps": (st.integers(1, 100), _plain),
    # validation.images is drawn with the prompts, to the same length (they are paired).
    "validation.prompts": (st.lists(st.text(max_size=30), max_size=3), _plain),
    # A path has a / (or a suffix): a bare word is refused as a misspelt choice.
    "checkpoint.resume": (
        st.sampled_from(["auto", "none"]) | _PATH_TEXT.map("./".__add__),
        _resume,
    ),
    "trainer.precision": (st.sampled_from(["auto", "32", "bf16-mixed", "16-mixed"]), _plain),
    "trainer.strategy": (st.sampled_from(["auto", "ddp", "deepspeed", "fsdp"]), _plain),
    "trainer.devices": (st.integers(1, 64) | st.just("auto"), _plain),
    "trainer.gradient_clip_val": (st.none() | _POSITIVE, _plain),
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
@given(
    st.fixed_dictionaries({}, optional={k: strategy for k, (strategy, _) in _VALID.items()}),
    st.lists(_PATH_TEXT, min_size=3, max_size=3),
)
def test_valid_overrides_round_trip_through_dump_and_load(
    chosen: dict[str, Any], images: list[str]
) -> None:
    pair = (chosen.get("trainer.strategy"), chosen.get("trainer.precision"))
    # The refused pairs, tested on their own.
    assume(pair not in {("deepspeed", "16-mixed"), ("fsdp", "16-mixed")})
    if "validation.prompts" in chosen:
        chosen["validation.images"] = images[: len(chosen["validation.prompts"])]
    overrides = [_as_override(key, value) for key, value in chosen.items()]
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        config = config_from_dict(yaml.safe_load(MINIMAL), overrides, base_dir=base)
        assert config.run_dir == base / "runs/minimal"  # from the file: against its folder
        for key, value in chosen.items():
            expect = _paths if key == "validation.images" else _VALID[key][1]
            assert _dotted(config, key) == expect(value), key
        # Every path is absolute now: the written config means the same wherever it is read.
        written = write_resolved_config(config, base / "elsewhere")
        assert load_config(written) == config


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp"])
def test_deepspeed_and_fsdp_refuse_16_mixed(strategy: str) -> None:
    (problem,) = _problems(
        _minimal_with({"trainer": {"strategy": strategy, "precision": "16-mixed"}})
    )
    assert f"16-mixed is not available with trainer.strategy {strategy}" in problem
    assert "use bf16-mixed (or 32), or strategy ddp for 16-mixed" in problem


# --- values: finite and in range, every problem named by its key


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"optimizer": {"lr": 0}}, "optimizer.lr"),
        ({"optimizer": {"lr": "1e400"}}, "optimizer.lr"),  # reads as infinity
        ({"optimizer": {"eps": 0}}, "optimizer.eps"),
        ({"optimizer": {"weight_decay": float("nan")}}, "optimizer.weight_decay"),
        ({"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas"),
        ({"loss": {"noise_offset": float("inf")}}, "loss.noise_offset"),
        ({"loss": {"min_snr_gamma": -5.0}}, "loss.min_snr_gamma"),
        ({"conditioning": {"scale": float("-inf")}}, "conditioning.scale"),
        ({"conditioning": {"caption_dropout": float("nan")}}, "conditioning.caption_dropout"),
        ({"schedule": {"power": 0}}, "schedule.power"),
        ({"schedule": {"num_cycles": 0}}, "schedule.num_cycles"),
        ({"validation": {"guidance_scale": float("nan")}}, "validation.guidance_scale"),
        ({"validation": {"resolution": 500}}, "validation.resolution"),
        ({"validation": {"seed": -2}}, "validation.seed"),
        ({"trainer": {"gradient_clip_val": 0}}, "trainer.gradient_clip_val"),
        ({"trainer": {"devices": 0}}, "trainer.devices"),
        ({"checkpoint": {"resume": ""}}, "checkpoint.resume"),
        ({"model": {"source": ""}}, "model.source"),
        ({"model": {"vae": ""}}, "model.vae"),
        ({"controlnet": {"conditioning_channels": 0}}, "controlnet.conditioning_channels"),
        (
            {"controlnet": {"conditioning_embedding_out_channels": []}},
            "controlnet.conditioning_embedding_out_channels",
        ),
        (
            {"controlnet": {"conditioning_embedding_out_channels": [16, 0]}},
            "controlnet.conditioning_embedding_out_channels",
        ),
        # Fields of the cnet-data and cnet-models classes, checked from here.
        ({"ema": {"config": {"inv_gamma": float("nan")}}}, "ema.config.inv_gamma"),
        ({"ema": {"config": {"power": float("inf")}}}, "ema.config.power"),
        ({"data": {"scan": {"max_pixels": 0}}}, "data.scan.max_pixels"),
        ({"data": {"scan": {"workers": -1}}}, "data.scan.workers"),
        ({"data": {"augment": {"max_pixels": 0}}}, "data.augment.max_pixels"),
        ({"data": {"source": {"path": "x", "image_dir": "../up"}}}, "data.source.image_dir"),
        ({"data": {"source": {"path": "x", "caption_key": ""}}}, "data.source.caption_key"),
    ],
)
def test_values_out_of_range_are_refused_by_key(section: dict[str, Any], key: str) -> None:
    (problem,) = _problems(_minimal_with(section))
    assert problem.startswith(f"{key}: "), problem


def test_betas_name_every_bad_item() -> None:
    (problem,) = _problems(_minimal_with({"optimizer": {"betas": [2, -1]}}))
    assert problem == "optimizer.betas: each must be in [0, 1): item 0 is 2.0, item 1 is -1.0"


def test_the_edges_of_the_ranges_are_accepted() -> None:
    config = config_from_dict(
        _minimal_with(
            {
                "seed": 2**32 - 1,
                "optimizer": {"betas": [0.0, 0.999], "weight_decay": 0},
                "loss": {"noise_offset": 0},
                "conditioning": {"scale": -1.0},
                "trainer": {"devices": 1},
                "validation": {"resolution": 8, "seed": 0},
            }
        )
    )
    assert config.seed == 2**32 - 1 and config.optimizer.betas == (0.0, 0.999)


def test_prompts_and_images_must_pair_up() -> None:
    (problem,) = _problems(_minimal_with({"validation": {"prompts": ["a", "b"], "images": ["x"]}}))
    assert problem == (
        "validation: validation.prompts has 2 entries but validation.images has 1; "
        "they are paired by position"
    )


def test_config_error_is_a_cnet_error_with_exit_code_2() -> None:
    from cnet_data.errors import CnetError, describe

    with pytest.raises(ConfigError) as caught:
        config_from_dict(_minimal_with({"seed": -1}))
    # A CnetError for the console script, a ValueError for callers that catch bad input.
    assert isinstance(caught.value, CnetError)
    assert ValueError in type(caught.value).__mro__
    message, hint, code = describe(caught.value)
    assert code == 2 and "seed" in message and "cnet-train config" in hint


# --- the YAML reader: bounded, no duplicate keys


def _file_problem(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    (problem,) = caught.value.problems
    return problem


def test_deep_nesting_is_refused_with_its_key(tmp_path: Path) -> None:
    problem = _file_problem(tmp_path, MINIMAL + "seed: " + "[" * 5000 + "]" * 5000 + "\n")
    assert problem.startswith("seed[0][0]") and "nested deeper than 64 levels" in problem
    problem = _file_problem(tmp_path, MINIMAL + "loss: " + "{a: " * 3000 + "1" + "}" * 3000)
    assert problem.startswith("loss.a.a") and "nested deeper than 64 levels" in problem


def test_alias_expansion_is_bounded(tmp_path: Path) -> None:
    lines = ["lol:", "  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"  {name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    problem = _file_problem(tmp_path, MINIMAL + "\n".join(lines) + "\n")
    assert problem.startswith("lol.") and "expands to more than 100000 values" in problem
    recursive = _file_problem(tmp_path, MINIMAL + "validation: {prompts: &p [a, *p]}\n")
    assert recursive.startswith("validation.prompts[1]: ") and "recursive alias" in recursive


def test_a_few_aliases_and_merge_keys_still_load(tmp_path: Path) -> None:
    text = MINIMAL + (
        "validation: {prompts: &p [a red car], images: [car.png]}\n"
        "export: &every {every_n_steps: 100, keep_last: 2}\n"
        "checkpoint:\n  <<: *every\n  every_n_steps: 50\n"
    )
    config = load_config(_write(tmp_path, text))
    assert config.checkpoint.every_n_steps == 50 and config.checkpoint.keep_last == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optimizer:\n  lr: 1\n  lr: 2\n", "optimizer.lr: key given twice (line 8 and line 9)"),
        ("optimizer: {lr: 1, lr: 2}\n", "optimizer.lr: key given twice (line 7 and line 7)"),
        ("run_dir: again\n", "run_dir: key given twice (line 1 and line 7)"),
    ],
)
def test_a_key_given_twice_is_refused_with_its_lines(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert _file_problem(tmp_path, MINIMAL + text).startswith(expected)


def test_override_values_are_bounded_too() -> None:
    (problem,) = _problems(_minimal_with({}), ["seed=" + "[" * 200 + "]" * 200])
    assert problem.startswith("seed: value ") and "nested deeper than 64 levels" in problem


def test_cycles_in_memory_are_a_config_error() -> None:
    data = _minimal_with({})
    data["loss"] = {}
    data["loss"]["self"] = data["loss"]
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        config_from_dict(data)


# --- relative paths: against the file's folder, or the current directory for --set


def test_relative_paths_resolve_against_the_file_and_overrides_against_the_cwd(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "models" / "sd15").mkdir(parents=True)
    (folder / "org" / "vae").mkdir(parents=True)  # an `org/name` that exists: a folder
    text = (
        "run_dir: runs/minimal\n"
        "model: {source: ./models/sd15, vae: org/vae}\n"
        "data: {source: {path: data/train.jsonl}}\n"
        "controlnet: {pretrained: lllyasviel/sd-controlnet-canny}\n"
        "cache: {path: ~/cache}\n"
        "checkpoint: {resume: ckpt/last.ckpt}\n"
    )
    config = load_config(_write(folder, text), ["data.index=idx"])
    assert config.run_dir == folder / "runs/minimal"
    assert config.data.source.path == folder / "data/train.jsonl"
    assert config.model.source == str(folder / "models/sd15")
    assert config.model.vae == str(folder / "org/vae")
    assert config.controlnet.pretrained == "lllyasviel/sd-controlnet-canny"  # a hub id
    assert config.cache.path == Path.home() / "cache"
    assert config.checkpoint.resume == folder / "ckpt/last.ckpt"
    assert config.data.index == Path.cwd() / "idx"  # from --set
    # `models/sd15` next to the file is that folder; where there is none, it is a hub id.
    assert load_config(_write(folder, MINIMAL)).model.source == str(folder / "models/sd15")
    elsewhere = load_config(_write(tmp_path, MINIMAL))
    assert elsewhere.model.source == "models/sd15" and elsewhere.checkpoint.resume == "auto"
