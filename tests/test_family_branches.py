"""No module outside the family specs branches on a family: a new family is one new spec.

An AST scan of every module under packages/*/src but the spec modules (`families.py`,
`family_*.py`) for (a) a comparison or `case` against a registered family's name and (b) a
condition (`if`, conditional expression, `while`, `and` / `or` operand, comprehension filter,
`match` subject) that reads a family-behaviour attribute of the spec. Either is a family branch
that belongs in a spec method.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnet_models.families import registered_families

ROOT = Path(__file__).parents[1]
BEHAVIOUR_ATTRIBUTES = frozenset(
    {
        # The former booleans of `Family`, and what a spec answers that differs by family.
        "added_conditioning",
        "uses_penultimate_hidden_state",
        "zeros_for_empty_prompt",
        "upcast_attention_in_half",
        "has_projection",
        "hidden_state",
        "pipeline_zeros",
        "linear_projection",
    }
)
_EQUALITY = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)


def _is_spec_module(path: Path) -> bool:
    return path.parent.name == "cnet_models" and (
        path.name == "families.py" or path.name.startswith("family_")
    )


def _names_in(node: ast.expr, names: frozenset[str]) -> list[str]:
    """The family names `node` is, or holds as a tuple / list / set display."""
    items = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and i.value in names]


def _conditions(tree: ast.AST) -> Iterator[ast.expr]:
    """Every expression that decides which way the code goes."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If | ast.IfExp | ast.While):
            yield node.test
        elif isinstance(node, ast.BoolOp):
            yield from node.values
        elif isinstance(node, ast.comprehension):
            yield from node.ifs
        elif isinstance(node, ast.Match):
            yield node.subject
        elif isinstance(node, ast.match_case) and node.guard is not None:
            yield node.guard


def family_branches(source: str, names: frozenset[str], where: str = "<source>") -> list[str]:
    """`where:line: what` for each family branch in `source`."""
    tree = ast.parse(source)
    found: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, _EQUALITY) for op in node.ops):
            for operand in (node.left, *node.comparators):
                for name in _names_in(operand, names):
                    found.add((node.lineno, f"compares with the family name {name!r}"))
        elif isinstance(node, ast.MatchValue):
            for name in _names_in(node.value, names):
                found.add((node.lineno, f"matches the family name {name!r}"))
    for condition in _conditions(tree):
        for node in ast.walk(condition):
            if isinstance(node, ast.Attribute) and node.attr in BEHAVIOUR_ATTRIBUTES:
                found.add((node.lineno, f"branches on .{node.attr}"))
    return [f"{where}:{line}: {what}" for line, what in sorted(found)]


def _registered_names() -> frozenset[str]:
    return frozenset(spec.name for spec in registered_families())


def test_no_module_outside_the_specs_branches_on_a_family() -> None:
    modules = sorted(ROOT.glob("packages/*/src/**/*.py"))
    assert len(modules) > 30  # the scan really reads the packages
    names = _registered_names()
    found = [
        finding
        for path in modules
        if not _is_spec_module(path)
        for finding in family_branches(
            path.read_text(encoding="utf-8"), names, str(path.relative_to(ROOT))
        )
    ]
    assert not found, "family branches outside the specs:\n" + "\n".join(found)


BRANCHY = """\
if family.added_conditioning:
    pass
size = 768 if name == "sd21" else 512
text = spec.hidden_state or "last"
wanted = [s for s in specs if s.zeros_for_empty_prompt]
if name not in ("sd15", "other"):
    pass
match name:
    case "sdxl":
        pass
while model.family.uses_penultimate_hidden_state:
    break
"""
CLEAN = """\
added = family.added_conditioning(text, sizes, crops, sizes)
names = ("sd15", "sd21")
default = "sdxl"
if spec.name:
    pass
print(family.hidden_state)
"""


@pytest.mark.parametrize(
    ("source", "lines"),
    [(BRANCHY, [1, 3, 4, 5, 6, 9, 11]), (CLEAN, [])],
    ids=["branchy", "clean"],
)
def test_the_scan_flags_branches_and_only_branches(source: str, lines: list[int]) -> None:
    found = family_branches(source, _registered_names(), "x.py")
    assert [int(f.split(":")[1]) for f in found] == lines, found
    assert all(f.startswith("x.py:") for f in found)


def test_the_spec_modules_are_the_ones_left_out() -> None:
    left_out = sorted(p.name for p in ROOT.glob("packages/*/src/**/*.py") if _is_spec_module(p))
    assert left_out == ["families.py", "family_sd.py", "family_sdxl.py"]
