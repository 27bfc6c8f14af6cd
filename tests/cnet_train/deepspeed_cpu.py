"""Test-only: let Lightning's DeepSpeedStrategy run on DeepSpeed's CPU accelerator.

Importing this module (in a worker process, with DS_ACCELERATOR=cpu in its environment) bypasses
exactly these Lightning checks, none of which concerns what the tests exercise:

- `DeepSpeedStrategy.setup_environment` raises unless the accelerator is `CUDAAccelerator`;
  Lightning assumes DeepSpeed means CUDA, while DeepSpeed itself runs on its CPU accelerator
  (ZeRO partitioning, its optimizer wrappers, checkpointing) with gloo collectives.
- `_validate_device_index_selection` compares device indices with local ranks; CPU devices
  have no index (`None`), so it refuses every CPU device list.
- `DeepSpeedStrategy.root_device` is the CPU device without an index, and Lightning hands its
  index to `deepspeed.initialize` as `device_rank`, which DeepSpeed compares with 0. Here the
  root device carries the local rank as its index (`cpu:N`; a tensor moved there is on `cpu`).

Nothing under packages/ imports this; the packages run DeepSpeed as Lightning ships it.
"""

from __future__ import annotations

import os

import lightning.pytorch.strategies.deepspeed as lightning_deepspeed
import torch
from lightning.pytorch.strategies.ddp import DDPStrategy

if os.environ.get("DS_ACCELERATOR") != "cpu":
    raise RuntimeError("deepspeed_cpu needs DS_ACCELERATOR=cpu set before deepspeed is imported")


def _setup_environment_without_cuda_check(self: lightning_deepspeed.DeepSpeedStrategy) -> None:
    DDPStrategy.setup_environment(self)  # what DeepSpeedStrategy runs after its CUDA check


def _accept_cpu_devices(parallel_devices: object) -> None:
    return None


def _indexed_root_device(self: lightning_deepspeed.DeepSpeedStrategy) -> torch.device:
    return torch.device("cpu", self.local_rank)


lightning_deepspeed.DeepSpeedStrategy.root_device = property(_indexed_root_device)  # type: ignore[assignment,method-assign]
lightning_deepspeed.DeepSpeedStrategy.setup_environment = _setup_environment_without_cuda_check  # type: ignore[method-assign]
# DeepSpeedStrategy looks the function up in its module's namespace at call time.
vars(lightning_deepspeed)["_validate_device_index_selection"] = _accept_cpu_devices
