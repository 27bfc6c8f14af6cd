"""Lightning strategies from `trainer.strategy`, with what each needs to train a ControlNet.

- `ddp`: Lightning's DDP; only the ControlNet is a registered parameter, so only it is reduced.
- `fsdp`: FSDP2 (`fully_shard`, applied by `ControlNetModule.configure_model`) through Lightning's
  `ModelParallelStrategy`, as pure data parallelism over every rank of every node.
- `deepspeed`: ZeRO stage 2 or 3, derived from the config (no JSON to keep in sync). DeepSpeed is
  handed float32 weights: cnet autocasts the trainable forward itself, as under every other
  strategy, so the ControlNet, its EMA and its exports stay float32 and the frozen parts (outside
  the module tree) keep their own dtype.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from typing_extensions import override

from cnet_train.config import TrainerConfig

_LIGHTNING_PRECISION = {"32": "32-true", "bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed"}


class DataParallelFSDP2(ModelParallelStrategy):
    """`ModelParallelStrategy` with one data-parallel dimension over all ranks.

    Lightning's "auto" sizes mean data-parallel over nodes and tensor-parallel over the devices
    of a node; a fixed `tensor_parallel_size=1` with "auto" data-parallel size fails on any node
    with more than one device ("sizes ... should equal the world size"). The world size is only
    known once the devices are resolved, so the mesh is sized here.
    """

    def __init__(self) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1)

    @override
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


class ZeroCheckpointsWithoutDuplicateWeights(DeepSpeedStrategy):
    """DeepSpeed whose ZeRO-1/2 checkpoints do not store the weights twice.

    Under ZeRO-1/2 DeepSpeed's checkpoint holds the whole module (every rank's weights) and,
    in the optimizer shards, the float32 master of the same weights. cnet trains float32
    weights, so the two are equal: the module copy is left out (a fifth less on disk: ControlNet
    + Adam's moments + master + EMA instead of one more ControlNet), and at load the weights
    are rebuilt from the restored master partitions (`update_lp_params`, DeepSpeed's own copy
    from master to weights, all-gathered). Under ZeRO-3 the module file holds only placeholders
    and nothing changes.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if self.zero_stage_3:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        engine = self.deepspeed_engine
        engine.module_state_dict = _no_module_weights  # shadows the method for this save
        try:
            super().save_checkpoint(checkpoint, filepath, storage_options)
        finally:
            del engine.module_state_dict

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        if self.zero_stage_3:
            return super().load_checkpoint(checkpoint_path, weights_only)
        module = self.lightning_module
        assert module is not None
        # The module part is empty by design, so DeepSpeed's strict loading would refuse every
        # key; it is off for that part only. The weights' names are still checked strictly,
        # against the names the checkpoint records (`cnet_train.resume_check`), when the
        # module's `on_load_checkpoint` runs, before training.
        strict, module.strict_loading = module.strict_loading, False
        try:
            state = super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            module.strict_loading = strict
        self.deepspeed_engine.optimizer.update_lp_params()
        return state


def _no_module_weights(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {}


def build_strategy(config: TrainerConfig) -> Any:
    """Lightning's strategy (or "auto") for `trainer.strategy`."""
    if config.strategy == "auto":
        return "auto"
    if config.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(gradient_as_bucket_view=True)
    if config.strategy == "deepspeed":
        return ZeroCheckpointsWithoutDuplicateWeights(
            stage=config.deepspeed_stage,
            offload_optimizer=config.offload_optimizer,
            logging_batch_size_per_gpu=1,
        )
    return DataParallelFSDP2()


def lightning_precision(config: TrainerConfig) -> str:
    """The precision Lightning runs with. Under DeepSpeed "32-true": DeepSpeed's own bf16 mode
    casts the whole module and keeps the float32 master in its optimizer; cnet's autocast keeps
    the weights float32 instead (bf16 needs no loss scaling, and 16-mixed is refused there)."""
    if config.precision == "auto":
        raise ValueError("trainer.precision is auto: settle it first (cnet_train.precision_auto)")
    if config.strategy == "deepspeed":
        return "32-true"
    return _LIGHTNING_PRECISION[config.precision]
