"""The package's public names and version: one list (`__init__.pyi`), one version source."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import cnet_data

STUB = Path(cnet_data.__file__).with_suffix(".pyi")


def _stub_names() -> set[str]:
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    return {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}


def test_every_stub_name_is_exported_and_resolves_from_its_module() -> None:
    assert set(cnet_data.__all__) == _stub_names()
    assert len(cnet_data.__all__) > 10
    for name in cnet_data.__all__:
        value = getattr(cnet_data, name)
        assert getattr(value, "__name__", name) == name, name
        assert name in dir(cnet_data)


def test_an_unknown_name_raises_attribute_error_naming_the_package() -> None:
    with pytest.raises(AttributeError, match="cnet_data"):
        _ = cnet_data.no_such_name  # type: ignore[attr-defined]


def test_a_function_named_like_its_module_is_not_shadowed_by_it() -> None:
    code = "import cnet_data.scan, cnet_data\nfrom cnet_data import scan\nprint(callable(scan))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_importing_the_package_loads_no_public_module_or_torch() -> None:
    code = (
        "import sys, cnet_data\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch', 'cnet_data.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_version_is_the_installed_distributions() -> None:
    assert cnet_data.__version__ == importlib.metadata.version("cnet-data")
