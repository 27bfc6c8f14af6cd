"""The package's public names and version: one list (`__init__.pyi`), one version source."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import cnet_models

STUB = Path(cnet_models.__file__).with_suffix(".pyi")


def _stub_names() -> set[str]:
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    return {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}


def test_every_stub_name_is_exported_and_resolves() -> None:
    assert set(cnet_models.__all__) == _stub_names()
    assert {"FAMILIES", "Family", "detect_family", "ExponentialMovingAverage"} <= _stub_names()
    for name in cnet_models.__all__:
        assert getattr(cnet_models, name) is not None, name
        assert name in dir(cnet_models)


def test_an_unknown_name_raises_attribute_error_naming_the_package() -> None:
    with pytest.raises(AttributeError, match="cnet_models"):
        _ = cnet_models.no_such_name  # type: ignore[attr-defined]


def test_importing_the_package_loads_no_public_module_or_torch() -> None:
    code = (
        "import sys, cnet_models\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch', 'cnet_models.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_version_is_the_installed_distributions() -> None:
    assert cnet_models.__version__ == importlib.metadata.version("cnet-models")
