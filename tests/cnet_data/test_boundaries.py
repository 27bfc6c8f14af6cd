"""cnet-data stands alone: no diffusers, transformers or lightning, now or by accident."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cnet_data

FORBIDDEN = (
    "diffusers",
    "transformers",
    "lightning",
    "pytorch_lightning",
    "cnet_models",
    "cnet_train",
)
PACKAGE = Path(cnet_data.__file__).parent


def test_no_module_imports_a_forbidden_library(imported_roots: Callable[[Path], set[str]]) -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 10
    for path in modules:
        assert not imported_roots(path) & set(FORBIDDEN), path


def test_importing_everything_loads_none_of_them() -> None:
    names = [
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        for p in PACKAGE.rglob("*.py")
        if p.name != "__main__.py"
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n    importlib.import_module(name)\n"
        f"print([m for m in {FORBIDDEN!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lazy_exports_resolve() -> None:
    for name in cnet_data.__all__:
        assert getattr(cnet_data, name) is not None
