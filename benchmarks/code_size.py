"""Code size per package: files, lines, functions, the median and longest functions.

Reads each package's `src/` with `ast` (nothing is imported), so it runs anywhere the
repository is checked out. A function's length is its line span, decorators and docstring
included; nested functions count on their own as well as inside their parent.

    python benchmarks/code_size.py [--top 5] [--json]
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cnet-data", "cnet-models", "cnet-train")


@dataclass(frozen=True)
class Function:
    """One function or method: where it is and how many lines it spans."""

    where: str
    lines: int


@dataclass(frozen=True)
class PackageSize:
    """The figures for one package's source tree."""

    name: str
    files: int
    lines: int
    largest_file: tuple[str, int]
    functions: list[Function]

    @property
    def median_function(self) -> float:
        return statistics.median(f.lines for f in self.functions) if self.functions else 0.0


def _functions(path: Path, label: str) -> list[Function]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            end = node.end_lineno or node.lineno
            found.append(Function(f"{label}:{node.name}", end - first + 1))
    return found


def measure(package: str) -> PackageSize:
    """Files, lines and functions of `packages/<package>/src` (stub files excluded)."""
    src = ROOT / "packages" / package / "src"
    files = sorted(src.rglob("*.py"))
    sizes = {p: len(p.read_text().splitlines()) for p in files}
    functions = [f for p in files for f in _functions(p, p.relative_to(src).as_posix())]
    largest = max(sizes, key=lambda p: sizes[p])
    return PackageSize(
        name=package,
        files=len(files),
        lines=sum(sizes.values()),
        largest_file=(largest.relative_to(src).as_posix(), sizes[largest]),
        functions=functions,
    )


def _report(size: PackageSize, top: int) -> dict[str, object]:
    longest = sorted(size.functions, key=lambda f: -f.lines)[:top]
    return {
        "package": size.name,
        "files": size.files,
        "lines": size.lines,
        "functions": len(size.functions),
        "median_function_lines": size.median_function,
        "largest_file": {"path": size.largest_file[0], "lines": size.largest_file[1]},
        "longest_functions": [{"function": f.where, "lines": f.lines} for f in longest],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=5, help="longest functions to list")
    parser.add_argument("--json", action="store_true", help="one JSON document instead")
    args = parser.parse_args()
    reports = [_report(measure(p), args.top) for p in PACKAGES]
    if args.json:
        print(json.dumps(reports, indent=2))
        return
    for r in reports:
        largest = r["largest_file"]
        assert isinstance(largest, dict)
        print(
            f"{r['package']}: {r['files']} files, {r['lines']} lines, {r['functions']} "
            f"functions (median {r['median_function_lines']} lines); largest file "
            f"{largest['path']} ({largest['lines']} lines)"
        )
        longest = r["longest_functions"]
        assert isinstance(longest, list)
        for f in longest:
            print(f"    {f['lines']:4d}  {f['function']}")


if __name__ == "__main__":
    main()
