"""cnet-data's copy of the family knowledge agrees with the cnet-models specs.

cnet-data installs alone, so it keeps its own table of default resolutions and its own copy of
the detection rule (`cnet_data.run_config`) for the bucket defaults; this test, which needs both
packages, keeps the copies equal to the specs for every registered family."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cnet_data.run_config import FAMILY_RESOLUTIONS
from cnet_data.run_config import detect_family as data_detect_family
from cnet_models.families import ModelFamily, registered_families
from cnet_models.fullsize import load_arch_config

SPECS = registered_families()


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_the_data_side_knows_each_family(
    spec: ModelFamily, tiny_models: Callable[[str], Path]
) -> None:
    assert FAMILY_RESOLUTIONS[spec.name] == spec.default_resolution
    tiny = json.loads((tiny_models(spec.name) / "unet" / "config.json").read_text())
    for config in (tiny, load_arch_config(spec.name, "unet")):
        assert data_detect_family(config) == spec.name
