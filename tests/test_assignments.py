"""The assignments: solutions/ (instructor source) and assignments/ (generated student notebooks).

* every graded test passes on the solution notebook, whose other cells (self-checks, bonus) run cleanly;
* every graded test fails on the untouched student notebook, because of the stubs;
* assignments/ is exactly what `make assignments` generates from solutions/;
* the notebooks follow nbgrader's format (solution regions, points, hidden tests).

All twelve notebooks are executed once per session: the solutions in-process through
``llmsys_lab.grading``, the student notebooks at the same time through the command line.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from llmsys_lab import grading

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS, ASSIGNMENTS = ROOT / "solutions", ROOT / "assignments"
NAMES = sorted(p.relative_to(SOLUTIONS).as_posix() for p in SOLUTIONS.glob("*/*.ipynb"))
TIMEOUT = "300"          # per cell; the slowest cell (Triton interpreter) takes a few seconds


def load_script():
    spec = importlib.util.spec_from_file_location("make_assignments", ROOT / "scripts" / "make_assignments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def graded(tmp_path_factory):
    """{'solutions': {name: Submission}, 'stubs': {name: result dict from the CLI's JSON}}."""
    out = tmp_path_factory.mktemp("grades") / "stubs.json"
    cli = subprocess.Popen([sys.executable, "-m", "llmsys_lab", "grade", *[f"assignments/{n}" for n in NAMES],
                            "--timeout", TIMEOUT, "--json", str(out)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        solutions = {n: grading.grade_notebook(SOLUTIONS / n, SOLUTIONS, float(TIMEOUT)) for n in NAMES}
    finally:
        stdout, stderr = cli.communicate(timeout=1800)
    assert cli.returncode == 0, f"grading the student notebooks failed:\n{stdout}\n{stderr}"
    stubs = {Path(r["submission"]).relative_to("assignments").as_posix(): r for r in json.loads(out.read_text())}
    return {"solutions": solutions, "stubs": stubs, "stdout": stdout}


def test_there_are_six_assignments():
    assert [n.split("/")[0] for n in NAMES] == ["01_attention", "02_estimators", "03_kv_cache", "04_paged_kv",
                                                "05_continuous_batching", "06_flash_attention", "08_parallelism",
                                                "10_speculative_decoding"]


@pytest.mark.parametrize("name", NAMES)
def test_solution_passes_every_graded_test(graded, name):
    sub = graded["solutions"][name]
    assert sub.error is None
    failed = [(t.test, t.feedback) for t in sub.tests if not t.passed]
    assert not failed, f"{name}: graded tests fail on the solution: {failed}"
    assert sub.score == sub.max_score == 10, f"{name}: {sub.score} / {sub.max_score}"
    assert sub.messages == [], sub.messages
    # the self-check cells, the specification and the bonus run cleanly too (no error, nothing on stderr)
    for i, cell in enumerate(sub.notebook.cells):
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{name} cell {i}: {out.ename}: {out.evalue}"
            assert not (out.output_type == "stream" and out.name == "stderr"), f"{name} cell {i} stderr: {out.text}"


@pytest.mark.parametrize("name", NAMES)
def test_untouched_student_notebook_fails_every_graded_test(graded, name):
    result = graded["stubs"][name]
    assert result["error"] is None
    assert result["source"] == f"solutions/{name}", "the student notebook was not matched with its source"
    assert [t["test"] for t in result["tests"]] == [t.test for t in graded["solutions"][name].tests]
    for t in result["tests"]:
        assert t["points"] == 0, f"{name}: {t['test']} gives {t['points']} points to the untouched stub"
        # it fails because of the stub, not because of something else
        assert "NotImplementedError" in t["feedback"], f"{name}: {t['test']}: {t['feedback']}"


def test_cli_prints_a_summary_table(graded):
    for name in NAMES:
        assert f"assignments/{name}" in graded["stdout"]
    assert "0 / 10" in graded["stdout"]


# ---- generated student notebooks ----------------------------------------------------------
def test_assignments_are_in_sync_with_solutions():
    problems = load_script().stale()
    assert problems == [], "\n".join(problems) + "\nrun `make assignments` and commit assignments/"


def test_sync_check_reports_stale_missing_and_extra(tmp_path):
    script = load_script()
    sol, asg = tmp_path / "solutions", tmp_path / "assignments"
    (sol / "x").mkdir(parents=True)
    (sol / "y").mkdir()
    (asg / "x").mkdir(parents=True)
    (asg / "z").mkdir()
    source = SOLUTIONS / NAMES[1]
    (sol / "x" / "a.ipynb").write_text(source.read_text())
    (sol / "y" / "b.ipynb").write_text(source.read_text())
    built = script.build(sol)
    (asg / "x" / "a.ipynb").write_text(built[Path("x/a.ipynb")])
    (asg / "z" / "c.ipynb").write_text("{}")
    assert script.stale(sol, asg) == ["missing: assignments/y/b.ipynb", "no source in solutions/: assignments/z/c.ipynb"]
    nb = nbformat.read(sol / "x" / "a.ipynb", as_version=4)
    nb.cells[0].source += "\nedited"
    nbformat.write(nb, sol / "x" / "a.ipynb")
    assert "out of date: assignments/x/a.ipynb" in script.stale(sol, asg)


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_follow_nbgrader_format(name):
    src = nbformat.read(SOLUTIONS / name, as_version=4)
    student = nbformat.read(ASSIGNMENTS / name, as_version=4)
    meta = [c.metadata.get("nbgrader") for c in src.cells]
    ids = [m["grade_id"] for m in meta if m]
    assert len(ids) == len(set(ids)), "grade_id values must be unique"
    tests = [c for c in src.cells if grading.is_test(c)]
    answers = [c for c in src.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert tests and answers
    assert all(c.metadata.nbgrader["points"] > 0 and c.metadata.nbgrader["locked"] for c in tests)
    assert all("### BEGIN SOLUTION" in c.source and "### END SOLUTION" in c.source for c in answers)
    assert any("### BEGIN HIDDEN TESTS" in c.source for c in tests), "each assignment has hidden tests"
    assert src.metadata.kernelspec.name == "python3"
    assert all(not c.get("outputs") for c in src.cells if c.cell_type == "code"), "keep solutions/ free of outputs"
    # the student version: stubs instead of solutions, no hidden tests, same graded cells and points
    text = "\n".join(c.source for c in student.cells)
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
    stubs = [c for c in student.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert len(stubs) == len(answers)
    assert all("raise NotImplementedError()" in c.source for c in stubs)
    assert [(c.metadata.nbgrader["grade_id"], c.metadata.nbgrader["points"]) for c in student.cells
            if grading.is_test(c)] == [(c.metadata.nbgrader["grade_id"], c.metadata.nbgrader["points"]) for c in tests]


def test_nbval_does_not_collect_assignment_notebooks():
    """`make test` runs nbval over testpaths only: the lessons, not the stubs (which fail by design)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert not {"solutions", "assignments", "."} & set(config["testpaths"])
