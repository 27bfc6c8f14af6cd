"""Crash and preemption safety, tried on real processes: SIGKILL inside checkpoint and export
writes, SIGTERM / SIGUSR1, a kill during the final export, an end-of-epoch resume, NaN on one
rank of two, and two nodes whose run_dirs are not shared.

Every run here is a real `cnet-train launch` (through `crash_worker.py`, which counts, logs and
can tear the process's writes). After any kill, relaunching the same command must finish the
run with exactly what an uninterrupted run ends with.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import torch
from safetensors.torch import load_file

from cnet_train.config import CheckpointConfig, ExportConfig, TrainConfig
from cnet_train.config_io import dump_config

RunRanks = Callable[..., list[str]]
WORKER = Path(__file__).with_name("crash_worker.py")
STEPS = 6
pytestmark = pytest.mark.slow  # each test kills and relaunches whole runs


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    """The tiny sd15 demo's model and data (12 samples, 3 buckets: 6 steps an epoch)."""
    from cnet_train.demo import demo_config

    return demo_config(tmp_path_factory.mktemp("demo"), "sd15", steps=STEPS, samples=12)


def _config(demo: TrainConfig, run_dir: Path) -> TrainConfig:
    v = demo.validation
    return attrs.evolve(
        demo,
        run_dir=run_dir,
        data=attrs.evolve(demo.data, batch_size=2),
        checkpoint=CheckpointConfig(every_n_steps=2, keep_last=2, resume="auto"),
        export=ExportConfig(every_n_steps=3, keep_last=2),
        validation=attrs.evolve(
            v, prompts=v.prompts[:1], images=v.images[:1], num_inference_steps=2
        ),
        trainer=attrs.evolve(demo.trainer, log_every_n_steps=2),
    )


def _yaml(config: TrainConfig) -> Path:
    path = config.run_dir.with_name(config.run_dir.name + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(config))
    return path


