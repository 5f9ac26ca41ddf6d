"""Every lesson runs in about two minutes or less on a laptop CPU: measured, printed, bounded.

Each lesson is executed in a fresh kernel (plain environment, as JupyterLab starts it; the full sweeps
that lesson 10 keeps for a GPU stay off), and a last cell reads the kernel's own CPU time (user + system,
its finished child processes included: the ranks of lesson 08 and 09). CPU time, not wall time: it does
not grow when other jobs share the machine, and on a 2-core laptop a lesson whose CPU time is within the
budget finishes in about that long or less. The test prints one line per lesson (run with -s to see them,
or read the assertion message).

One execution serves two checks: when nbval has just run the lesson in the same session (`make test`), the
kernel's CPU time was read there, after its last cell (tests/conftest.py), and this test uses that number
(nbval's kernel starts the same way: plain environment, no TRITON_INTERPRET); it runs after nbval's items.
Run alone (or after a failed nbval run, or with LLMSYS_FULL_SWEEPS set) it executes the lesson itself.
Executing every lesson takes minutes: the test is marked `slow` and `notebook` (`make test` runs it).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest

from llmsys_lab import course
from nbpolicy import CPU_PROBE, LESSON_RUNS

ROOT = Path(__file__).resolve().parent.parent
LESSONS = course.lesson_notebooks(root=ROOT, pending=False)   # the course manifest's lessons
CPU_BUDGET_S = 150          # "about two minutes": 120 s, with room for a slower laptop
PROBE = CPU_PROBE


def execute_and_time(path: Path, monkeypatch) -> tuple[float, float, list[str]]:
    """(kernel CPU seconds, wall seconds, errors) of one execution of the lesson."""
    from nbclient import NotebookClient

    for key in ("TRITON_INTERPRET", "LLMSYS_FULL_SWEEPS"):
        monkeypatch.delenv(key, raising=False)
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    start = time.perf_counter()
    NotebookClient(nb, timeout=900, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    wall = time.perf_counter() - start
    errors = [f"cell {c.get('id')}: {o.ename}" for c in nb.cells for o in c.get("outputs", [])
              if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    cpu = float(text.split("CPU_SECONDS", 1)[1].split()[0])
    return cpu, wall, errors


def nbval_run(path: Path) -> tuple[float, float] | None:
    """(CPU, wall seconds) of nbval's run of the lesson in this session, if it ran cleanly, else None."""
    run = LESSON_RUNS.get(path.resolve())
    if not run or run.get("failed") or run.get("cpu") is None or os.environ.get("LLMSYS_FULL_SWEEPS"):
        return None
    return run["cpu"], run["wall"]


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_cpu_time(path, monkeypatch, capsys):
    measured = nbval_run(path)
    if measured:
        (cpu, wall), errors, how = measured, [], "nbval's run"
    else:
        (cpu, wall, errors), how = execute_and_time(path, monkeypatch), "its own run"
    line = f"{path.stem}: {cpu:.0f} s of CPU in the kernel, {wall:.0f} s wall, {os.cpu_count()} cores ({how})"
    with capsys.disabled():
        print("\n" + line)
    assert not errors, f"{line}; errors: {errors}"
    assert cpu <= CPU_BUDGET_S, f"{line}: over the {CPU_BUDGET_S} s budget"
