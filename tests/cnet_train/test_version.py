"""cnet-train's version has one source: `__version__`, which its pyproject.toml reads."""

from __future__ import annotations

import importlib.metadata

import cnet_train


def test_the_version_is_the_installed_distributions() -> None:
    assert cnet_train.__version__ == importlib.metadata.version("cnet-train")
