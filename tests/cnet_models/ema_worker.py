"""One rank of the sharded-EMA test (run by test_ema.py, which also imports its helpers; pytest
does not collect it).

Usage: python ema_worker.py OUT_DIR, with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.
Each rank shards a tiny ControlNet with FSDP2 `fully_shard` over gloo, runs the EMA through the
same weight changes as the unsharded reference in the test, exports it (rank 0 writes
OUT_DIR/ema), checks resume from the sharded and from the full state, and rank 0 writes
OUT_DIR/report.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from cnet_models.ema import EMAConfig, ExponentialMovingAverage
from cnet_models.ema_export import export_ema_controlnet
from cnet_models.facade import ControlNetModel

CONFIG = EMAConfig(decay=0.9, power=0.75, every_n_steps=2)
STEPS = 7
FROZEN = "conv_in.weight"


def tiny_controlnet(seed: int = 0) -> ControlNetModel:
    """A ControlNet of 0.4M parameters with one frozen parameter (exported from the live model)."""
    torch.manual_seed(seed)
    model: ControlNetModel = ControlNetModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        conditioning_embedding_out_channels=(16, 32),
        in_channels=4,
    )
    model.get_parameter(FROZEN).requires_grad_(False)
    return model


@torch.no_grad()
def drift(model: nn.Module, step: int) -> None:
    """A stand-in for an optimiser step. Only multiply and add, so a shard and the full tensor
    get bitwise the same values whatever the vector width."""
    for param in model.parameters():
        if param.requires_grad:
            param.mul_(0.75).add_(step / 16)


def train(model: nn.Module, ema: ExponentialMovingAverage) -> None:
    for step in range(1, STEPS + 1):
        drift(model, step)
        ema.update(model, step)


def _same_shadow(a: ExponentialMovingAverage, b: ExponentialMovingAverage) -> None:
    for name, tensor in a.shadow().items():
        assert torch.equal(tensor, b.shadow()[name]), f"resumed shadow differs at {name}"


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    model = tiny_controlnet()
    for block in model.down_blocks:
        fully_shard(block)
    fully_shard(model)
    ema = ExponentialMovingAverage(model, CONFIG)
    train(model, ema)
    export_ema_controlnet(ema, model, out_dir / "ema")
    full = ema.full_state_dict()
    for state in (ema.state_dict(), full):
        resumed = ExponentialMovingAverage(model, CONFIG)
        resumed.load_state_dict(state)
        _same_shadow(ema, resumed)
    with ema.averaged(model):
        params = dict(model.named_parameters())
        for name, tensor in full["shadow"].items():  # type: ignore[attr-defined]
            param = params[name]
            assert isinstance(param, DTensor), name
            assert torch.equal(param.full_tensor(), tensor), f"copy_to differs at {name}"
    local = sum(t.numel() for t in ema.shadow().values())
    counts: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, local)
    if dist.get_rank() == 0:
        report = {"local_numels": counts, "sharded": ema.is_sharded()}
        (out_dir / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    # Results are on disk; skip interpreter teardown, where a gloo thread still being torn
    # down occasionally aborts the process ("terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
