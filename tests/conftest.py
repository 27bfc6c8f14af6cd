"""Fixtures shared by every package's tests. Standard library only: the cnet-data tests also
run in an environment where only cnet-data (and torch) is installed."""

from __future__ import annotations

import ast
import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest


class RunRanks(Protocol):
    def __call__(
        self,
        argv: Sequence[str],
        world: int,
        timeout: float = ...,
        env: dict[str, str] | None = ...,
        succeed: bool = ...,
    ) -> list[str]: ...


RenderWithControlNet = Callable[[Path, Path], Any]


@pytest.fixture(scope="session")
def render_with_controlnet() -> RenderWithControlNet:
    """`render(model_folder, controlnet_folder)`: a 64x64 image (numpy, HWC in [0, 1]) from the
    family's diffusers ControlNet pipeline, loaded with `from_pretrained` as a user would, in
    two steps from a fixed seed and a fixed random conditioning image."""

    def render(model: Path, controlnet_folder: Path) -> Any:
        import json

        import numpy as np
        import torch
        from PIL import Image

        from cnet_models.facade import (
            StableDiffusionControlNetPipeline,
            StableDiffusionXLControlNetPipeline,
            load_controlnet,
        )

        index = json.loads((model / "model_index.json").read_text())
        sdxl = "text_encoder_2" in index
        kind = StableDiffusionXLControlNetPipeline if sdxl else StableDiffusionControlNetPipeline
        pipe = kind.from_pretrained(str(model), controlnet=load_controlnet(controlnet_folder, None))
        pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
        control = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
        result = pipe(
            "a red circle",
            image=Image.fromarray(control),
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
        image = np.asarray(result.images[0])
        assert image.shape == (64, 64, 3)
        assert np.isfinite(image).all()
        return image

    return render


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_models(family)` -> a tiny model folder of that family ("sd15", "sd21", "sdxl").

    Each family is written once per session (seed 0) and shared by every test that asks for
    it: treat the folder as read-only, copy it to change it. (cnet_models is imported only
    when a test asks: the cnet-data tests also run where it is not installed.)
    """
    from cnet_models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    written: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in written:
            written[family] = write_tiny_model(family, root / family)
        return written[family]

    return folder


@pytest.fixture(scope="session")
def single_file_of() -> Callable[[Path, Path], Path]:
    """`single_file_of(folder, path)` -> the SD 1.x diffusers model `folder` written at `path`
    as one original-layout checkpoint (`tests/ldm_checkpoint.py`), as A1111 and ComfyUI keep
    them."""
    spec = importlib.util.spec_from_file_location(
        "ldm_checkpoint", Path(__file__).with_name("ldm_checkpoint.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    write: Callable[[Path, Path], Path] = module.write_ldm_checkpoint
    return write


@pytest.fixture(scope="session")
def imported_roots() -> Callable[[Path], set[str]]:
    """`imported_roots(path)`: the top-level packages a source file imports (absolute imports)."""

    def roots(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        return found

    return roots


@pytest.fixture
def run_ranks() -> RunRanks:
    """`run_ranks(argv, world, timeout=180, env=None, succeed=True)`: run `python *argv` as ranks
    0..world-1 of a torch.distributed job on loopback (torchrun's environment variables, plus
    `env`); returns each rank's output. With `succeed`, fails the test with that output if a rank
    exits non-zero; without, if a rank exits zero (a run meant to die). A rank still running at
    `timeout` is killed, with every other, and the test fails with their output."""

    def run(
        argv: Sequence[str],
        world: int,
        timeout: float = 180,
        env: dict[str, str] | None = None,
        succeed: bool = True,
    ) -> list[str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        common = {
            **os.environ,
            **(env or {}),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "GROUP_RANK": "0",
        }
        procs = [
            subprocess.Popen(
                [sys.executable, *argv],
                env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for rank in range(world)
        ]
        try:
            outputs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            left = [p.communicate()[0].decode()[-3000:] for p in procs]
            pytest.fail(f"ranks still running after {timeout} s:\n" + "\n---\n".join(left))
        for rank, (p, output) in enumerate(zip(procs, outputs, strict=True)):
            if succeed:
                assert p.returncode == 0, f"rank {rank} failed:\n{output}"
            else:
                assert p.returncode != 0, f"rank {rank} was meant to die but exited 0:\n{output}"
        return outputs

    return run
