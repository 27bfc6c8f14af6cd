"""The YAML reader of config files and `--set` values: PyYAML's safe loader, bounded.

A config is a few hundred values at most, a handful of levels deep, each key given once. The
plain safe loader accepts inputs far from that which then fail badly further on: a list nested
5000 deep ends in a `RecursionError`; a "billion laughs" file (aliases of aliases) loads as a
small graph of shared lists that every later copy or walk expands exponentially; and a key given
twice silently keeps the last value. `BoundedLoader` refuses all three while it composes the
document, with the dotted key path and the line, before any value is constructed.
"""

from __future__ import annotations

from typing import Any

import yaml
from typing_extensions import override
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_DEPTH = 64
"""Deepest nesting of lists and mappings accepted (a config needs about five)."""
MAX_NODES = 100_000
"""Most values (scalars, lists and mappings, aliases counted as the copies they stand for) in
one document: room for thousands of validation prompts, far below what hurts."""
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YAMLLimitError(yaml.YAMLError):
    """A document that breaks one of the bounds, or gives a key twice; `key` is the dotted path
    of the offending value (empty at the top level) and `reason` says what is wrong."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key or '(top level)'}: {reason}")
        self.key = key
        self.reason = reason


class BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` with a depth bound, an expanded-size bound and no duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._path: list[str | int | None] = []
        self._count = 0
        # Expanded size of each finished node (by id: nodes live as long as the document), so
        # that an alias counts as the values it repeats without walking them again.
        self._sizes: dict[int, int] = {}
        # Per mapping node: key (tag, text) -> line where it was first given.
        self._keys: dict[int, dict[tuple[str, str], int]] = {}

    @override
    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        """Compose one node as PyYAML does, counting and checking it on the way."""
        self._path.append(_segment(parent, index))
        try:
            if len(self._path) > MAX_DEPTH:
                self._fail(f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(parent, MappingNode) and isinstance(index, ScalarNode):
                self._check_duplicate(parent, index)
            return self._counted(parent, index)
        finally:
            self._path.pop()

    def _counted(self, parent: Node | None, index: Any) -> Node | None:
        """The node, with the running count of expanded values updated and bounded."""
        if self.check_event(yaml.AliasEvent):
            event: Any = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._sizes:
                self._fail("refers to an anchor that contains it (a recursive alias)")
            alias = super().compose_node(parent, index)
            self._add(self._sizes[id(alias)])
            return alias
        before = self._count
        self._add(1)
        node = super().compose_node(parent, index)
        self._sizes[id(node)] = self._count - before
        return node

    def _add(self, size: int) -> None:
        self._count += size
        if self._count > MAX_NODES:
            self._fail(
                f"the document expands to more than {MAX_NODES} values "
                "(aliases count as copies of what they repeat)"
            )

    def _check_duplicate(self, mapping: MappingNode, key: ScalarNode) -> None:
        if key.tag == _MERGE_TAG:
            return  # `<<: *defaults` merges keys that explicit ones may override
        seen = self._keys.setdefault(id(mapping), {})
        line = key.start_mark.line + 1
        first = seen.get((key.tag, key.value))
        if first is not None:
            self._fail(f"key given twice (line {first} and line {line}); keep one")
        seen[(key.tag, key.value)] = line

    def _fail(self, reason: str) -> None:
        raise YAMLLimitError(dotted(self._path), reason)


def _segment(parent: Node | None, index: Any) -> str | int | None:
    """The path segment of a node: its key in a mapping, its position in a list; None for a
    mapping's key itself and for the document root."""
    if isinstance(parent, MappingNode) and isinstance(index, ScalarNode):
        return str(index.value)
    if isinstance(parent, SequenceNode) and isinstance(index, int):
        return index
    return None


def dotted(path: list[str | int | None], limit: int = 8) -> str:
    """`a.b[2].c` for a path, shortened to its first `limit` segments (a path 5000 deep would
    otherwise fill the screen)."""
    parts = [p for p in path if p is not None]
    text = ""
    for part in parts[:limit]:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text + ("..." if len(parts) > limit else "")


def load_yaml(text: str) -> Any:
    """The one document in `text`, read with `BoundedLoader`; raises `yaml.YAMLError`."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
