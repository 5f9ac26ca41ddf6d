"""The lessons' stored outputs are a complete GPU reference that nbval can compare.

nbval itself (run on every lesson by `make test`) compares the outputs; these tests check
the rules around it: every cell was run, nothing stored is an error, the outputs come from
a GPU run, and no more than 20% of output cells are excluded from comparison.
"""
import json

import pytest
from nbpolicy import MAX_IGNORED_SHARE, format_counts, lesson_notebooks, output_counts

NOTEBOOKS = lesson_notebooks()
IDS = [p.name for p in NOTEBOOKS]


def test_lessons_exist_and_are_numbered_in_order():
    # lessons 00-06 come first and in order; later lessons (07-10) may land in any order
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers[:7] == list(range(7)), numbers
    assert numbers == sorted(set(numbers)) and numbers[-1] <= 10, numbers


def test_ignored_output_cells_stay_under_budget(capsys):
    rows = [output_counts(p) for p in NOTEBOOKS]
    with capsys.disabled():
        print("\n" + format_counts(rows))
    total = sum(r.output_cells for r in rows)
    ignored = sum(r.ignored for r in rows)
    assert ignored / total <= MAX_IGNORED_SHARE, f"{ignored} of {total} output cells ignored"
    for r in rows:
        assert r.share <= MAX_IGNORED_SHARE, f"{r.name}: {r.ignored} of {r.output_cells} output cells ignored"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_cell_ran_and_none_failed(path):
    nb = json.loads(path.read_text())
    assert output_counts(path).unexecuted == 0, "some code cells have no stored reference output"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code if "".join(c["source"]).strip()]
    assert counts == list(range(1, len(counts) + 1)), "cells were not run top to bottom in one kernel"
    errors = [o for c in code for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, f"stored error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_outputs_come_from_a_gpu_run(path):
    meta = json.loads(path.read_text())["metadata"]
    run = meta.get("llmsys_lab", {}).get("reference_run", {})
    assert run.get("device") == "cuda", f"stored outputs are from {run or 'an unknown run'}, not a GPU run"
    assert meta["kernelspec"]["name"] == "llmsys-lab"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_first_code_cell_imports_the_kit(path):
    """`import llmsys_lab` picks the Triton mode; it must run before any kernel is defined."""
    nb = json.loads(path.read_text())
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "import llmsys_lab" in "".join(first["source"])


def test_ignored_counting_sees_markers_and_tags(tmp_path):
    nb = {"cells": [
        {"cell_type": "code", "source": "# NBVAL_IGNORE_OUTPUT\nprint(1)", "metadata": {}, "outputs": [{}], "execution_count": 1},
        {"cell_type": "code", "source": "print(2)", "metadata": {"tags": ["nbval-ignore-output"]}, "outputs": [{}], "execution_count": 2},
        {"cell_type": "code", "source": "print(3)", "metadata": {}, "outputs": [{}], "execution_count": 3},
        {"cell_type": "code", "source": "# NBVAL_IGNORE_OUTPUT (why)\nprint(5)", "metadata": {}, "outputs": [{}], "execution_count": 5},
        {"cell_type": "code", "source": "x = 4", "metadata": {}, "outputs": [], "execution_count": None},
    ]}
    p = tmp_path / "99_x.ipynb"
    p.write_text(json.dumps(nb))
    c = output_counts(p)
    assert (c.output_cells, c.ignored, c.compared, c.unexecuted) == (4, 2, 2, 1)   # nbval compares the cell whose marker line has extra text


@pytest.mark.notebook
def test_nbval_hooks_reach_the_lessons_outside_tests(tmp_path):
    """tests/conftest.py's hooks on nbval's cells (NotebookRuns) apply to notebooks outside tests/, as the lessons
    in notebooks/ are: the kernel starts without this process's TRITON_INTERPRET (as JupyterLab starts it), and
    the CPU-time test reads that run (a conftest's own per-test hooks would only see tests under tests/)."""
    import subprocess
    import sys

    import nbformat

    from nbpolicy import ROOT

    cell = nbformat.v4.new_code_cell("import os\nprint(os.environ.get('TRITON_INTERPRET'))", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="None\n")]
    probe = tmp_path / "probe.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), probe)
    check = tmp_path / "test_after.py"
    check.write_text("from pathlib import Path\nfrom nbpolicy import LESSON_RUNS\n\n\ndef test_after():\n"
                     f"    run = LESSON_RUNS[Path({str(probe)!r}).resolve()]\n"
                     "    assert run['cpu'] > 0 and not run['failed'], run\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-c", str(ROOT / "pyproject.toml"),
                           "--rootdir", str(ROOT), str(ROOT / "tests" / "test_checks.py"), str(probe), str(check)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "passed" in done.stdout and "failed" not in done.stdout
