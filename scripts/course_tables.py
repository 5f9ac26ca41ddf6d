#!/usr/bin/env python3
"""Write the tables of lessons from the course manifest (llmsys_lab/course.py).

    python scripts/course_tables.py            # rewrite the README's tables and lesson 00's table
    python scripts/course_tables.py --check    # exit 1 if any of them is out of date (tests/test_course.py)
    make course-tables                         # the same as the first line

Each table sits between two markers, ``<!-- course-NAME:start -->`` and ``<!-- course-NAME:end -->``:
the README's ``lessons`` and ``assignments`` tables, and the ``lessons`` table in lesson 00's first
markdown cell (a markdown cell: nbval compares no markdown, so the stored outputs stay valid). Only
what lies between the markers is rewritten.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from llmsys_lab import course

ORIENTATION = 0                                     # the lesson whose first page lists the others


def markers(name: str) -> tuple[str, str]:
    return f"<!-- course-{name}:start -->", f"<!-- course-{name}:end -->"


def _cell(text: str) -> str:
    if "|" in text.replace("\\|", "") or "\n" in text:
        raise ValueError(f"a table cell may hold neither '|' nor a line break: {text!r}")
    return text


def readme_lessons(lessons) -> str:
    rows = ["| notebook | topic | lecture |", "| --- | --- | --- |"]
    for x in lessons:
        name = f"pending/{x.slug}" if x.pending else x.slug
        rows.append(f"| `{name}` | {_cell(x.topic)} | {_cell(x.lectures)} |")
    return "\n".join(rows)


def readme_assignments(lessons) -> str:
    rows = ["| assignment | students implement | graded tests (points) |", "| --- | --- | --- |"]
    for x in lessons:
        if x.assignment:
            rows.append(f"| `{x.assignment_name}` | {_cell(x.implements)} | {_cell(x.graded)} |")
    return "\n".join(rows)


def orientation_lessons(lessons) -> str:
    rows = ["| lesson | topic | what you build | lecture |", "| --- | --- | --- | --- |"]
    for x in lessons:
        title = f"{x.title} (in `notebooks/pending/`)" if x.pending else x.title
        rows.append(f"| {x.number:02d} | {_cell(title)} | {_cell(x.builds)} | {_cell(x.lectures)} |")
    return "\n".join(rows)


def replace_between(text: str, name: str, table: str, where: str) -> str:
    start, end = markers(name)
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{where}: needs exactly one {start} ... {end} block")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{table}\n{end}{rest.split(end, 1)[1]}"


def run(root: Path = ROOT, check: bool = False, lessons=None) -> list[str]:
    """Update (or, with check, only list) the files whose tables are out of date."""
    import nbformat

    lessons = course.LESSONS if lessons is None else lessons
    stale = []
    readme = root / "README.md"
    text = readme.read_text()
    new = replace_between(text, "lessons", readme_lessons(lessons), "README.md")
    new = replace_between(new, "assignments", readme_assignments(lessons), "README.md")
    if new != text:
        stale.append("README.md")
        if not check:
            readme.write_text(new)
    first = course.lesson(ORIENTATION, lessons)
    path = root / first.notebook
    before = path.read_text()
    nb = nbformat.reads(before, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "markdown" and markers("lessons")[0] in c.source]
    if len(cells) != 1:
        raise SystemExit(f"{first.notebook}: needs one markdown cell with the {markers('lessons')[0]} block")
    cells[0].source = replace_between(cells[0].source, "lessons", orientation_lessons(lessons), first.notebook)
    after = nbformat.writes(nb) + "\n"
    if after != before:
        stale.append(first.notebook)
        if not check:
            path.write_text(after)
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a table is out of date")
    ap.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    stale = run(args.root, args.check)
    for rel in stale:
        print(("out of date: " if args.check else "updated: ") + rel)
    if args.check and stale:
        print("run: python scripts/course_tables.py (make course-tables)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
