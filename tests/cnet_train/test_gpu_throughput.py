"""benchmarks/gpu_throughput.py keeps working: its tiny CPU mode, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_throughput.py"


def test_the_tiny_mode_prints_a_row_per_setting_and_writes_them(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    settings = "eager,unet-ckpt,latent-cache,compile"
    command = [sys.executable, str(SCRIPT), "--tiny", "--families", "sd15"]
    command += ["--settings", settings, "--warmup", "1", "--steps", "2", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "samples/s" in done.stdout
    payload = json.loads(out.read_text())
    rows = {row["setting"]: row for row in payload["rows"]}
    assert set(rows) == {"eager", "unet-ckpt", "latent-cache"}
    skipped = dict(map(tuple, payload["skipped"]))
    assert skipped["sd15 compile"] == "GPU only"
    for row in rows.values():
        assert row["samples_per_s"] > 0
        assert row["model_gflop_per_sample"] > 0
        assert row["encode_gflop_per_sample"] > 0
        assert row["mfu"] is None  # no peak FLOP/s for a CPU
    # Model FLOPs leave checkpointing's recompute out; the plan counts its smaller activations.
    eager, checkpointed = rows["eager"], rows["unet-ckpt"]
    assert checkpointed["model_gflop_per_sample"] == eager["model_gflop_per_sample"]
    assert checkpointed["plan_gib"] < eager["plan_gib"]
    # The cache changes where the latents come from, not the model's work.
    assert rows["latent-cache"]["model_gflop_per_sample"] == eager["model_gflop_per_sample"]
