"""`conditioning:` holds caption dropout and the residual scale; a config with their old keys
fails at load with a message that names the new ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnet_train.conditioning_config import MOVED_KEYS, ConditioningConfig
from cnet_train.config_io import ConfigError, load_config

MINIMAL = "run_dir: r\nmodel: {source: m}\ndata: {source: {path: d.jsonl}}\n"


def _load(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "old.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value


def test_the_old_keys_name_their_new_place(tmp_path: Path) -> None:
    text = (
        "run_dir: r\nmodel: {source: m}\n"
        "data: {source: {path: d.jsonl}, caption_dropout: 0.1, caption_dropout_embedding: zeros}\n"
        "loss: {conditioning_scale: 0.5}\n"
    )
    error = _load(tmp_path, text)
    assert set(error.problems) == {
        "data.caption_dropout moved to conditioning.caption_dropout (same meaning and values)",
        "data.caption_dropout_embedding moved to conditioning.caption_dropout_embedding "
        "(same meaning and values)",
        "loss.conditioning_scale moved to conditioning.scale (same meaning and values)",
    }
    assert "moved to conditioning.caption_dropout" in str(error)


def test_other_unknown_keys_keep_their_hint(tmp_path: Path) -> None:
    (problem,) = _load(tmp_path, MINIMAL + "conditioning: {scal: 0.5}\n").problems
    assert problem == "conditioning.scal: unknown key (did you mean scale?)"


def test_the_new_section_loads(tmp_path: Path) -> None:
    path = tmp_path / "new.yaml"
    path.write_text(
        MINIMAL + "conditioning: {caption_dropout: 0.2, caption_dropout_embedding: zeros, "
        "scale: 0.75}\n",
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.conditioning == ConditioningConfig(0.2, "zeros", 0.75)
    assert not hasattr(config.data, "caption_dropout") and not hasattr(config.loss, "scale")
    assert set(MOVED_KEYS.values()) == {
        f"conditioning.{name}" for name in ("caption_dropout", "caption_dropout_embedding", "scale")
    }


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_caption_dropout_is_a_probability(value: float) -> None:
    with pytest.raises(ValueError, match=r"caption_dropout must be in \[0, 1\]"):
        ConditioningConfig(caption_dropout=value)


def test_an_override_of_an_old_key_names_its_new_place(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides=["data.caption_dropout=0.2"])
    assert "data.caption_dropout moved to conditioning.caption_dropout" in str(caught.value)
