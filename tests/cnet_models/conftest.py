"""Fixtures for the cnet-models tests: tiny model folders, written offline, once per session.

Test folders have no __init__.py, so that `cnet_models` always names the package under test;
shared helpers are fixtures here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cnet_models.tiny import write_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_models(family)` -> a tiny model folder of that family ("sd15", "sd21", "sdxl").

    Each family is written once per session (seed 0) and shared by every test that asks for
    it: treat the folder as read-only, copy it to change it.
    """
    root = tmp_path_factory.mktemp("tiny-models")
    written: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in written:
            written[family] = write_tiny_model(family, root / family)
        return written[family]

    return folder
