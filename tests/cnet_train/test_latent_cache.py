"""The latent cache (`cnet-train encode`): training from it equals training with the VAE in the
step, bit for bit, when the augmentation is fixed; variants repeat with their epochs; a cache
built for another VAE input (augmentation, seed, buckets) is refused before training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import lightning as L
import pytest
import torch
from typing_extensions import override

from cnet_data.buckets import BucketSettings
from cnet_data.dataset import AugmentConfig
from cnet_data.embcache import EmbeddingCache
from cnet_models.facade import AutoencoderKL
from cnet_train.cli import main
from cnet_train.config import LatentCacheConfig, TrainConfig, ValidationConfig
from cnet_train.config_io import dump_config
from cnet_train.encode import encode_latents
from cnet_train.latent_cache import LatentCacheError
from cnet_train.trainer import fit

MakeConfig = Callable[..., TrainConfig]
QUIET: dict[str, Any] = {"enable_progress_bar": False}
FIXED = AugmentConfig(random_crop=False)


def _with_latents(config: TrainConfig, path: Path, batch_size: int = 1) -> TrainConfig:
    return attrs.evolve(config, latents=LatentCacheConfig(path=path, batch_size=batch_size))


def _count_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    encode = AutoencoderKL.encode

    def counted(self: AutoencoderKL, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counted)
    return calls


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_training_from_the_cache_equals_encoding_in_the_step_bitwise(
    family: str, make_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches of 1, encoded at 1: the VAE rounds alike (other batch sizes differ by ~1e-6).
    base = make_config(
        family,
        steps=5,
        samples=6,
        data_batch_size=1,
        data_augment=FIXED,
        validation=ValidationConfig(),
    )
    online = attrs.evolve(base, run_dir=tmp_path / "online")
    cached = _with_latents(attrs.evolve(base, run_dir=tmp_path / "cached"), tmp_path / "latents")
    assert encode_latents(cached) == 6  # one fixed variant of each sample

    _, straight = fit(online, **QUIET)
    encodes = _count_encodes(monkeypatch)
    trainer, from_cache = fit(cached, **QUIET)
    assert trainer.global_step == 5
    assert encodes == []  # the VAE never ran in the cached run's steps
    for name, weight in straight.controlnet.state_dict().items():
        assert torch.equal(weight, from_cache.controlnet.state_dict()[name]), name


def test_encode_is_resumable_and_the_cli_reports_what_it_added(
    make_config: MakeConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _with_latents(make_config("sd15", data_augment=FIXED), tmp_path / "latents", 4)
    # The text cache is not built yet: encode does not need it (nor embed the latents).
    config = attrs.evolve(config, cache=attrs.evolve(config.cache, path=tmp_path / "text"))
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    assert main(["encode", str(path)]) == 0
    assert "12 latents added" in capsys.readouterr().out
    assert main(["encode", str(path)]) == 0
    assert "0 latents added" in capsys.readouterr().out
    folders = sorted(p.name for p in (tmp_path / "latents").iterdir())
    assert len(folders) == 3 and all(name.startswith("bucket-") for name in folders)


def test_variants_are_cached_and_each_epoch_trains_on_its_own(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    augment = AugmentConfig(random_crop=True, flip_probability=0.5, variants=2)
    config = make_config("sd15", steps=9, data_augment=augment, validation=ValidationConfig())
    config = _with_latents(config, tmp_path / "latents", 4)
    assert encode_latents(config) == 24  # 12 samples x 2 variants
    seen: set[tuple[int, int]] = set()

    class Variants(L.Callback):
        @override
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, *_: Any) -> None:
            seen.update((trainer.current_epoch, int(v)) for v in batch["variant"])

    trainer, _ = fit(config, callbacks_extra=[Variants()], **QUIET)
    assert trainer.global_step == 9  # 3 epochs of 3 steps: variants 0, 1, then 0 again
    assert seen == {(0, 0), (1, 1), (2, 0)}


def test_a_cache_for_a_random_augmentation_without_variants_is_refused(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    config = make_config("sd15", data_augment=AugmentConfig(random_crop=True))
    with pytest.raises(ValueError, match=r"data\.augment\.variants"):
        _with_latents(config, tmp_path / "latents")


def test_a_cache_built_for_other_inputs_is_refused_before_training(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    config = _with_latents(
        make_config("sd15", data_augment=FIXED, validation=ValidationConfig()),
        tmp_path / "latents",
        4,
    )
    encode_latents(config)
    # A fixed augmentation draws nothing: another seed reuses the cache, another resize not.
    bicubic = attrs.evolve(FIXED, resample="bicubic")
    resized = attrs.evolve(
        config, run_dir=tmp_path / "resample", data=attrs.evolve(config.data, augment=bicubic)
    )
    with pytest.raises(LatentCacheError, match="augment"):
        fit(resized, **QUIET)
    other_seed = attrs.evolve(config, seed=1, run_dir=tmp_path / "seed")
    assert fit(other_seed, **QUIET)[0].global_step == config.trainer.max_steps
    smaller = attrs.evolve(
        config,
        run_dir=tmp_path / "buckets",
        data=attrs.evolve(
            config.data, buckets=BucketSettings(area=48 * 48, min_side=32, max_side=96, step=16)
        ),
    )
    with pytest.raises(LatentCacheError, match="cnet-train encode"):
        fit(smaller, **QUIET)


def test_a_batch_the_cache_lacks_is_encoded_in_the_step(
    make_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config("sd15", steps=3, data_augment=FIXED, validation=ValidationConfig())
    config = _with_latents(config, tmp_path / "latents", 4)
    encode_latents(config)
    get_many = EmbeddingCache.get_many
    calls: list[int] = []

    def first_missing(self: EmbeddingCache, keys: Any) -> dict[str, torch.Tensor]:
        calls.append(1)
        if len(calls) == 1:  # as if that sample had failed to decode at encode time
            raise KeyError(f"{keys[0]} is not in the cache")
        return get_many(self, keys)

    monkeypatch.setattr(EmbeddingCache, "get_many", first_missing)
    encodes = _count_encodes(monkeypatch)
    trainer, _ = fit(config, **QUIET)
    assert trainer.global_step == 3
    assert len(calls) == 3 and len(encodes) == 1  # only the batch it lacked met the VAE
