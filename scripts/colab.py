#!/usr/bin/env python3
"""Google Colab: an "Open in Colab" badge and an install cell in every lesson and assignment.

    python scripts/colab.py            # update notebooks/, solutions/ and the README's Colab table
    python scripts/colab.py --check    # exit 1 if any of them is out of date
    make assignments                   # then carry the cells from solutions/ into assignments/

Each notebook gets, idempotently (re-running updates them in place, found by their cell ids):

* a markdown cell ``colab-badge`` at the top: the badge, linking to this notebook in the repository
  at the tag of the kit's version (assignments link to the student notebook in assignments/);
* a set-up block at the top of the notebook's first code cell (the one that imports the kit): on
  Colab (``"google.colab" in sys.modules``) it pip-installs the kit from the repository at that tag;
  anywhere else it does nothing and prints nothing. It goes into the existing cell rather than a new
  one so the stored reference outputs, and their execution counts, stay valid without a re-run.

The repository address is read from pyproject.toml's ``[project.urls] Repository`` and the version
from ``[project] version``: bump the version (and push the tag ``v<version>``), re-run this script.
While the address is still the placeholder the project ships (PLACEHOLDER), the links would 404, so
writing them is refused unless ``--allow-placeholder`` says so; ``--check`` only compares.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
BADGE_ID = "colab-badge"
SETUP_START = "# On Google Colab: install the kit"
SETUP_END = "# (end of the Colab set-up)"
README_START, README_END = "<!-- colab-links:start -->", "<!-- colab-links:end -->"
BADGE_SVG = "https://colab.research.google.com/assets/colab-badge.svg"
PLACEHOLDER = "https://github.com/llmsys-lab/llmsys-lab"   # pyproject.toml's address until a fork sets its own


def project(root: Path = ROOT) -> tuple[str, str]:
    """(repository URL without a trailing slash, version) from pyproject.toml."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    url = meta.get("urls", {}).get("Repository", "").rstrip("/")
    m = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+?)(\.git)?", url)
    if not m:
        raise SystemExit(f"pyproject.toml [project.urls] Repository must be https://github.com/OWNER/NAME, got {url!r}")
    return f"https://github.com/{m.group(1)}/{m.group(2)}", meta["version"]


def colab_url(repo: str, version: str, rel_path: str) -> str:
    return f"https://colab.research.google.com/github/{repo.removeprefix('https://github.com/')}/blob/v{version}/{rel_path}"


def student_path(rel: str) -> str:
    """Where a notebook opens for students: assignments/ for an assignment's solutions/ source."""
    return "assignments/" + rel.removeprefix("solutions/") if rel.startswith("solutions/") else rel


def badge_source(repo: str, version: str, rel: str) -> str:
    return f"[![Open In Colab]({BADGE_SVG})]({colab_url(repo, version, student_path(rel))})"


def setup_source(repo: str, version: str) -> str:
    spec = f"llmsys-lab @ git+{repo}@v{version}"
    return (f"{SETUP_START} (version {version}) first; anywhere else this block does nothing.\n"
            "import sys\n"
            "\n"
            "if \"google.colab\" in sys.modules:\n"
            "    import subprocess\n"
            "\n"
            f"    subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"-q\", {spec!r}], check=True)\n"
            f"{SETUP_END}\n")


def notebooks(root: Path = ROOT, lessons=None) -> list[Path]:
    """Every lesson, then every assignment's source, in the course manifest's order."""
    from llmsys_lab import course

    return course.lesson_notebooks(lessons, root) + course.solution_notebooks(lessons, root)


def _cell(nb, cell_id: str, make):
    """The notebook's cell with this id, its content refreshed (a new cell if it has none); removed
    from the list so the caller can put it where it belongs."""
    for i, cell in enumerate(nb.cells):
        if cell.get("id") == cell_id:
            old = nb.cells.pop(i)
            new = make()
            old.source = new.source
            if old.cell_type == "code":
                old.outputs, old.execution_count = [], None
            return old
    cell = make()
    cell["id"] = cell_id
    return cell


def without_setup(source: str) -> str:
    """A first code cell's own source, without the set-up block (if it has one)."""
    if source.startswith(SETUP_START) and SETUP_END in source:
        return source.split(SETUP_END, 1)[1].lstrip("\n")
    return source


def updated(nb, repo: str, version: str, rel: str):
    """The notebook with its badge cell first and the set-up block atop its first code cell."""
    badge = _cell(nb, BADGE_ID, lambda: nbformat.v4.new_markdown_cell(badge_source(repo, version, rel)))
    nb.cells.insert(0, badge)
    first = next((c for c in nb.cells if c.cell_type == "code"), None)
    if first is None:
        raise SystemExit(f"{rel}: no code cell to put the Colab set-up in")
    first.source = setup_source(repo, version) + "\n" + without_setup(first.source)
    return nb


def readme_table(repo: str, version: str, paths: list[Path], root: Path = ROOT) -> str:
    rows = ["| notebook | open in Colab |", "| --- | --- |"]
    for p in paths:
        rel = student_path(p.relative_to(root).as_posix())
        rows.append(f"| `{rel}` | [![Open In Colab]({BADGE_SVG})]({colab_url(repo, version, rel)}) |")
    return "\n".join([README_START, *rows, README_END])


def update_readme(text: str, table: str) -> str:
    if README_START not in text or README_END not in text:
        raise SystemExit(f"README.md has no {README_START} ... {README_END} block to update")
    head, rest = text.split(README_START, 1)
    return head + table + rest.split(README_END, 1)[1]


class PlaceholderRepository(SystemExit):
    """The Colab links would point at the placeholder repository (they 404 until a fork sets its own)."""


def run(root: Path = ROOT, check: bool = False, allow_placeholder: bool = False, lessons=None) -> list[str]:
    """Update (or, with check, only list) what is out of date; returns the paths concerned."""
    repo, version = project(root)
    if repo == PLACEHOLDER and not check and not allow_placeholder:
        raise PlaceholderRepository(
            f"pyproject.toml's [project.urls] Repository is still the placeholder {PLACEHOLDER}: Colab links to it "
            "404. Set it to your copy's https://github.com/OWNER/NAME, push the tag v" + version +
            ", then run `make colab` again (or `make colab ALLOW_PLACEHOLDER=1` to write the placeholder links anyway).")
    stale = []
    paths = notebooks(root, lessons)
    for path in paths:
        rel = path.relative_to(root).as_posix()
        before = path.read_text()
        nb = updated(nbformat.reads(before, as_version=4), repo, version, rel)
        after = nbformat.writes(nb) + "\n"
        if after != before:
            stale.append(rel)
            if not check:
                path.write_text(after)
    readme = root / "README.md"
    text = readme.read_text()
    new = update_readme(text, readme_table(repo, version, paths, root))
    if new != text:
        stale.append("README.md")
        if not check:
            readme.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a notebook or the README is out of date")
    ap.add_argument("--allow-placeholder", action="store_true",
                    help="write links even though the repository address is the placeholder (they will 404)")
    ap.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    stale = run(args.root, args.check, args.allow_placeholder)
    for rel in stale:
        print(("out of date: " if args.check else "updated: ") + rel)
    if args.check and stale:
        print("run: python scripts/colab.py && make assignments")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
