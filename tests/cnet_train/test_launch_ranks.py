"""`cnet-train launch` with two devices, as a user starts it (Lightning spawns the second rank):
when that rank fails after the main one has finished, the launch must not report success."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from cnet_train.config import ValidationConfig
from cnet_train.config_io import dump_config
from cnet_train.demo import demo_config

# Loaded by Python at start-up in every process of the launch (PYTHONPATH); acts on local rank 1
# only: its last callback of training fails, a few seconds after the main rank is done.
FAIL_RANK_1 = """
import os
if os.environ.get("LOCAL_RANK") == "1":
    import time
    import cnet_train.callbacks.history as history

    def fail(self, trainer, pl_module):
        time.sleep(3)
        raise RuntimeError("injected failure on local rank 1 at the end of training")

    history.LossHistory.on_train_end = fail
"""


@pytest.mark.distributed
def test_launch_fails_when_another_rank_fails_at_the_end(tmp_path: Path) -> None:
    config = demo_config(tmp_path / "demo", "sd15", steps=2, samples=24)
    config = attrs.evolve(
        config,
        validation=ValidationConfig(),
        trainer=attrs.evolve(config.trainer, strategy="ddp", devices=2),
    )
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAIL_RANK_1)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(inject), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "cnet_train.cli", "launch", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    assert "injected failure on local rank 1" in output
    assert done.returncode != 0, f"the launch reported success:\n{output[-3000:]}"
    # The last word names the rank; Lightning's own child watcher, which polls every 5 s, may
    # win the race and SIGKILL the launch instead, which is a failure too.
    last = output.strip().splitlines()[-2:]  # the error line, then its hint
    named = any("error: local rank 1 exited with code 1" in line for line in last)
    assert named or done.returncode == -9
    assert (config.run_dir / "exports" / "step-00000002").is_dir()  # rank 0 did finish
