"""Loader workers persist across epochs, and still draw each epoch's own crops and flips."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils.data import DataLoader

from cnet_data.dataset import AugmentConfig
from cnet_train.config import TrainConfig
from cnet_train.data import ControlNetDataModule

MakeConfig = Callable[..., TrainConfig]
EPOCHS = 3


def _epochs(config: TrainConfig) -> tuple[list[list[torch.Tensor]], DataLoader[object]]:
    """The images of each epoch's batches, and the loader that gave them."""
    data = ControlNetDataModule(config)
    data.setup("fit")
    loader = data.train_dataloader()
    images = []
    for epoch in range(EPOCHS):
        data.set_epoch(epoch)
        images.append([batch["image"] for batch in loader])
    return images, loader


@pytest.mark.parametrize("workers", [1, 2])
def test_persistent_workers_draw_the_epoch_the_main_process_set(
    make_config: MakeConfig, workers: int
) -> None:
    flips = AugmentConfig(flip_probability=0.5)
    config = make_config("sd15", samples=8, data_batch_size=2, data_augment=flips)
    in_process, _ = _epochs(config)
    in_workers, loader = _epochs(
        make_config(
            "sd15", samples=8, data_batch_size=2, data_augment=flips, data_num_workers=workers
        )
    )
    assert loader.persistent_workers
    for epoch, (expected, got) in enumerate(zip(in_process, in_workers, strict=True)):
        assert len(expected) == len(got) > 0
        for a, b in zip(expected, got, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"epoch {epoch}")
    # The epochs differ from one another (the order, and the flips): a worker still drawing
    # epoch 0 would repeat it.
    assert not all(torch.equal(a, b) for a, b in zip(in_workers[0], in_workers[1], strict=True))


def test_no_workers_means_no_persistent_workers(make_config: MakeConfig) -> None:
    data = ControlNetDataModule(make_config("sd15"))
    data.setup("fit")
    assert not data.train_dataloader().persistent_workers
