"""What the per-assignment harness tests share: a notebook variant (answer cells replaced, and optionally every
in-kernel verdict forged from the first answer cell on), one grading run for a set of variants, and their scores."""
from pathlib import Path

import nbformat

from llmsys_lab import grading
from test_grading_redteam import FORGE_COMPLETION

ROOT = Path(__file__).resolve().parent.parent


def variant(path, answers=None, forge=False) -> nbformat.NotebookNode:
    """The notebook at path with answer cells replaced ({grade id: source}); forge: FORGE_COMPLETION appended to
    its first answer cell, so every failing in-kernel test after it looks passed."""
    nb = nbformat.read(path, as_version=4)
    first = True
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade_id") in (answers or {}):
            cell.source = answers[meta["grade_id"]]
        if forge and first and meta.get("solution"):
            cell.source += "\n" + FORGE_COMPLETION
            first = False
    return nb


def grade_variants(folder: Path, books: dict) -> dict:
    """{name: Submission} for {name: notebook}, graded in one run of the kit's grader (two at a time)."""
    for name, nb in books.items():
        nbformat.write(nb, folder / f"{name}.ipynb")
    subs = grading.grade([folder / f"{n}.ipynb" for n in books], source=ROOT / "solutions", timeout=300, jobs=2)
    return {Path(s.path).stem: s for s in subs}


def scores(sub) -> dict:
    return {t.test: (t.points, t.feedback) for t in sub.tests}


def assert_full_marks_and_zero(graded: dict, spec) -> None:
    """The solution and a correct alternative score 10/10, the stub 0/10, and every graded test has a judge."""
    for name, want in (("solution", 10), ("stub", 0), ("alternative", 10)):
        sub = graded[name]
        assert sub.error is None, sub.error
        assert (sub.score, sub.max_score) == (want, 10), (name, scores(sub))
    assert set(scores(graded["solution"])) == set(spec.judge)


def assert_the_harness_took_every_point(sub) -> None:
    """A notebook that forged every in-kernel verdict scores 0, and what refused each test is the harness."""
    assert sub.error is None, sub.error
    assert (sub.score, sub.max_score) == (0, 10), scores(sub)
    assert all(t.feedback.startswith("the grader's own check of your outputs failed") for t in sub.tests), scores(sub)
