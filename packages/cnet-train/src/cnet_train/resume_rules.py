"""What may change between the launch that wrote a checkpoint and the launch that resumes it.

Every checkpoint stores the resolved config it was trained with (`cnet_config`) and the world
size (`cnet_world_size`). On resume the two are compared with the current ones, key by key,
and each difference is judged by the most specific rule of `RULES` (the longest dotted prefix
of its key): `refuse` stops the launch before anything is loaded, `note` lets it go on and
lists the change, `quiet` lets it go on without a word. A key no rule names is noted: most
settings (the learning rate, `trainer.max_steps`, validation, logging) are changed on purpose
between launches, and a line in the log is enough to see that they were.

The refused changes are the ones that make the checkpoint another run's: its weights would
meet a base model, an architecture or a data order they were not trained with, and nothing
would say so until the results were wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

Verdict = Literal["refuse", "note", "quiet"]
WORLD_SIZE_KEY = "world size"
"""The pseudo-key under which the world size (ranks of the launch) is compared."""


@attrs.frozen
class Rule:
    """How a change of the keys under `prefix` is judged, and why."""

    prefix: str
    """A dotted config key; the rule covers it and every key under it."""
    verdict: Verdict
    """`refuse` the resume, `note` the change in the log, or let it pass `quiet`ly."""
    why: str
    """The reason, as the refusal message gives it."""


RULES: tuple[Rule, ...] = (
    Rule("model.source", "refuse", "the ControlNet learned the features of that base model"),
    Rule("model.family", "refuse", "the family decides the conditioning the ControlNet gets"),
    Rule("model.revision", "refuse", "another revision is another set of base weights"),
    Rule("model.vae", "refuse", "another VAE encodes the images to other latents"),
    Rule("controlnet", "refuse", "the checkpoint's weights have the old architecture"),
    # Memory settings compute the same function; the start weights are overwritten by resume.
    Rule("controlnet.gradient_checkpointing", "note", "the same computation, other memory"),
    Rule("controlnet.unet_gradient_checkpointing", "note", "the same computation, other memory"),
    Rule("controlnet.pretrained", "quiet", "only the first launch starts from these weights"),
    Rule("controlnet.conditioning_embedding_init", "quiet", "only the first launch initialises"),
    # The bucket sampler records its place as segments of (global batch size, batches done),
    # so it continues the same global order with another global batch, on any number of ranks
    # (moving to more or fewer GPUs is a common relaunch); the effective batch changes, so it
    # is said.
    Rule("data.batch_size", "note", "the sampler continues its order with the new batch"),
    Rule(WORLD_SIZE_KEY, "note", "the sampler continues its order on the new number of ranks"),
    Rule("seed", "refuse", "the data order and every step's random draws follow from the seed"),
    # Where the run resumes from is what a relaunch changes; it says nothing about the run.
    Rule("checkpoint.resume", "quiet", "where to resume from is not a setting of the run"),
)
"""The rules, most general first (the most specific one that covers a key decides)."""


@attrs.frozen
class Change:
    """One key whose value differs between the checkpoint's config and the current one."""

    key: str
    old: object
    new: object
    rule: Rule | None
    """The rule that judged it; None: no rule names it (noted)."""

    @property
    def refused(self) -> bool:
        return self.rule is not None and self.rule.verdict == "refuse"

    def line(self) -> str:
        return f"{self.key}: {_shown(self.old)} -> {_shown(self.new)}"


ABSENT = "(absent)"
"""Shown for a key one of the two configs does not have (another version's schema)."""


def compare(
    old: Mapping[str, Any], new: Mapping[str, Any], rules: tuple[Rule, ...] = RULES
) -> list[Change]:
    """The changes from config `old` to `new` (nested plain data, as `config_to_dict` writes),
    except the quiet ones, in key order.

    A key only one side has comes from another version's schema: it is noted, never refused
    (what it meant there cannot be compared)."""
    before, after = _flat(old), _flat(new)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        was, now = before.get(key, ABSENT), after.get(key, ABSENT)
        if was == now:
            continue
        rule = rule_for(key, rules)
        if rule is not None and rule.verdict == "quiet":
            continue
        if rule is not None and rule.verdict == "refuse" and ABSENT in (was, now):
            rule = None
        changes.append(Change(key, was, now, rule))
    return changes


def rule_for(key: str, rules: tuple[Rule, ...] = RULES) -> Rule | None:
    """The most specific rule covering `key`, or None."""
    covering = [r for r in rules if key == r.prefix or key.startswith(r.prefix + ".")]
    return max(covering, key=lambda r: len(r.prefix), default=None)


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat(value, path + "."))
        else:
            flat[path] = value
    return flat


def _shown(value: object) -> str:
    text = value if value is ABSENT else repr(value)
    assert isinstance(text, str)
    return text if len(text) <= 60 else text[:57] + "..."
