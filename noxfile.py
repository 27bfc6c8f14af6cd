"""Developer sessions: `nox` runs lint, typecheck, tests and data_alone; `nox -s dev` sets up.
On request only: `nox -s gpu_smoke` (needs CUDA) and `nox -s bench` (prints figures).

Each session installs torch first, from `CNET_TORCH` (default `torch==2.13.0`, the CPU build
this project's machines keep on disk), so that the packages' wide `torch>=2.6` requirement is
already met and pip never pulls a multi-gigabyte CUDA build for a CPU machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "data_alone"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
TORCH = os.environ.get("CNET_TORCH", "torch==2.13.0")
PACKAGES = ("packages/cnet-data", "packages/cnet-models", "packages/cnet-train")
# cnet-data must work without these; data_alone proves that none of them is importable.
HEAVY = ("diffusers", "transformers", "lightning", "pytorch_lightning")


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


def _editable(*packages: str) -> list[str]:
    return [arg for package in packages for arg in ("-e", package)]


def _deepspeed_installs() -> list[list[str]]:
    """pip install arguments for DeepSpeed, in order: its build tools, then DeepSpeed with no
    CUDA ops built, against the torch already installed (build isolation would pull another
    torch into the build environment). Run with DS_BUILD_OPS=0."""
    group = _group("deepspeed")
    build_tools = [d for d in group if not d.startswith("deepspeed")]
    return [build_tools, ["--no-build-isolation", *group]]


NO_DEEPSPEED_OPS = {"DS_BUILD_OPS": "0"}


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting."""
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the packages, tests, benchmarks and this file."""
    session.install(TORCH, *_editable(*PACKAGES), *_group("typecheck"), "nox")
    session.run("mypy", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (GPU-marked tests skip without CUDA), DeepSpeed's included."""
    session.install(TORCH, *_editable(*PACKAGES), *_group("test"))
    for args in _deepspeed_installs():
        session.install(*args, env=NO_DEEPSPEED_OPS)
    session.run("pytest", *session.posargs)


@nox.session
def data_alone(session: nox.Session) -> None:
    """cnet-data installed alone (not editable): the heavy libraries are absent, tests pass."""
    session.install(TORCH, "packages/cnet-data", *_group("test"))
    probe = (
        "import importlib.util, sys; "
        f"present = [m for m in {HEAVY!r} if importlib.util.find_spec(m)]; "
        "sys.exit(f'installed beside cnet-data: {present}' if present else 0)"
    )
    session.run("python", "-c", probe)
    session.run("pytest", "tests/cnet_data", *session.posargs)


@nox.session
def gpu_smoke(session: nox.Session) -> None:
    """A few bf16 steps on CUDA: each tiny family, then full-size SDXL under DeepSpeed ZeRO-2.

    Not a default session: it needs a GPU and a CUDA build of torch (set CNET_TORCH to one).
    """
    session.install(TORCH, *_editable(*PACKAGES), *_group("test"))
    # Asked of the session's own torch: a CPU build on a GPU machine must skip, not crash.
    probe = (
        "import torch; print('cuda' if torch.cuda.is_available() else "
        "f'torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device')"
    )
    found = session.run("python", "-c", probe, silent=True)
    answer = found.strip().splitlines()[-1] if isinstance(found, str) and found.strip() else "?"
    if answer != "cuda":
        session.skip(
            f"gpu_smoke needs CUDA: {answer}; run it on a GPU machine, with CNET_TORCH naming "
            "a CUDA build of torch if the default is a CPU one"
        )
    # DS_BUILD_OPS=0: no CUDA extensions compiled at install; the smoke test uses torch's AdamW.
    session.install("deepspeed", env={"DS_BUILD_OPS": "0"})
    session.run("python", "benchmarks/gpu_smoke.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark script in benchmarks/, one after another, with its default arguments.

    Not a default session (minutes, and figures to read, not a pass/fail). `nox -s bench --
    train_step index` runs only those. The GPU smoke test is its own session.
    """
    session.install(TORCH, *_editable(*PACKAGES), *_group("test"))
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "gpu_smoke")
    if session.posargs:
        unknown = set(session.posargs) - {p.stem for p in scripts}
        if unknown:
            session.error(f"no benchmark named {', '.join(sorted(unknown))}")
        scripts = [p for p in scripts if p.stem in session.posargs]
    for script in scripts:
        session.run("python", str(script.relative_to(ROOT)))


@nox.session(venv_backend="none")
def dev(session: nox.Session) -> None:
    """Create .venv with torch, the three packages in editable mode and all dev tools."""
    venv = ROOT / ".venv"
    if not venv.exists():
        session.run(sys.executable, "-m", "venv", str(venv))
    pip = str(venv / "bin" / "pip")
    session.run(pip, "install", "--upgrade", "pip")
    session.run(pip, "install", TORCH, *_editable(*PACKAGES), *_group("dev"))
    for args in _deepspeed_installs():
        session.run(pip, "install", *args, env=NO_DEEPSPEED_OPS)
    session.log(f"ready: activate with `source {venv}/bin/activate`")
