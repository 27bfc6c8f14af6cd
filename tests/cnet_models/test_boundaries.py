"""cnet-models' import boundaries: no lightning, and diffusers / transformers only in the facade."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cnet_models

PACKAGE = Path(cnet_models.__file__).parent
THIRD_PARTY_MODELS = {"diffusers", "transformers"}
NEVER = {"lightning", "pytorch_lightning", "cnet_train", "cnet_data"}


def test_only_the_facade_imports_diffusers_and_transformers(
    imported_roots: Callable[[Path], set[str]],
) -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 8
    for path in modules:
        roots = imported_roots(path)
        assert not roots & NEVER, path
        if path.name != "facade.py":
            assert not roots & THIRD_PARTY_MODELS, path


def test_the_package_imports_without_loading_diffusers() -> None:
    code = (
        "import sys, cnet_models, cnet_models.families\n"
        "print(sorted(m for m in ('diffusers', 'transformers', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lazy_exports_resolve() -> None:
    for name in cnet_models.__all__:
        assert getattr(cnet_models, name) is not None
