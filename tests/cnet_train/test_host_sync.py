"""A training step off the logging steps reads no tensor value on the host.

On a GPU each such read (`.item()`, `.tolist()`, `float(t)`, `bool(t)`, `.cpu()`) makes the host
wait for the GPU. This CPU run counts the calls themselves: every reader of a tensor's value
is patched to note who called it, between the start of a non-logging step and the next.

Two kinds of read are host data on a GPU too, and left out: the step count of PyTorch's unfused
optimizers (a CPU tensor; on CUDA cnet's AdamW is fused and keeps it on the device, unread),
and what Lightning and the DataLoader do between epochs (the watched steps are inside one)."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from typing_extensions import override

from cnet_train.conditioning_config import ConditioningConfig
from cnet_train.config import CacheConfig, TrainConfig, ValidationConfig
from cnet_train.embed import embed_captions
from cnet_train.trainer import fit

MakeConfig = Callable[..., TrainConfig]
READERS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
EVERY = 4
STEPS = 8
SAMPLES = 24
"""Three buckets of 8, batches of 4: six steps an epoch."""
HOST_STATE = f"torch{os.sep}optim{os.sep}"
"""Where the unfused optimizers read their step count."""


class SyncWatch(L.Callback):
    """Counts value reads during the steps that end off a logging step, inside an epoch; the
    first step, which starts everything up, and the last are left out."""

    def __init__(self) -> None:
        self.counting = False
        self.watched_steps = 0
        self.reads: list[str] = []

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        after = trainer.global_step + 1
        inside_epoch = batch_idx < trainer.num_training_batches - 1
        logging = after % EVERY == 0
        self.counting = trainer.global_step > 0 and not logging and after < STEPS and inside_epoch
        self.watched_steps += self.counting

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counting = False


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> SyncWatch:
    watcher = SyncWatch()
    for name in READERS:
        original = getattr(torch.Tensor, name)

        def noted(
            self: torch.Tensor, *args: Any, _name: str = name, _f: Any = original, **kw: Any
        ) -> Any:
            caller = traceback.extract_stack(limit=2)[0].filename if watcher.counting else ""
            if watcher.counting and not self.is_meta and HOST_STATE not in caller:
                callers = traceback.extract_stack(limit=6)[:-1]
                where = " <- ".join(f"{c.filename}:{c.lineno}" for c in reversed(callers))
                watcher.reads.append(f"{_name} at {where}")
            return _f(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, noted)
    return watcher


@pytest.mark.parametrize("cached", [False, True], ids=["online", "cache"])
def test_no_value_is_read_off_the_logging_steps(
    make_config: MakeConfig, watch: SyncWatch, cached: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    sections: dict[str, Any] = {
        "steps": STEPS,
        "samples": SAMPLES,
        "trainer_log_every_n_steps": EVERY,
        "conditioning": ConditioningConfig(caption_dropout=0.5),  # some dropped, some kept
        "validation": ValidationConfig(),
    }
    config = make_config("sdxl", **sections)
    if cached:
        config = make_config("sdxl", **sections, cache=CacheConfig(config.run_dir / "cache"))
        embed_captions(config)
    fit(config, [watch])  # with the progress bar, which refreshes every step
    assert watch.watched_steps == 4  # the steps that end at 2, 3, 5 and 7
    assert not watch.reads, sorted(set(watch.reads))[:20]
