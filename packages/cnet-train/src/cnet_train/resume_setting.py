"""`checkpoint.resume` as a typed value: `auto`, `none`, or the path of a checkpoint.

A free string let `resume: Auto` or `resume: latest` pass `cnet-train config` and fail only at
launch, as a missing file. Here a value is one of the two words, spelled as written, or
something that reads as a path: it has a `/`, starts with `~`, or has a file suffix (cnet's
checkpoints are `step-00000500.ckpt`, files and folders alike). Anything else is refused with
the choices, at config load. Whether the path exists is checked at launch
(`cnet_train.resume.resume_path`, and `cnet-train config`'s preflight), where it matters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

ResumeChoice = Literal["auto", "none"]
ResumeSetting = ResumeChoice | Path
"""What `checkpoint.resume` holds: a choice, or the path of a checkpoint file or folder."""
RESUME_CHOICES: tuple[ResumeChoice, ...] = get_args(ResumeChoice)

_CHOICES_TEXT = "auto (the newest checkpoint in the run, if any), none, or a checkpoint path"


def parse_resume(value: object) -> ResumeSetting:
    """`value` (as YAML or Python gives it) as a `ResumeSetting`; ValueError or TypeError, with
    the choices, for anything else."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        shown = "null" if value is None else repr(value)
        raise TypeError(f"expected {_CHOICES_TEXT}, got {shown}")
    if not value.strip():
        raise ValueError(f"must not be empty: expected {_CHOICES_TEXT}")
    for choice in RESUME_CHOICES:
        if value == choice:
            return choice
    if looks_like_path(value):
        return Path(value)
    raise ValueError(f"{value!r} is not one of {_CHOICES_TEXT}{_hint(value)}")


def looks_like_path(text: str) -> bool:
    """Whether `text` reads as a path rather than as a word: a separator, `~`, or a suffix."""
    return "/" in text or text.startswith("~") or Path(text).suffix not in ("", ".")


def _hint(value: str) -> str:
    word = value.strip().lower()
    if word in RESUME_CHOICES:
        return f" (write it as {word}: lower case, no spaces)"
    if word in ("never", "no", "off", "false", "null", "fresh"):
        return " (none starts a fresh run)"
    return f" (a path has a / or a suffix: ./{value} for a folder of that name here)"
