"""What `cnet-data condition` draws: Canny edges built in, the other annotators through
`controlnet_aux`.

Canny is computed as the ControlNet annotator and the diffusers examples compute it: `cv2.Canny`
on the RGB image with the two hysteresis thresholds, the one-channel edge map repeated to three
channels (OpenCV comes with `cnet-data[condition]`). The other methods (HED, depth, pose,
lineart, ...) are `controlnet_aux`'s detectors, used when it is installed
(`pip install controlnet-aux`), their weights loaded once per process from `annotators` (the hub
repository `lllyasviel/Annotators` by default, or a local copy of it). A detector's output is
resized to its image's size: a pair must match pixel for pixel, and the detectors work at 512.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import attrs

from cnet_data.errors import CnetError

if TYPE_CHECKING:  # numpy and Pillow load when drawing, not when `cnet-data --help` lists methods
    import numpy as np
    from PIL import Image

AUX_METHODS = {
    "hed": "HEDdetector",
    "pidi": "PidiNetDetector",
    "depth": "MidasDetector",
    "zoe": "ZoeDetector",
    "leres": "LeresDetector",
    "normal": "NormalBaeDetector",
    "pose": "OpenposeDetector",
    "lineart": "LineartDetector",
    "lineart_anime": "LineartAnimeDetector",
    "mlsd": "MLSDdetector",
    "shuffle": "ContentShuffleDetector",
}
"""`--method` names drawn by `controlnet_aux`, and its detector class for each."""
_NO_WEIGHTS = {"shuffle"}
METHODS = ("canny", *AUX_METHODS)


class ConditionError(CnetError, ValueError):
    """The conditioning cannot be made as asked (missing library, bad thresholds, no images)."""

    exit_code = 2


@attrs.frozen
class CannyConfig:
    """OpenCV Canny's hysteresis thresholds (the ControlNet annotator's defaults)."""

    low: int = 100
    """Gradients below this are never edges."""
    high: int = 200
    """Gradients above this are always edges; between the two, only where joined to one."""

    def check(self) -> None:
        if not 0 <= self.low <= self.high:
            raise ConditionError(
                f"canny thresholds must satisfy 0 <= low <= high, got low {self.low}, "
                f"high {self.high}",
                hint="e.g. --low 100 --high 200",
            )
        _opencv()  # refuse before any work when OpenCV is missing


@attrs.frozen
class AuxConfig:
    """A `controlnet_aux` detector."""

    method: str
    """One of `AUX_METHODS`."""
    annotators: str = "lllyasviel/Annotators"
    """Where the detector's weights are: a hub repository or a local folder of it."""

    def check(self) -> None:
        if self.method not in AUX_METHODS:
            raise ConditionError(
                f"unknown conditioning method {self.method!r}",
                hint=f"use one of {', '.join(METHODS)}",
            )
        _detector(self)  # loaded once here: a missing weight is one error, not one per image


MethodConfig = CannyConfig | AuxConfig


def draw(image: Image.Image, config: MethodConfig) -> Image.Image:
    """The conditioning image of an RGB image, the same size."""
    import numpy as np
    from PIL import Image

    if isinstance(config, CannyConfig):
        return canny_map(np.asarray(image), config)
    drawn = _detector(config)(image)
    drawn = drawn if isinstance(drawn, Image.Image) else Image.fromarray(np.asarray(drawn))
    drawn = drawn.convert("RGB")
    return (
        drawn if drawn.size == image.size else drawn.resize(image.size, Image.Resampling.BILINEAR)
    )


def canny_map(rgb: np.ndarray[Any, np.dtype[np.uint8]], config: CannyConfig) -> Image.Image:
    """The three-channel Canny edge map of an RGB uint8 image."""
    import numpy as np
    from PIL import Image

    cv2 = _opencv()
    edges = cv2.Canny(rgb, config.low, config.high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def _opencv() -> Any:
    try:
        import cv2
    except ImportError:
        raise ConditionError(
            "Canny conditioning needs OpenCV, which is not installed",
            hint="pip install 'cnet-data[condition]' (opencv-python-headless)",
        ) from None
    return cv2


def _controlnet_aux(method: str) -> Any:
    try:
        module = importlib.import_module("controlnet_aux")
    except ImportError:
        raise ConditionError(
            f"--method {method} draws with controlnet_aux, which is not installed",
            hint="pip install controlnet-aux (canny needs only cnet-data[condition])",
        ) from None
    return getattr(module, AUX_METHODS[method])


_DETECTORS: dict[AuxConfig, Any] = {}


def _detector(config: AuxConfig) -> Any:
    """The detector, loaded once per process (its weights take seconds to load)."""
    found = _DETECTORS.get(config)
    if found is None:
        cls = _controlnet_aux(config.method)
        try:
            found = (
                cls() if config.method in _NO_WEIGHTS else cls.from_pretrained(config.annotators)
            )
        except Exception as exc:  # a hub lookup offline, a missing file: each its own class
            raise ConditionError(
                f"cannot load controlnet_aux's {cls.__name__} from {config.annotators}: {exc}",
                hint="--annotators names a local copy of lllyasviel/Annotators offline",
            ) from exc
        _DETECTORS[config] = found
    return found
