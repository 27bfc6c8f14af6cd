"""Where each averaged parameter's values live when a strategy shards it, and how a shadow
shard becomes a full or global tensor again (FSDP2 / DTensor and DeepSpeed ZeRO-3 layouts)."""

from __future__ import annotations

import attrs
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, distribute_tensor

from cnet_models.gather import is_zero3_partitioned, local_part

__all__ = ["ShardLayout", "Zero3Layout", "layout_of", "to_host"]


@attrs.frozen
class ShardLayout:
    """How a sharded parameter's full tensor is spread over ranks (a DTensor's spec)."""

    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    def to_global(self, local: torch.Tensor) -> DTensor:
        """The DTensor whose local shard is `local` (moved to the mesh's device if needed)."""
        return DTensor.from_local(
            local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )

    def local_part(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's shard of `value`, a full tensor or a DTensor of the same global shape."""
        if isinstance(value, DTensor):
            if value.device_mesh == self.mesh and tuple(value.placements) == self.placements:
                return value.to_local()
            value = value.full_tensor()
        # src_data_rank=None: every rank holds the full tensor, so each slices locally, no traffic.
        on_mesh = value.to(self.mesh.device_type)
        return distribute_tensor(on_mesh, self.mesh, self.placements, src_data_rank=None).to_local()


@attrs.frozen
class Zero3Layout:
    """How a DeepSpeed ZeRO-3 parameter is spread: rank r holds the r-th equal slice of the
    flattened tensor, the last one padded."""

    shape: torch.Size
    numel: int
    device: torch.device
    """Where the partitions live (the collective's device: a CPU shadow moves there for it)."""
    group: dist.ProcessGroup | None

    def to_full(self, local: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's `local` partition (collective)."""
        on_device = local.to(self.device).contiguous()
        parts = [torch.empty_like(on_device) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, on_device, group=self.group)
        return torch.cat(parts)[: self.numel].view(self.shape).to(local.device)

    def local_part(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's partition of the full tensor `value`."""
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        size = -(-self.numel // world)
        flat = (value.full_tensor() if isinstance(value, DTensor) else value).reshape(-1)
        part = flat[rank * size : (rank + 1) * size]
        return torch.cat([part, part.new_zeros(size - part.numel())])


def layout_of(t: torch.Tensor) -> ShardLayout | Zero3Layout | None:
    if isinstance(t, DTensor):
        return ShardLayout(t.device_mesh, tuple(t.placements), t.shape, t.stride())
    if is_zero3_partitioned(t):
        shape = torch.Size(t.ds_shape)  # type: ignore[attr-defined]
        group = getattr(t, "ds_process_group", None)
        return Zero3Layout(shape, shape.numel(), local_part(t).device, group)
    return None


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` on the CPU. The copies are queued without blocking (into pinned memory) and then
    waited for once per device, rather than once per tensor."""
    out = [t.to("cpu", non_blocking=True) for t in tensors]
    for device in {t.device for t in tensors if t.device.type != "cpu"}:
        torch.accelerator.synchronize(device)
    return out
