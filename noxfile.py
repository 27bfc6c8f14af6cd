"""Developer sessions. `nox` runs the checks CI runs; `nox -s dev` sets up a working copy.

Default (what `.ci/run` runs): `lint`, `typecheck`, `tests` (the three packages built as wheels
and installed from them), `data_alone` and `models_alone` (one package installed alone).

On request, before a release or a change of floors: `lowest` (every declared lower bound
installed exactly; about 15 minutes here) and `tests-3.12` (about 20, most of it PyPI's CUDA
build of torch, as no 3.12 CPU build is on this machine's disk). They run the same tests as
`tests` less the slow and multi-process ones, and stay out of the default run because the
default already takes about half an hour on a 2-core CI machine. Also on request: `lock`
(refreshes the lock file), `gpu_smoke` (needs CUDA), `bench` (prints figures), `dev`.

Every session installs third-party packages under `requirements/lock.txt`, the constraints
file `nox -s lock` writes: CI installs what was last tested instead of resolving afresh, and a
release of a dependency changes nothing until the lock is refreshed (a reviewed change).

Each session installs torch first, from `CNET_TORCH` (default `torch==2.13.0`, the CPU build
this project's machines keep on disk for Python 3.11), so that the packages' wide `torch>=2.6`
requirement is already met. torch is not in the lock: which build a machine needs (CPU, CUDA)
is the machine's business, not the project's.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.options.sessions = [
    "lint",
    "typecheck",
    "tests",
    "data_alone",
    "models_alone",
]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
TORCH = os.environ.get("CNET_TORCH", "torch==2.13.0")
PACKAGES = ("packages/cnet-data", "packages/cnet-models", "packages/cnet-train")
LOCK = ROOT / "requirements" / "lock.txt"
# Left out of the lock: torch is chosen per machine (CNET_TORCH), and these follow its build.
UNLOCKED = re.compile(r"^(pip|torch|triton|nvidia-.*|cuda-.*)$", re.IGNORECASE)
# cnet-data must work without these; data_alone proves that none of them is importable.
HEAVY = ("diffusers", "transformers", "lightning", "pytorch_lightning")
# The multi-process and slow tests run once, in `tests`; the other interpreters and the
# lowest versions run everything else (every unit and single-process integration test).
FAST = ("-m", "not slow and not distributed")


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


def _locked() -> list[str]:
    return ["-c", str(LOCK)]


def _editable(*packages: str) -> list[str]:
    return [arg for package in packages for arg in ("-e", package)]


def _wheels(session: nox.Session, *packages: str) -> list[str]:
    """Build `packages` as wheels (what PyPI would get) and return their paths to install."""
    out = Path(session.create_tmp()) / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    session.run("pip", "wheel", "--quiet", "--no-deps", "-w", str(out), *packages)
    return sorted(str(p) for p in out.glob("*.whl"))


def _deepspeed_installs() -> list[list[str]]:
    """pip install arguments for DeepSpeed, in order: its build tools, then DeepSpeed with no
    CUDA ops built, against the torch already installed (build isolation would pull another
    torch into the build environment). Run with DS_BUILD_OPS=0."""
    group = _group("deepspeed")
    build_tools = [d for d in group if not d.startswith("deepspeed")]
    return [build_tools, ["--no-build-isolation", *group]]


NO_DEEPSPEED_OPS = {"DS_BUILD_OPS": "0"}


def _absent(session: nox.Session, modules: tuple[str, ...], beside: str) -> None:
    """Fail unless none of `modules` can be imported in the session."""
    probe = (
        "import importlib.util, sys; "
        f"present = [m for m in {modules!r} if importlib.util.find_spec(m)]; "
        f"sys.exit(f'installed beside {beside}: {{present}}' if present else 0)"
    )
    session.run("python", "-c", probe)


def _interpreter(version: str) -> str:
    """`version`'s interpreter: `pythonX.Y` where it runs, else a pyenv-installed one that is
    not on PATH (pyenv's shim answers only for the active version), else `version` itself, which
    nox then reports as missing."""
    name = f"python{version}"
    found = shutil.which(name)
    if found and subprocess.run([found, "-V"], capture_output=True, check=False).returncode == 0:
        return found
    root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    installed = sorted(glob.glob(f"{root}/versions/{version}.*/bin/{name}"))
    return installed[-1] if installed else version


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting."""
    session.install(*_locked(), *_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the packages, tests, benchmarks and this file."""
    session.install(*_locked(), TORCH, *_editable(*PACKAGES), *_group("typecheck"), "nox")
    session.run("mypy", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite against the built wheels (GPU-marked tests skip without CUDA),
    DeepSpeed's included."""
    session.install(*_locked(), TORCH)
    session.install(*_locked(), *_wheels(session, *PACKAGES), *_group("test"))
    for args in _deepspeed_installs():
        session.install(*_locked(), *args, env=NO_DEEPSPEED_OPS)
    session.run("pytest", *session.posargs)


@nox.session
def data_alone(session: nox.Session) -> None:
    """cnet-data's wheel installed alone: the heavy libraries are absent, its tests pass."""
    session.install(*_locked(), TORCH)
    session.install(*_locked(), *_wheels(session, PACKAGES[0]), *_group("test"))
    _absent(session, HEAVY, "cnet-data")
    session.run("pytest", "tests/cnet_data", *session.posargs)


@nox.session
def models_alone(session: nox.Session) -> None:
    """cnet-models' wheel installed alone: no lightning, no cnet-data, its tests pass."""
    session.install(*_locked(), TORCH)
    session.install(*_locked(), *_wheels(session, PACKAGES[1]), *_group("test"))
    _absent(session, ("lightning", "pytorch_lightning", "cnet_data", "cnet_train"), "cnet-models")
    session.run("pytest", "tests/cnet_models", *session.posargs)


def _lower_bounds() -> list[str]:
    """Every `name>=X` requirement of the three packages as `name==X` (torch excepted: it is
    CNET_TORCH's), so that `lowest` installs exactly the oldest versions the packages claim."""
    pins: dict[str, str] = {}
    for package in PACKAGES:
        project = nox.project.load_toml(ROOT / package / "pyproject.toml")["project"]
        extras = project.get("optional-dependencies", {})
        # Only the extras that install on any machine (bitsandbytes needs CUDA).
        wanted = [*project["dependencies"], *extras.get("deepspeed", [])]
        for requirement in wanted:
            found = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+).*", requirement)
            if found and not found[1].startswith(("cnet-", "torch")):
                pins[found[1].lower()] = f"{found[1]}=={found[2]}"
    return sorted(pins.values())


@nox.session
def lowest(session: nox.Session) -> None:
    """The lowest declared version of every dependency, exactly: the floors are claims, and
    this is the session that checks them (resolution and the non-slow tests)."""
    floors = Path(session.create_tmp()) / "floors.txt"
    floors.write_text("\n".join(_lower_bounds()) + "\n")
    session.install(TORCH)
    for args in _deepspeed_installs():
        session.install("-c", str(floors), *args, env=NO_DEEPSPEED_OPS)
    session.install("-c", str(floors), *_wheels(session, *PACKAGES), *_group("test"))
    session.run("pip", "list", "--format=freeze", silent=False)
    session.run("pytest", *FAST, *session.posargs)


@nox.session(name="tests-3.12", python=_interpreter("3.12"))
def tests_312(session: nox.Session) -> None:
    """The non-slow tests on Python 3.12 against the built wheels (the README promises 3.11
    and 3.12; a CUDA machine's image is often 3.12). torch comes from CNET_TORCH_312 (default
    CNET_TORCH; with no 3.12 CPU build on disk, pip takes PyPI's)."""
    session.install(*_locked(), os.environ.get("CNET_TORCH_312", TORCH))
    session.install(*_locked(), *_wheels(session, *PACKAGES), *_group("test"))
    for args in _deepspeed_installs():
        session.install(*_locked(), *args, env=NO_DEEPSPEED_OPS)
    session.run("pytest", *FAST, *session.posargs)


@nox.session
def lock(session: nox.Session) -> None:
    """Refresh requirements/lock.txt: resolve every session's requirements afresh (newest
    versions within the declared ranges) and pin what was installed."""
    session.install(TORCH)
    session.install(*_editable(*PACKAGES), *_group("dev"), "nox", "build")
    for args in _deepspeed_installs():
        session.install(*args, env=NO_DEEPSPEED_OPS)
    frozen = session.run("pip", "freeze", "--all", "--exclude-editable", silent=True)
    assert isinstance(frozen, str)
    pins = sorted(
        (line for line in frozen.splitlines() if "==" in line),
        key=str.lower,
    )
    kept = [p for p in pins if not UNLOCKED.match(p.split("==")[0])]
    header = (
        "# Constraints for every nox session (pip -c): the versions CI last tested.\n"
        "# Written by `nox -s lock`; do not edit by hand. torch is chosen per machine.\n"
    )
    LOCK.parent.mkdir(exist_ok=True)
    LOCK.write_text(header + "\n".join(kept) + "\n")
    session.log(f"wrote {len(kept)} pins to {LOCK.relative_to(ROOT)}")


@nox.session
def gpu_smoke(session: nox.Session) -> None:
    """A few bf16 steps on CUDA: each tiny family, then full-size SDXL under DeepSpeed ZeRO-2.

    Not a default session: it needs a GPU and a CUDA build of torch (set CNET_TORCH to one).
    """
    session.install(*_locked(), TORCH, *_editable(*PACKAGES), *_group("test"))
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
    session.install(*_locked(), "deepspeed", env={"DS_BUILD_OPS": "0"})
    session.run("python", "benchmarks/gpu_smoke.py", *session.posargs)


WHEELHOUSE = ROOT / ".whl"
"""Where `wheelhouse` writes (ignored by git; the device tool carries it as `.whl`)."""
GPU_IMAGE_LACKS = (
    "diffusers",
    "importlib_metadata",  # diffusers'
    "cattrs",
    "hjson",  # DeepSpeed's, and pydantic with its own
    "pydantic",
    "pydantic_core",
    "annotated-types",
    "typing-inspection",
)
"""What cnet and DeepSpeed need that the GPU image lacks (its package list: the device tool's
KINDS.md, read 2026-11: Python 3.12, torch 2.11, Lightning, transformers, tensorboard).
Versions are the lock's; bitsandbytes, not in the lock, is BITSANDBYTES."""
BITSANDBYTES = "bitsandbytes==0.50.2"
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")
WHEELHOUSE_LIMIT = 64 * 2**20 - 8 * 2**20
"""The device tool carries 64 MiB with the working tree; leave it 8 MiB."""


def _lock_pin(name: str) -> str:
    wanted = re.sub(r"[-_.]+", "-", name).lower()
    for line in LOCK.read_text().splitlines():
        pinned = line.split("==")[0]
        if re.sub(r"[-_.]+", "-", pinned).lower() == wanted:
            return line.strip()
    raise ValueError(f"{name} is not in {LOCK.name}: run `nox -s lock` or drop it from the list")


@nox.session
def wheelhouse(session: nox.Session) -> None:
    """The wheels an offline GPU machine (Python 3.12, torch already there) needs to run
    benchmarks/gpu_check.sh, in .whl/: cnet's three packages, DeepSpeed built as a pure wheel
    (no CUDA ops: DS_BUILD_OPS=0), and the binary wheels of GPU_IMAGE_LACKS and bitsandbytes
    for CPython 3.12 on x86-64 Linux. Fails if they would not fit the device tool's carry."""
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    WHEELHOUSE.mkdir()
    out = str(WHEELHOUSE)
    # DeepSpeed's setup.py imports torch: build it against this session's, without isolation.
    session.install(*_locked(), TORCH, *_deepspeed_installs()[0])
    session.run("pip", "wheel", "--quiet", "--no-deps", "-w", out, *PACKAGES)
    deepspeed = _lock_pin("deepspeed")
    build = ("pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", out)
    session.run(*build, deepspeed, env=NO_DEEPSPEED_OPS)
    platforms = [arg for tag in WHEEL_PLATFORMS for arg in ("--platform", tag)]
    session.run(
        "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", out,
        *(_lock_pin(name) for name in GPU_IMAGE_LACKS), BITSANDBYTES,
    )  # fmt: skip
    wheels = sorted(WHEELHOUSE.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        session.log(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    session.log(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {WHEELHOUSE.name}/")
    if size > WHEELHOUSE_LIMIT:
        session.error(f"the wheels take {size / 2**20:.1f} MiB, over the carry's room")


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark script in benchmarks/, one after another, with its default arguments.

    Not a default session (minutes, and figures to read, not a pass/fail). `nox -s bench --
    train_step index` runs only those. The GPU smoke test is its own session.
    """
    session.install(*_locked(), TORCH, *_editable(*PACKAGES), *_group("test"))
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
    session.run(pip, "install", *_locked(), TORCH, *_editable(*PACKAGES), *_group("dev"))
    for args in _deepspeed_installs():
        session.run(pip, "install", *_locked(), *args, env=NO_DEEPSPEED_OPS)
    session.log(f"ready: activate with `source {venv}/bin/activate`")