def _launch(
    config: TrainConfig, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(_yaml(config)), *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def _run(config: TrainConfig, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    return _finish(_launch(config, *args, env=env))


def _final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    export = run_dir / "exports" / f"step-{STEPS:08d}"
    return {
        kind: load_file(export / kind / "diffusion_pytorch_model.safetensors")
        for kind in ("controlnet", "controlnet_ema")
    }


def _assert_same(
    a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]
) -> None:
    for kind, tensors in a.items():
        assert tensors.keys() == b[kind].keys()
        differ = [k for k, t in tensors.items() if not torch.equal(t, b[kind][k])]
        assert not differ, f"{kind}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def _assert_run_complete(run_dir: Path, exports: tuple[int, ...] = (3, STEPS)) -> None:
    """Everything an uninterrupted run leaves, nothing a killed one leaves behind."""
    leftovers = [p for p in run_dir.rglob("*") if ".partial" in p.name or ".tmp" in p.name]
    assert not leftovers, leftovers
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and checkpoints[-1] == f"step-{STEPS:08d}.ckpt", checkpoints
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == [
        f"step-{s:08d}" for s in exports
    ]
    steps = [int(line.split(",")[0]) for line in (run_dir / "loss.csv").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert (run_dir / "loss.png").is_file()
    assert (run_dir / "validation" / f"step-{STEPS:08d}.png").is_file()


@pytest.fixture(scope="module")
def reference(demo: TrainConfig, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """An uninterrupted run: its final weights and the trace of its writes."""
    root = tmp_path_factory.mktemp("reference")
    config = _config(demo, root / "run")
    trace = root / "trace.tsv"
    code, out = _run(config, "--trace", str(trace))
    assert code == 0, out
    _assert_run_complete(config.run_dir)
    writes = [line.split("\t") for line in trace.read_text().splitlines()]
    return {"config": config, "weights": _final_weights(config.run_dir), "writes": writes}


def _kill_points(writes: list[list[str]], run_dir: Path, trials: int, seed: int) -> list[int]:
    """Write primitives inside checkpoint, export and loss-history writes: evenly spread, plus
    the final export's first weights write and the final checkpoint's commit."""
    inside = [
        int(n)
        for n, _kind, path in writes
        if str(run_dir / "checkpoints") in path or str(run_dir / "exports") in path
    ]
    final_export = next(
        int(n) for n, kind, path in writes if kind == "save_file" and f".step-{STEPS:08d}" in path
    )
    final_commit = next(
        int(n)
        for n, kind, path in writes
        if kind == "replace" and path.endswith(f"step-{STEPS:08d}.ckpt")
    )
    rng = random.Random(seed)
    picks = {final_export, final_commit}
    stride = max(1, len(inside) // trials)
    picks |= {rng.choice(inside[i : i + stride]) for i in range(0, len(inside), stride)}
    return sorted(picks)


def test_sigkill_inside_checkpoint_and_export_writes_loses_nothing(
    reference: dict[str, object], tmp_path: Path
) -> None:
    config = reference["config"]
    assert isinstance(config, TrainConfig)
    writes = reference["writes"]
    assert isinstance(writes, list)
    points = _kill_points(writes, config.run_dir, trials=6, seed=8)
    trials = [attrs.evolve(config, run_dir=tmp_path / f"kill-{n}") for n in points]
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir)}
    killed = [_launch(c, "--kill-at", str(n), env=env) for c, n in zip(trials, points, strict=True)]
    for n, proc in zip(points, killed, strict=True):
        code, out = _finish(proc)
        assert code == -signal.SIGKILL, f"kill at write {n} did not happen:\n{out[-3000:]}"
    relaunched = [_launch(c, env=env) for c in trials]
    for n, c, proc in zip(points, trials, relaunched, strict=True):
        code, out = _finish(proc)
        assert code == 0, f"relaunch after a kill at write {n} failed:\n{out[-3000:]}"
        _assert_run_complete(c.run_dir)
        _assert_same(reference["weights"], _final_weights(c.run_dir))  # type: ignore[arg-type]
    assert not [p for p in tmpdir.rglob("*") if p.is_file()], "checkpoint data left in $TMPDIR"


def test_a_kill_during_the_final_export_is_made_good_by_the_relaunch(
    demo: TrainConfig, reference: dict[str, object], tmp_path: Path
) -> None:
    # Exports only at the end: the final checkpoint (step 6) is committed before the export
    # starts, so the relaunch resumes at max_steps and has only the export (and the rest of
    # the end-of-run work) left to do.
    config = attrs.evolve(_config(demo, tmp_path / "run"), export=ExportConfig(every_n_steps=0))
    trace = tmp_path / "trace.tsv"
    code, out = _run(config, "--trace", str(trace))
    assert code == 0, out
    writes = [line.split("\t") for line in trace.read_text().splitlines()]
    in_export = [int(n) for n, kind, path in writes if kind == "save_file"]
    killed = attrs.evolve(config, run_dir=tmp_path / "killed")
    code, out = _run(killed, "--kill-at", str(in_export[1]))  # the EMA's weights, half written
    assert code == -signal.SIGKILL, out[-3000:]
    assert (killed.run_dir / "checkpoints" / f"step-{STEPS:08d}.ckpt").is_file()
    assert not (killed.run_dir / "exports" / f"step-{STEPS:08d}").exists()
    code, out = _run(killed)
    assert code == 0, out[-3000:]
    _assert_run_complete(killed.run_dir, exports=(STEPS,))
    _assert_same(reference["weights"], _final_weights(killed.run_dir))  # type: ignore[arg-type]


def _wait_for_step(progress: Path, step: int, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        lines = progress.read_text().split() if progress.is_file() else []
        if lines and int(lines[-1]) >= step:
            return int(lines[-1])
        time.sleep(0.05)
    pytest.fail(f"the run did not reach step {step}")


def test_sigterm_and_sigusr1_checkpoint_at_the_next_step_and_relaunch_resumes(
    demo: TrainConfig, reference: dict[str, object], tmp_path: Path
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "scontrol.log"
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "PATH": f"{fake}:{os.environ['PATH']}"}
    runs = {}
    for signum, env in ((signal.SIGTERM, {}), (signal.SIGUSR1, slurm)):
        config = _config(demo, tmp_path / signum.name)
        progress = tmp_path / f"{signum.name}.progress"
        proc = _launch(config, "--progress", str(progress), "--step-delay", "1.0", env=env)
        runs[signum] = (config, progress, proc, env)
    seen = {}
    for signum, run in runs.items():
        seen[signum] = _wait_for_step(run[1], 3, run[2])
        run[2].send_signal(signum)
    for signum, (config, _progress, proc, _env) in runs.items():
        code, out = _finish(proc)
        assert code == 128 + signum, out[-3000:]
        stopped = int(out.split(f"stopped by {signum.name} at step ")[1].split(";")[0])
        assert seen[signum] < stopped < STEPS  # the next step boundary, not the end of the run
        assert (config.run_dir / "checkpoints" / f"step-{stopped:08d}.ckpt").is_file()
        assert not (config.run_dir / "exports" / f"step-{STEPS:08d}").exists()
        assert "hint: relaunch the same command to resume" in out
    assert calls.read_text().split() == ["requeue", "4242"]
    for signum, (config, _progress, _proc, env) in runs.items():
        code, out = _run(config, env=env)
        assert code == 0, f"{signum.name} relaunch:\n{out[-3000:]}"
        _assert_same(reference["weights"], _final_weights(config.run_dir))  # type: ignore[arg-type]
        steps = [int(x.split(",")[0]) for x in (config.run_dir / "loss.csv").read_text().split()]
        assert steps == list(range(1, STEPS + 1))


def _ddp(demo: TrainConfig, run_dir: Path, nodes: int = 1, devices: int = 2) -> TrainConfig:
    config = _config(demo, run_dir)
    return attrs.evolve(
        config,
        trainer=attrs.evolve(config.trainer, strategy="ddp", devices=devices, num_nodes=nodes),
    )


def test_nan_on_one_of_two_ddp_ranks_stops_both_before_any_non_finite_save(
    demo: TrainConfig, tmp_path: Path, run_ranks: RunRanks
) -> None:
    config = _ddp(demo, tmp_path / "run")
    argv = [str(WORKER), str(_yaml(config)), "--nan-rank", "1", "--nan-step", "3"]
    outputs = run_ranks(argv, 2, timeout=240, env={"OMP_NUM_THREADS": "1"}, succeed=False)
    for output in outputs:
        # The periodic check and the one before the step-4 checkpoint both come after step 4.
        assert re.search(r"not finite at (the checkpoint of )?step 4 ", output), output[-3000:]
        assert "Traceback" not in output
    checkpoints = sorted((config.run_dir / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-00000002.ckpt"]
    state = torch.load(checkpoints[0], weights_only=True, map_location="cpu")
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
    assert sorted(p.name for p in (config.run_dir / "exports").iterdir()) == ["step-00000003"]
    exported = load_file(
        config.run_dir / "exports/step-00000003/controlnet/diffusion_pytorch_model.safetensors"
    )
    assert all(torch.isfinite(t).all() for t in exported.values())


def test_two_nodes_without_a_shared_run_dir_stop_fast_and_say_so(
    demo: TrainConfig, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for node in range(2):
        config = _ddp(demo, tmp_path / f"node{node}", nodes=2, devices=1)
        if node == 0:  # only node 0's disk holds a checkpoint
            (config.run_dir / "checkpoints").mkdir(parents=True)
            torch.save({}, config.run_dir / "checkpoints" / "step-00000002.ckpt")
        torchrun = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--max-restarts", "0",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append(
            subprocess.Popen(
                [*torchrun, str(WORKER), str(_yaml(config))],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    started = time.monotonic()
    results = [_finish(p, timeout=180) for p in procs]
    assert time.monotonic() - started < 180
    for code, out in results:
        assert code != 0, out[-3000:]
        assert "must be on a filesystem every node shares" in out, out[-3000:]
        assert "rank 1 on" in out and "sees no checkpoint" in out, out[-3000:]
