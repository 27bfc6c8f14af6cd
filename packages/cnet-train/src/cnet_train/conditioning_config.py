"""`conditioning:`: how a training step conditions the controlled UNet.

Caption dropout and the ControlNet's residual scale shape what the UNet is conditioned on, not
what the data loader reads, and the dropped-caption embedding is also what validation renders
unconditioned with; so they are one section of their own rather than parts of `data:` (where
the caption dropout used to be) or `loss:` (the scale). `MOVED_KEYS` names where the old keys
went, so that a config still using them fails with a message that says so.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from cnet_models.families import UnconditionalChoice

MOVED_KEYS = {
    "data.caption_dropout": "conditioning.caption_dropout",
    "data.caption_dropout_embedding": "conditioning.caption_dropout_embedding",
    "loss.conditioning_scale": "conditioning.scale",
}
"""Keys of earlier configs and the keys that replaced them (same meaning and values)."""


def _probability(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:  # NaN fails both comparisons
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value}")


def _finite(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a finite number, got {value}")


@attrs.frozen
class ConditioningConfig:
    """Caption dropout and the ControlNet's residual scale during training."""

    caption_dropout: float = attrs.field(default=0.05, validator=_probability)
    """Chance, drawn at every step for every sample, that its caption is dropped (see
    `caption_dropout_embedding`): what classifier-free guidance needs at inference."""
    caption_dropout_embedding: UnconditionalChoice = "auto"
    """What a dropped caption becomes, and what validation renders unconditioned with: `auto`
    (what the family's pipeline feeds at inference: all-zero embeddings for SDXL, as its
    `force_zeros_for_empty_prompt` says, the encoded empty prompt for SD 1.5 / 2.1),
    `empty_prompt` (as diffusers' training scripts do) or `zeros`."""
    scale: float = attrs.field(default=1.0, validator=_finite)
    """Scale of the ControlNet residuals added to the UNet during training (and the control
    gain's measurement); inference chooses its own."""


def moved_key_message(key: str) -> str | None:
    """`KEY moved to NEW` for a key of an earlier config, else None."""
    new = MOVED_KEYS.get(key)
    return None if new is None else f"{key} moved to {new} (same meaning and values)"
