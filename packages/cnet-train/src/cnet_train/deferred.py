"""State that a checkpoint restores before the object it belongs to exists.

Lightning restores callback and data-module state before `on_fit_start` (and, under some
strategies, before the data module's `setup`), while cnet builds the EMA at `on_fit_start` (the
weights must be on their device and possibly sharded first) and the bucket sampler at `setup`.
`DeferredState` holds such state and applies it exactly once, at the first point its owner can
take it, so that every owner copes with the restore order the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

State = Mapping[str, Any]
Apply = Callable[[State], None]


class DeferredState:
    """At most one held state, applied once by `offer` (owner ready) or `release` (later)."""

    def __init__(self) -> None:
        self._held: State | None = None

    @property
    def holding(self) -> bool:
        """Whether a state waits for its owner."""
        return self._held is not None

    def offer(self, state: State, apply: Apply | None) -> None:
        """Apply `state` now with `apply`, or hold it when `apply` is None (no owner yet).

        An empty state (what a callback without state saves) is nothing to restore."""
        if not state:
            return
        if apply is None:
            self._held = state
            return
        self._held = None
        apply(state)

    def release(self, apply: Apply) -> None:
        """Apply the held state, if any, with `apply`; the owner exists now."""
        held, self._held = self._held, None
        if held is not None:
            apply(held)
