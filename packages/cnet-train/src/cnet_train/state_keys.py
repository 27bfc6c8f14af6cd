"""The keys cnet's callbacks store their state under in a checkpoint, and the older keys.

Lightning files a callback's state under its `state_key`, by default the class name: renaming
a class would then silently drop its state from every checkpoint written before (an EMA left
out of an export, a resume that restarts the data from the beginning). Each cnet callback with
state names its key here instead; `LEGACY_KEYS` are where releases before these keys stored
the same state, so that their checkpoints still resume and export.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

EMA_STATE_KEY = "cnet.ema"
"""The EMA of the ControlNet (`callbacks.ema.EMACallback`), in `checkpoint["callbacks"]`."""
DATA_PROGRESS_STATE_KEY = "cnet.data_progress"
"""The place in the data (`callbacks.data_progress.DataProgress`), in `checkpoint["callbacks"]`."""

LEGACY_EMA_KEY = "EMACallback"
"""Where checkpoints written before the stable keys hold the EMA: `checkpoint["callbacks"]`."""
LEGACY_DATA_KEY = "ControlNetDataModule"
"""Where checkpoints written before the stable keys hold the data's place: at the top level
(Lightning's key for a data module's state is its class name)."""


def callback_state(checkpoint: Mapping[str, Any], key: str, legacy: str) -> Any:
    """The state of the callback with state key `key` in `checkpoint`, or, in a checkpoint
    written before the stable keys, the state it stored under `legacy`; None if neither."""
    callbacks = checkpoint.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    return callbacks.get(key, callbacks.get(legacy))


def adopt_legacy_state(checkpoint: dict[str, Any], key: str, state: Any) -> None:
    """File `state` (found under an older key) under `key`, unless the checkpoint has that key:
    Lightning then hands it to the callback's `load_state_dict` like any current state."""
    if state is None:
        return
    callbacks = checkpoint.setdefault("callbacks", {})
    callbacks.setdefault(key, state)
