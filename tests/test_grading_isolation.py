"""Batch isolation: one submission cannot change another's grade (each runs in its own sandbox).

The planting submission is assignment 1's stub with an answer cell that tries every way to leave
something behind for the next submission in the batch: a ``.pth`` file in the environment's
site-packages and a user-site ``sitecustomize`` that would make every test pass, an IPython startup
file, an edit of the grader's own module, processes that outlive it (``setsid``, a double fork), and a
full temporary folder. The untouched stub graded right after it, in the same batch, must still score
0 / 10, and nothing the planter wrote may be left on the machine.
"""
import ast
import os
import site
import sysconfig
import time
import uuid
from pathlib import Path

import nbformat
import pytest

from llmsys_lab import grading
from llmsys_lab.grading import sandbox
from test_grading_sandbox import needs_sandbox   # skipped only where bwrap is missing (make test requires it where present)

pytestmark = pytest.mark.notebook          # grades a sequence of notebooks

ROOT = Path(__file__).resolve().parent.parent
STUDENT = ROOT / "assignments" / "01_attention" / "attention.ipynb"
MARK = uuid.uuid4().hex[:12]
SLEEP = f"{time.time_ns() % 10**6}.{os.getpid()}"

PATCH = ("import llmsys_lab.grading as g; g.score_cell = lambda cell, points, token=None: (float(points), '')"
         "; g.finish.__globals__['score_cell'] = g.score_cell")
PLANT = f'''
import os, site, subprocess, sysconfig, pathlib, tempfile
planted = []
targets = [pathlib.Path(sysconfig.get_paths()["purelib"]) / "zz_{MARK}.pth",
           pathlib.Path(site.getusersitepackages()) / "usercustomize.py",
           pathlib.Path.home() / ".ipython" / "profile_default" / "startup" / "00-{MARK}.py",
           pathlib.Path({str(Path.home())!r}) / ".ipython" / "profile_default" / "startup" / "00-{MARK}.py",
           pathlib.Path({str(ROOT / "llmsys_lab" / "grading")!r}) / "zz_{MARK}.py",
           pathlib.Path("/var/tmp") / "{MARK}.pth"]
for target in targets:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text({PATCH!r} + "\\n")
        planted.append(str(target))
    except OSError:
        pass
try:
    with open(os.path.join(os.path.dirname(__import__("llmsys_lab.grading").grading.__file__), "__init__.py"), "a") as f:
        f.write("\\n" + {PATCH!r} + "\\n")
        planted.append("grading/__init__.py")
except OSError:
    pass
subprocess.Popen(["setsid", "sleep", "{SLEEP}"], start_new_session=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "{SLEEP}"])
    os._exit(0)
try:
    with open(os.path.join(tempfile.gettempdir(), "filler-{MARK}"), "wb") as f:
        for _ in range(64):
            f.write(b"x" * (1 << 20))
except OSError:
    pass
print("planted:", planted)
'''


def notebook(extra: str = "") -> nbformat.NotebookNode:
    nb = nbformat.read(STUDENT, as_version=4)
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "attention" and extra:
            cell.source += "\n" + extra
    return nb


def _leftovers() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if SLEEP in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(proc.name)
            except OSError:
                pass
    places = [Path(sysconfig.get_paths()["purelib"]), Path(site.getusersitepackages()), Path("/var/tmp"),
              Path.home() / ".ipython" / "profile_default" / "startup", ROOT / "llmsys_lab" / "grading",
              Path("/tmp")]
    for place in places:
        if place.is_dir():
            found += [str(p) for p in place.iterdir() if MARK in p.name]
    if MARK in (ROOT / "llmsys_lab" / "grading" / "__init__.py").read_text():
        found.append("grading/__init__.py was edited")
    return found


@needs_sandbox
def test_a_planting_submission_cannot_change_the_next_ones_grade(tmp_path):
    planter, stub = tmp_path / "planter.ipynb", tmp_path / "stub.ipynb"
    nbformat.write(notebook(PLANT), planter)
    nbformat.write(notebook(), stub)
    results = grading.grade([planter, stub], source=ROOT / "solutions", timeout=60, jobs=1)
    by_name = {Path(r.path).stem: r for r in results}
    assert by_name["planter"].error is None and by_name["stub"].error is None
    out = "".join(o.get("text", "") for c in by_name["planter"].notebook.cells for o in c.get("outputs", []))
    planted = ast.literal_eval(out.split("planted: ", 1)[1].splitlines()[0])
    # the only writes that worked went to the sandbox's private home, which vanished with it
    assert planted and all(p.startswith(sandbox.HOME + "/") for p in planted), planted
    assert (by_name["stub"].score, by_name["stub"].max_score) == (0, 10), \
        [(t.test, t.points, t.feedback) for t in by_name["stub"].tests]
    assert by_name["planter"].score == 0
    time.sleep(0.5)
    assert _leftovers() == []
