"""How the EMA decays and how often it updates (`ema:` in a training config)."""

from __future__ import annotations

from typing import Literal

import attrs

__all__ = ["EMAConfig", "ShadowDevice"]

ShadowDevice = Literal["same", "cpu"]


def _in_unit_interval(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"ema.{attribute.name} must be in [0, 1], got {value}")


@attrs.frozen
class EMAConfig:
    """How the moving average decays and how often it is updated.

    The decay applied for optimiser step `s` (counted from 1 after the first optimiser step) is,
    with `t = s - update_after_step - 1`:

    - `0` when `t <= 0`: until the average starts, the shadow simply follows the weights;
    - otherwise `max(min_decay, min(decay, 1 - (1 + t / inv_gamma) ** -power))` with warm-up,
      or `max(min_decay, decay)` without.

    This is diffusers' `EMAModel.get_decay(s)` with `use_ema_warmup=True` when `step()` is called
    once per optimiser step; without warm-up the decay here is fixed, where diffusers would ramp
    it as `(1 + t) / (10 + t)`.
    """

    decay: float = attrs.field(default=0.9999, validator=_in_unit_interval)
    """Largest decay; the one used once warm-up is over (or always, without warm-up)."""
    warmup: bool = True
    """Ramp the decay up from 0 as `1 - (1 + t / inv_gamma) ** -power`, so that the average is
    not dominated for thousands of steps by the weights it started from."""
    inv_gamma: float = 1.0
    """Warm-up time scale in optimiser steps (the `inv_gamma` of diffusers and timm)."""
    power: float = 2 / 3
    """Warm-up exponent: 2/3 suits runs of up to about a million steps, 3/4 shorter ones."""
    update_after_step: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    """Optimiser steps before the average starts; until then the shadow copies the weights."""
    min_decay: float = attrs.field(default=0.0, validator=_in_unit_interval)
    """Smallest decay once the average has started."""
    every_n_steps: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    """Update every N optimiser steps. The skipped steps still count: an update applies the
    product of the per-step decays since the last update, so N only trades cost for staleness and
    the averaging horizon in optimiser steps does not change with it."""
    device: ShadowDevice = attrs.field(
        default="same", validator=attrs.validators.in_(("same", "cpu"))
    )
    """Where the shadow lives: next to the parameters, or in CPU memory (saves accelerator memory;
    each update then copies the weights to the host and waits for that copy)."""

    def __attrs_post_init__(self) -> None:
        if self.inv_gamma <= 0 or self.power <= 0:
            raise ValueError(
                f"ema.inv_gamma and ema.power must be > 0, got {self.inv_gamma}, {self.power}"
            )
        if self.min_decay > self.decay:
            raise ValueError(f"ema.min_decay {self.min_decay} exceeds ema.decay {self.decay}")

    def decay_at(self, step: int) -> float:
        """The decay for optimiser step `step` (the formula in the class docstring)."""
        t = step - self.update_after_step - 1
        if t <= 0:
            return 0.0
        ramp = 1.0 - (1.0 + t / self.inv_gamma) ** -self.power if self.warmup else self.decay
        return max(self.min_decay, min(self.decay, ramp))

    def decay_between(self, last_step: int, step: int) -> float:
        """The decay for the steps after `last_step` up to and including `step`: the product of
        their `decay_at`, which is what updating at every one of them would have applied to the
        old shadow. 1 when no step passed."""
        product = 1.0
        for s in range(last_step + 1, step + 1):
            product *= self.decay_at(s)
            if product == 0.0:  # a step before the start: the shadow restarts from the weights
                break
        return product
