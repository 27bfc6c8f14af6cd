"""Reading JSON Lines manifests defensively: every line parsed alone, every failure named.

A manifest is user input of any quality, so one bad line must cost that line, not the whole
manifest, and no line may crash the scan. Each line is read as bytes (at most
`MAX_LINE_BYTES`), decoded as strict UTF-8 (a byte-order mark on the first line is accepted),
checked for NUL bytes and for nesting deeper than `MAX_DEPTH` (before parsing, since a deeply
nested line would overflow the parser's recursion), then parsed with duplicate keys refused.
Blank lines are ignored and CRLF line endings work. A file whose first line opens a JSON array
that spans the file is read as one JSON document (the ControlNet tutorial's other layout).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import attrs

MAX_LINE_BYTES = 1 << 20
"""The longest manifest line read; a record of paths and a caption needs a small fraction."""
MAX_DEPTH = 32
"""The deepest nesting of arrays and objects a manifest line may have."""
_BOM = b"\xef\xbb\xbf"
_READ_CHUNK = 1 << 16
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_SHOWN_CHARS = 60


@attrs.frozen
class Record:
    """One manifest entry: `value` is what the line held, `problem` why it cannot be used."""

    where: str
    """`manifest.jsonl:12` for a line, `manifest.json[3]` for an item of a JSON array."""
    value: object = None
    problem: str | None = None


@attrs.define
class LineCount:
    """What the reader went through, for the report when nothing usable came out."""

    lines: int = 0
    blank: int = 0


def read_records(path: Path, count: LineCount | None = None) -> Iterator[Record]:
    """Every non-blank entry of the manifest at `path`, a problem per unusable one."""
    count = count if count is not None else LineCount()
    with open(path, "rb") as fh:
        if _is_one_document(fh):
            yield from _document_records(path, fh.read(), count)
            return
        for number, line in enumerate(_lines(fh), start=1):
            count.lines += 1
            record = _line_record(f"{path.name}:{number}", line, first=number == 1)
            if record is None:
                count.blank += 1
            else:
                yield record


def _lines(fh: IO[bytes]) -> Iterator[bytes | int]:
    """Each line without its end; the length, instead, of a line over `MAX_LINE_BYTES`."""
    while line := fh.readline(MAX_LINE_BYTES + 1):
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            yield len(line) + _skip_rest_of_line(fh)
        else:
            yield line.rstrip(b"\n")


def _skip_rest_of_line(fh: IO[bytes]) -> int:
    skipped = 0
    while chunk := fh.readline(_READ_CHUNK):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _is_one_document(fh: IO[bytes]) -> bool:
    """Whether the file is one JSON array: its first line opens an array that runs past the
    line's end, or a one-line array is all the file holds. Otherwise it is JSON Lines, and a
    first line that merely holds an array is one bad line."""
    try:
        lines = (line for line in _lines(fh) if isinstance(line, int) or line.strip())
        first = next(lines, None)
        if not isinstance(first, bytes):
            return False
        try:
            text = first.removeprefix(_BOM).decode("utf-8").strip()
        except UnicodeDecodeError:
            return False
        if not text.startswith("[") or too_deep(text):
            return False
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return exc.pos >= len(text)  # the array goes on past this line
        except ValueError:
            return False
        return next(lines, None) is None
    finally:
        fh.seek(0)


def _line_record(where: str, line: bytes | int, *, first: bool) -> Record | None:
    """The record of one line, or None for a blank line."""
    if isinstance(line, int):
        return Record(
            where,
            problem=f"line is {line} bytes long, more than the {MAX_LINE_BYTES} a line may be",
        )
    try:
        text = line.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        return Record(
            where,
            problem=f"not valid UTF-8: byte 0x{line[exc.start]:02x} at column {exc.start + 1}",
        )
    if not text.strip():
        return None
    value, problem = parse_json(text)
    if problem is None and not isinstance(value, dict):
        problem = f"expected a JSON object, got {json_type(value)} {shorten(text.strip())}"
    return Record(where, value, problem)


def parse_json(text: str) -> tuple[object, str | None]:
    """(value, None), or (None, why `text` is not JSON a manifest may hold)."""
    if "\x00" in text:
        return None, f"holds a NUL byte at column {text.index(chr(0)) + 1}"
    if too_deep(text):
        return None, f"nests arrays or objects more than {MAX_DEPTH} levels deep"
    try:
        return json.loads(text, object_pairs_hook=_unique_keys), None
    except _DuplicateKeyError as exc:
        return None, str(exc)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} at column {exc.colno}"
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        return None, f"not usable JSON: {exc}"


def too_deep(text: str) -> bool:
    """Whether arrays and objects nest more than `MAX_DEPTH` deep in `text`.

    Brackets inside strings do not count. Counting brackets first keeps the common case (a
    flat record) at C speed; only a line with many brackets is walked.
    """
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    depth = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_DEPTH:
            return True
    return False


class _DuplicateKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """An object's keys, refusing a repeated one: which value was meant cannot be known."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(f"key {key!r} appears more than once in one object")
        result[key] = value
    return result


def _document_records(path: Path, data: bytes, count: LineCount) -> Iterator[Record]:
    """The items of a manifest that is one JSON array; one problem if the array is broken."""
    count.lines = data.count(b"\n") + (not data.endswith(b"\n"))
    items = _parse_document(data)
    if isinstance(items, tuple):
        line, reason = items
        yield Record(f"{path.name}:{line}", problem=f"{reason} (so the whole array is lost)")
        return
    for i, item in enumerate(items):
        bad = None if isinstance(item, dict) else f"expected a JSON object, got {json_type(item)}"
        yield Record(f"{path.name}[{i}]", item, bad)


def _parse_document(data: bytes) -> list[object] | tuple[int, str]:
    """The array's items, or (line, reason) saying where and why it does not parse."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return data[: exc.start].count(b"\n") + 1, "not valid UTF-8"
    if "\x00" in text:
        return text[: text.index("\x00")].count("\n") + 1, "holds a NUL byte"
    if too_deep(text):
        return 1, f"nests arrays or objects more than {MAX_DEPTH} levels deep"
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        return exc.lineno, f"not a valid JSON array: {exc.msg} at column {exc.colno}"
    except (ValueError, RecursionError) as exc:
        return 1, f"not a usable JSON array: {exc}"
    return value if isinstance(value, list) else (1, f"a JSON {json_type(value)}, not an array")


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def shorten(text: str) -> str:
    """`text` cut to a length a report line can hold."""
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."
