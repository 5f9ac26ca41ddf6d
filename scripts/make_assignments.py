"""Generate the student notebooks in assignments/ from the instructor notebooks in solutions/.

    python scripts/make_assignments.py            # (re)write assignments/
    python scripts/make_assignments.py --check    # exit 1 if assignments/ is out of date

solutions/<assignment>/<notebook>.ipynb is nbgrader's source format (solution regions between
### BEGIN SOLUTION / ### END SOLUTION, graded test cells, ### BEGIN HIDDEN TESTS regions). The
student version goes through the preprocessors of `nbgrader generate_assignment`, in its order,
minus the two that need its database (SaveCells) or a course header (IncludeHeaderFooter):
locked cells are locked, solutions become `raise NotImplementedError()` stubs, outputs are
cleared, hidden tests are removed and checksums are recorded. The result is what
`nbgrader generate_assignment` releases (tests/test_grading.py compares the two).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS, ASSIGNMENTS = ROOT / "solutions", ROOT / "assignments"


def preprocessors() -> list:
    from nbgrader.preprocessors import (CheckCellMetadata, ClearHiddenTests, ClearMarkScheme, ClearOutput,
                                        ClearSolutions, ComputeChecksums, LockCells)

    # generate_assignment's list: IncludeHeaderFooter, InstantiateTests, LockCells, ClearSolutions, ClearOutput,
    # CheckCellMetadata, ComputeChecksums, SaveCells, ClearHiddenTests, ClearMarkScheme, ComputeChecksums,
    # CheckCellMetadata. InstantiateTests only acts on "### AUTOTEST" cells, which these notebooks do not use.
    return [LockCells(), ClearSolutions(), ClearOutput(), CheckCellMetadata(), ComputeChecksums(),
            ClearHiddenTests(), ClearMarkScheme(), ComputeChecksums(), CheckCellMetadata()]


def source_notebooks(solutions: Path = SOLUTIONS) -> list[Path]:
    return sorted(p for p in solutions.glob("*/*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def student_version(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    import copy

    nb = copy.deepcopy(nb)
    resources: dict = {}
    for pre in preprocessors():
        nb, resources = pre.preprocess(nb, resources)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def build(solutions: Path = SOLUTIONS) -> dict[Path, str]:
    """{path relative to assignments/: text of the student notebook}."""
    out = {}
    for path in source_notebooks(solutions):
        out[path.relative_to(solutions)] = render(student_version(nbformat.read(path, as_version=4)))
    return out


def stale(solutions: Path = SOLUTIONS, assignments: Path = ASSIGNMENTS) -> list[str]:
    """What `make assignments` would change: missing, outdated or extra notebooks."""
    want = build(solutions)
    problems = []
    for rel, text in want.items():
        target = assignments / rel
        if not target.exists():
            problems.append(f"missing: assignments/{rel}")
        elif target.read_text() != text:
            problems.append(f"out of date: assignments/{rel}")
    for path in sorted(assignments.glob("*/*.ipynb")):
        if path.relative_to(assignments) not in want and ".ipynb_checkpoints" not in path.parts:
            problems.append(f"no source in solutions/: assignments/{path.relative_to(assignments)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether assignments/ is up to date")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale()
        for p in problems:
            print(p)
        if problems:
            print("run `make assignments` to regenerate assignments/ from solutions/")
        return 1 if problems else 0
    for rel, text in build().items():
        target = ASSIGNMENTS / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
            print(f"wrote assignments/{rel}")
    for extra in stale():
        if extra.startswith("no source"):
            print(f"warning: {extra} (remove it by hand if the assignment was dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
