"""One rank of the two-process DDP test (run by test_distributed.py, not collected by pytest).

Usage: python ddp_worker.py CONFIG_YAML OUT_DIR, with torchrun's environment variables set.
Trains the demo config under DDP on CPU (gloo) and writes what this rank did to
OUT_DIR/rank-N.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
from typing_extensions import override

from cnet_train.callbacks.base import AfterBatch
from cnet_train.config_io import load_config
from cnet_train.trainer import fit


class CountBatches(AfterBatch):
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        self.batches.append([int(i) for i in batch["bucket"].tolist()])


def main(config_path: Path, out: Path) -> None:
    config = load_config(config_path, ["trainer.strategy=ddp", "trainer.devices=2"])
    counter = CountBatches()
    trainer, _ = fit(config, enable_progress_bar=False, callbacks_extra=[counter])
    result = {"rank": trainer.global_rank, "step": trainer.global_step, "batches": counter.batches}
    (out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
