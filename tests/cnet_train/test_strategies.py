"""Every strategy end to end on CPU, two processes over gloo: ddp, fsdp (FSDP2), DeepSpeed
ZeRO-2 and ZeRO-3 (on DeepSpeed's CPU accelerator, through the test-only `deepspeed_cpu` shim).

Each case trains the tiny model with EMA on, a checkpoint at step 3 and validation at the last
step (5) over three prompts, which two ranks cannot split evenly. It runs three times: straight
through; killed with SIGKILL after the step-3 checkpoint; relaunched with `resume: auto`. The
resumed run must take exactly steps 4 and 5 on both ranks and end bitwise where the straight run
ended (ControlNet and EMA exports); its exports load in the family's diffusers pipeline; the
checkpoint holds nothing frozen and is no larger than what resume needs; `cnet-train export`
reads it.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs
import pytest
import torch
from safetensors.torch import load_file

from cnet_train.config import CheckpointConfig, StrategyName, TrainConfig
from cnet_train.config_io import dump_config
from cnet_train.demo import demo_config
from cnet_train.export import export_checkpoint

WORKER = Path(__file__).with_name("strategy_worker.py")
STEPS, CHECKPOINT_AT = 5, 3
FROZEN = re.compile(r"(^|[./])(unet|vae|text_encoders?(_2)?)\.")
"""A key naming a frozen part: nothing frozen may reach a checkpoint."""
CONTAINER_BYTES_PER_TENSOR = 4096
"""What a checkpoint format adds per stored tensor (a distributed checkpoint serializes each
tensor as its own small archive): about 2.5 KiB measured, noise at real sizes, not for a tiny
model."""

CASES: dict[str, tuple[StrategyName, Literal[2, 3], str]] = {
    "ddp-sd15": ("ddp", 2, "sd15"),
    "fsdp-sd15": ("fsdp", 2, "sd15"),
    "deepspeed2-sd15": ("deepspeed", 2, "sd15"),
    "deepspeed3-sd15": ("deepspeed", 3, "sd15"),
    "ddp-sdxl": ("ddp", 2, "sdxl"),
    "deepspeed2-sdxl": ("deepspeed", 2, "sdxl"),
}


class RunRanks(Protocol):
    def __call__(
        self,
        argv: list[str],
        world: int,
        timeout: float = ...,
        env: dict[str, str] | None = ...,
        succeed: bool = ...,
    ) -> list[str]: ...


def _config(
    root: Path,
    strategy: StrategyName,
    stage: Literal[2, 3],
    family: str,
    accelerator: Literal["cpu", "gpu"],
) -> TrainConfig:
    config = demo_config(root / "demo", family, steps=STEPS, samples=24)  # type: ignore[arg-type]
    validation = config.validation
    return attrs.evolve(
        config,
        data=attrs.evolve(config.data, batch_size=2),
        checkpoint=CheckpointConfig(every_n_steps=CHECKPOINT_AT, keep_last=3, resume="auto"),
        validation=attrs.evolve(
            validation,
            every_n_steps=STEPS,  # validation at the last step, then none again at the end
            prompts=validation.prompts[:3],
            images=validation.images[:3],
        ),
        trainer=attrs.evolve(
            config.trainer,
            strategy=strategy,
            deepspeed_stage=stage,
            accelerator=accelerator,
            devices=2,
            precision="bf16-mixed",
        ),
    )


def _launch(
    run_ranks: RunRanks, config: TrainConfig, out: Path, kill_at: int | None = None
) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.yaml"
    path.write_text(dump_config(config))
    argv = [str(WORKER), str(path), str(out), *([] if kill_at is None else [str(kill_at)])]
    on_cpu = config.trainer.accelerator == "cpu"
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"} if on_cpu else {}
    run_ranks(argv, 2, timeout=300, env=env, succeed=kill_at is None)
    if kill_at is not None:
        return []
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def _weights(export: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        kind: load_file(export / kind / "diffusion_pytorch_model.safetensors")
        for kind in ("controlnet", "controlnet_ema")
    }


def _tensors(obj: object, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{path}.{i}")


def checkpoint_tensor_keys(checkpoint: Path) -> list[str]:
    """Every stored tensor's key path, whatever the strategy's checkpoint layout."""
    if checkpoint.is_file():  # Lightning's file (single device, DDP)
        return [k for k, _ in _tensors(torch.load(checkpoint, weights_only=True))]
    if (checkpoint / "meta.pt").is_file():  # a distributed checkpoint (FSDP2)
        from torch.distributed.checkpoint.filesystem import FileSystemReader

        stored = list(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
        meta = torch.load(checkpoint / "meta.pt", weights_only=True)
        return stored + [f"meta.{k}" for k, _ in _tensors(meta)]
    # A DeepSpeed folder: model states (module, client state) and optimizer shards, which
    # pickle three DeepSpeed classes beside the tensors.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    keys = []
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        for file in sorted((checkpoint / "checkpoint").glob("*.pt")):
            state = torch.load(file, weights_only=True)
            keys += [f"{file.stem}.{k}" for k, _ in _tensors(state)]
    return keys


def _bytes_on_disk(checkpoint: Path) -> int:
    if checkpoint.is_file():
        return checkpoint.stat().st_size
    return sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())


def _by_prefix(keys: list[str]) -> dict[str, int]:
    def prefix(key: str) -> str:
        if "cnet.ema" in key:
            return "ema"
        if "optim" in key:
            return "optimizer"
        return "controlnet" if "controlnet." in key else "other"

    return dict(Counter(prefix(k) for k in keys))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_strategy_end_to_end(
    case: str, tmp_path: Path, run_ranks: RunRanks, render_with_controlnet: Any
) -> None:
    _end_to_end(case, "cpu", tmp_path, run_ranks, render_with_controlnet)


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("sd15")])
def test_strategy_end_to_end_on_two_gpus(
    case: str, tmp_path: Path, run_ranks: RunRanks, render_with_controlnet: Any
) -> None:
    """The CPU matrix's twin with what CPU cannot show: NCCL collectives, DeepSpeed without the
    test shim (as Lightning ships it) and CUDA kernels under bf16 autocast."""
    _end_to_end(case, "gpu", tmp_path, run_ranks, render_with_controlnet)


def _end_to_end(
    case: str, accelerator: Literal["cpu", "gpu"], tmp_path: Path, run_ranks: RunRanks, render: Any
) -> None:
    strategy, stage, family = CASES[case]
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed", reason="nox -s tests installs it (DS_BUILD_OPS=0)")
    straight = _config(tmp_path / "straight", strategy, stage, family, accelerator)
    interrupted = _config(tmp_path / "interrupted", strategy, stage, family, accelerator)

    ranks = _launch(run_ranks, straight, tmp_path / "straight")
    assert [r["steps"] for r in ranks] == [list(range(1, STEPS + 1))] * 2
    assert ranks[0]["buckets"] == ranks[1]["buckets"]  # every step, one bucket on both ranks
    for rank in ranks:  # autocast on for the ControlNet, off for the float32 VAE, everywhere
        assert rank["conv_dtypes"] == {"vae": ["float32"], "controlnet": ["bfloat16"]}
        # FSDP2 gathers the shards in bfloat16 (its mixed-precision policy); the others keep
        # the float32 weights and let autocast cast them per convolution.
        gathered = "bfloat16" if strategy == "fsdp" else "float32"
        assert rank["controlnet_weights"] == [gathered]

    _launch(run_ranks, interrupted, tmp_path / "interrupted", kill_at=CHECKPOINT_AT)
    checkpoint = interrupted.run_dir / "checkpoints" / f"step-{CHECKPOINT_AT:08d}.ckpt"
    assert checkpoint.exists()
    assert not (interrupted.run_dir / "exports").exists()  # it died mid-run

    resumed = _launch(run_ranks, interrupted, tmp_path / "interrupted")
    assert [r["steps"] for r in resumed] == [list(range(CHECKPOINT_AT + 1, STEPS + 1))] * 2

    step = f"step-{STEPS:08d}"
    expected, got = (_weights(c.run_dir / "exports" / step) for c in (straight, interrupted))
    for kind in expected:
        assert expected[kind].keys() == got[kind].keys()
        unequal = [k for k in expected[kind] if not torch.equal(expected[kind][k], got[kind][k])]
        assert not unequal, f"{kind}: resumed run differs in {len(unequal)} tensors"
        assert all(t.dtype == torch.float32 for t in got[kind].values())
    for config in (straight, interrupted):
        assert (config.run_dir / "validation" / f"{step}.png").is_file()

    model = Path(straight.model.source)
    export = interrupted.run_dir / "exports" / step
    for kind in ("controlnet", "controlnet_ema"):
        render(model, export / kind)

    keys = checkpoint_tensor_keys(checkpoint)
    frozen = [k for k in keys if FROZEN.search(k)]
    assert not frozen, f"frozen weights in the checkpoint: {frozen[:5]}"
    controlnet_bytes = sum(t.numel() * 4 for t in got["controlnet"].values())
    # Resume needs the fp32 ControlNet (under DeepSpeed: its optimizer's fp32 master, from which
    # the weights are rebuilt), Adam's two moments and the EMA.
    copies = 4
    budget = 1.1 * copies * controlnet_bytes + CONTAINER_BYTES_PER_TENSOR * len(keys)
    size = _bytes_on_disk(checkpoint)
    assert size <= budget, f"checkpoint {size} bytes, budget {budget:.0f}"

    exported = export_checkpoint(checkpoint, tmp_path / "exported")
    assert [p.name for p in exported] == ["controlnet", "controlnet_ema"]
    _report(case, resumed, _by_prefix(keys), size, copies * controlnet_bytes)


def _report(
    case: str, ranks: list[dict[str, Any]], keys: dict[str, int], size: int, need: int
) -> None:
    """One row of the closing note's table, appended to $CNET_STRATEGY_REPORT when set."""
    target = os.environ.get("CNET_STRATEGY_REPORT")
    if target:
        row: dict[str, object] = {"case": case, "resumed_steps": [r["steps"] for r in ranks]}
        row |= {"keys": keys, "bytes": size, "ratio": round(size / need, 3)}
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
