"""`header.json`: the cache's format, encoder fingerprint and fields; created once, race-safe."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from cnet_data.atomic import publish_once
from cnet_data.embcache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    REBUILD_HINT,
    CacheCorruptError,
    CacheMismatchError,
    FieldSpec,
)

HEADER_NAME = "header.json"


@attrs.frozen
class CacheHeader:
    """What `header.json` says."""

    fingerprint: dict[str, Any]
    """The encoder's identity (model, tokenizer, max length, hidden state, dtype...), as JSON."""
    fields: tuple[FieldSpec, ...]
    """The tensors stored per key, in storage order."""

    def to_json(self) -> str:
        data = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "fingerprint": self.fingerprint,
            "fields": [f.to_json() for f in self.fields],
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def normalise_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON (tuples become lists), so comparisons hold."""
    try:
        data: dict[str, Any] = json.loads(json.dumps(dict(fingerprint), sort_keys=True))
    except TypeError as exc:
        raise ValueError(f"the cache fingerprint must be JSON-serialisable: {exc}") from None
    return data


def fingerprint_differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """One line per differing entry: `model 'a' != 'b'` (expected value first)."""
    expected, actual = normalise_fingerprint(expected), normalise_fingerprint(actual)
    lines = []
    for key in sorted(set(expected) | set(actual)):
        if key not in actual:
            lines.append(f"{key} {expected[key]!r} is missing from the cache")
        elif key not in expected:
            lines.append(f"{key} {actual[key]!r} in the cache is not expected")
        elif expected[key] != actual[key]:
            lines.append(f"{key} {expected[key]!r} != {actual[key]!r}")
    return lines


def check_fingerprint(
    directory: Path, expected: Mapping[str, Any], actual: Mapping[str, Any]
) -> None:
    """Raise CacheMismatchError listing every differing fingerprint entry."""
    if diffs := fingerprint_differences(expected, actual):
        raise CacheMismatchError(
            f"embedding cache {directory} was written by another encoder: fingerprint differs: "
            f"{'; '.join(diffs)} (expected != cache); {REBUILD_HINT} or point to the right cache"
        )


def check_fields(
    directory: Path, expected: Sequence[FieldSpec], actual: Sequence[FieldSpec]
) -> None:
    if tuple(expected) != tuple(actual):
        want = [f.to_json() for f in expected]
        have = [f.to_json() for f in actual]
        raise CacheMismatchError(
            f"embedding cache {directory} stores other fields: expected {want}, the cache has "
            f"{have}; {REBUILD_HINT} or point to the right cache"
        )


def read_header(directory: Path) -> CacheHeader:
    path = directory / HEADER_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheCorruptError(
            f"{directory} is not an embedding cache (no {HEADER_NAME}); create it with "
            "`cnet-train embed`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheCorruptError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise CacheCorruptError(f"{path} is not an embedding cache header (format {CACHE_FORMAT})")
    if data.get("version") != CACHE_VERSION:
        raise CacheMismatchError(
            f"embedding cache {directory} has format version {data.get('version')}, this "
            f"cnet-data reads version {CACHE_VERSION}; {REBUILD_HINT}"
        )
    try:
        fields = tuple(FieldSpec.from_json(f) for f in data["fields"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheCorruptError(f"{path} has no valid field list: {exc!r}") from None
    fingerprint = data.get("fingerprint")
    if not isinstance(fingerprint, dict):
        raise CacheCorruptError(f"{path} has no fingerprint object")
    return CacheHeader(fingerprint=fingerprint, fields=fields)


def ensure_header(directory: Path, header: CacheHeader) -> None:
    """Create `header.json` unless it exists, then check the one on disk matches `header`.

    Several ranks may get here at once. The header is published with a hard link, which fails
    when the name exists, so the first writer wins and every other one (even one that raced
    it) compares against the winner: two ranks with different encoders cannot both succeed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / HEADER_NAME
    if not path.exists():
        publish_once(path, header.to_json().encode("utf-8"))
    on_disk = read_header(directory)
    check_fingerprint(directory, header.fingerprint, on_disk.fingerprint)
    check_fields(directory, header.fields, on_disk.fields)
