#!/usr/bin/env python3
"""The measured tables of the README and docs/measurements.md, copied from the benchmarks' own results
files, never typed.

A block in either page

    <!-- table: benchmarks/results/end_to_end.md 1 -->
    | variant | wall clock (s) | ...
    <!-- end table -->

holds table 1 (counting from 1) of that results file exactly as the benchmark wrote it. After a
benchmark run, `python benchmarks/readme.py` rewrites every block of both pages from its file; `--check`
changes nothing and lists the blocks that differ (exit 1), which is what Testing/test_readme_tables.py
asserts.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = (ROOT / "README.md", ROOT / "docs" / "measurements.md")
sys.path.insert(0, str(ROOT))  # the ddm4d beside this script

from ddm4d import files  # noqa: E402

BLOCK = re.compile(r"^<!-- table: (?P<path>\S+) (?P<number>\d+) -->\n(?P<body>.*?)^<!-- end table -->$",
                   re.MULTILINE | re.DOTALL)


class TableError(ValueError):
    """A block names a results file or table that is not there."""


def tables(markdown: str) -> list[str]:
    """Every table of a markdown text (a run of lines starting with '|'), each with its final newline."""
    found, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append("\n".join(current) + "\n")
            current = []
    if current:
        found.append("\n".join(current) + "\n")
    return found


def table_of(path: str, number: int, root: Path = ROOT) -> str:
    file = root / path
    if not file.is_file():
        raise TableError(f"a table block names {path}, which does not exist; run the benchmark that writes it")
    found = tables(file.read_text(encoding="utf-8"))
    if not 1 <= number <= len(found):
        raise TableError(f"a table block asks for table {number} of {path}, which has {len(found)}")
    return found[number - 1]


def render(readme: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """README text with every block filled from its results file, and the blocks that changed."""
    changed = []

    def fill(match: re.Match) -> str:
        path, number = match["path"], int(match["number"])
        body = table_of(path, number, root)
        if body != match["body"]:
            changed.append(f"{path} table {number}")
        return f"<!-- table: {path} {number} -->\n{body}<!-- end table -->"

    return BLOCK.sub(fill, readme), changed


def blocks(readme: str) -> list[tuple[str, int]]:
    return [(m["path"], int(m["number"])) for m in BLOCK.finditer(readme)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a block differs")
    parser.add_argument("--readme", action="append", metavar="PAGE",
                        help="a page to fill (repeatable; default: README.md and docs/measurements.md)")
    args = parser.parse_args(argv)
    pages = [Path(p) for p in args.readme] if args.readme else list(PAGES)
    differs = False
    for page in pages:
        try:
            text, changed = render(page.read_text(encoding="utf-8"))
        except TableError as err:
            print(f"readme.py: error: {page.name}: {err}", file=sys.stderr)
            return 2
        if args.check:
            for name in changed:
                print(f"{page.name}: the table from {name} differs from its results file")
            differs = differs or bool(changed)
            continue
        if changed:
            files.write_text(page, text)
        print(f"{page.name}: {len(blocks(text))} tables from results files, {len(changed)} rewritten")
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
