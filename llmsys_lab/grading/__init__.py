"""Autograder for the assignments, without an nbgrader database: `python -m llmsys_lab grade`.

It grades the way `nbgrader autograde` does, so both paths give the same scores on honest work:

1. The grader process finds the instructor's source notebook (``solutions/``, or ``--source``)
   holding the submission's grade ids. Only the graded cells of the source count, each once, with
   the source's points: the submission's test cells and read-only cells are replaced by the
   source's (hidden tests included), a test the student deleted or renamed is put back, and a
   "graded" cell the source does not have (an extra cell worth 1000 points, a duplicate) is
   reported and run as ordinary code. A submission with no matching source is an error; only
   ``--no-source`` (a student's self-check, labelled as not an official grade) uses its own tests.
2. The notebook runs top to bottom in a fresh kernel (nbclient), started in a temporary folder that
   holds a copy of the submission and nothing else, one cell at a time, with a time limit per cell
   and a cap on the output kept per cell. An error does not stop the run; a cell past the limit is
   interrupted and scores 0; a kernel that dies or ignores the interrupt ends the run.
3. Each test cell scores nbgrader's way (an error or anything on stderr: 0; a single number as the
   cell's result: partial credit; otherwise full points), and only if it ran to its end (below). A
   test that raises ``TritonUnavailable`` is "not gradable on this machine": excluded from both the
   score and the maximum, listed separately.
4. Each submission is graded in a child process, so a submission that kills its grader loses only
   its own result; results so far are written (JSON/CSV) as each submission finishes.

Threat model (a submission is arbitrary Python run by the grader):

Defended, in ``python -m llmsys_lab grade``:
* swallowing a failing test: an IPython exception hook (``set_custom_exc``), ``sys.excepthook``,
  patched ``showtraceback``/``run_cell``, replaced ``sys.stdout``/``sys.stderr`` or builtins, input
  or AST transformers and event callbacks installed by earlier cells are all put back before each
  test cell (``guard.begin``), and a test scores only if the cell printed a token that the grader
  makes up afresh for that cell (``secrets.token_hex``) and that only the test's last statement
  prints. The token is not in the kernel before its cell is sent, so code from earlier cells cannot
  know it; each cell has its own, so a token seen in an earlier cell's text is worth nothing.
* swapping the check helpers: ``check_close``, ``check_own_code``, ``CheckFailed``, a notebook's own
  helpers (whatever a locked cell bound) and the functions of ``llmsys_lab.checks`` and
  ``llmsys_lab.grading`` (their code objects too) are restored from a snapshot taken before the
  first submission cell.
* forged nbgrader metadata: points and grade ids come from the source only (step 1).
* reading the solutions: the kernel's folder holds only the submission, the source is looked up in
  the grader process (the kernel is never told where it is), and an audit hook installed before the
  first submission cell (Python has no way to remove one) refuses to open, list, link or copy
  anything under ``solutions/`` or the ``--source`` folder, and to signal the grader's processes.
* "your own code": ``check_own_code`` traces the calls the answer makes while the test runs
  (``sys.setprofile``): a call into the kit or a forbidden function fails, however it was reached
  (default argument, closure, callable object, ``getattr``, ``eval``); switching the tracing off
  is seen by an audit hook.
* the grader itself: cell time limits (positive numbers only), captured output capped per cell,
  output paths and the kernel checked before grading, one child process per submission.

Not defended (the submission runs in the same Python process as its tests):
* code that runs *while* a test cell runs -- a student function the test calls -- can read that
  cell's code (frame inspection), so a submission written specifically against this grader can
  still forge a pass, e.g. by re-installing an exception handler from inside its function and
  printing the token. It can also patch what the checks rely on (torch itself, ``sys.modules``,
  IPython's kernel internals below the shell) or start a subprocess that reads files the audit
  hook cannot see.
* a subprocess, ``ctypes`` or a C extension bypasses the audit hook; the kernel runs as the
  grader's user, so it can read anything that user can and signal its processes by other means.

So no grade may be decided only there. ``grade`` (the command line) therefore runs each submission's
notebook in its own OS sandbox (``sandbox.py``: bubblewrap, read-only environment and kit, no
``solutions/`` or ``--source``, no network, private /tmp and home, its own PID namespace, CPU, memory
and wall-time limits): a submission cannot read the solutions, change the environment, leave processes
behind or reach another submission's grading. Restoring the cells (before) and scoring (after) happen
in the grader's process, which only reads the returned notebook (JSON). For the assignments in
``harness.SPECS`` (every assignment) a trusted harness decides those tests outside the sandbox from the outputs the
student's functions gave for fresh inputs (safetensors/JSON), and the kit modules the assignment
forbids are absent from the sandbox (a test scores only if its in-kernel cell passed too). Without a working sandbox ``grade`` refuses unless
``unsafe`` is given, and then labels every result UNSAFE. ``grade_notebook`` runs without the sandbox
(tests and self-checks only). ``nbgrader autograde`` has none of these defences (it restores locked
cells and hidden tests, and ignores metadata it did not generate, but runs the notebook in the course
folder and trusts the cells' outputs).

``check_own_code`` lives in ``llmsys_lab.checks`` and is re-exported here for the test cells.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..checks import check_own_code, kit_references  # noqa: F401  (test cells import them from here)
from ..errors import LabError


def _default_source() -> Path | None:
    """The kit's solutions/ folder, when this is a checkout of the kit (looked up by the grader only)."""
    path = Path(__file__).resolve().parents[2] / "solutions"
    return path if path.is_dir() else None


class GradingError(LabError, ValueError):
    """The input cannot be graded (missing file, not a notebook, no graded cells, no source)."""


# ---- reading notebooks --------------------------------------------------------------------
def _meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def is_test(cell) -> bool:
    """An autograded test cell: nbgrader grade=True on a code cell that is not an answer."""
    m = _meta(cell)
    return bool(m.get("grade")) and not m.get("solution") and cell.get("cell_type") == "code"


def load_notebook(path) -> "nbformat.NotebookNode":  # noqa: F821
    import nbformat

    path = Path(path)
    if not path.exists():
        raise GradingError(f"{path}: no such file")
    if path.is_dir():
        raise GradingError(f"{path}: is a directory, not a notebook")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as err:  # json errors, nbformat errors, bad encoding
        raise GradingError(f"{path}: not a Jupyter notebook ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
    if not isinstance(nb.get("cells"), list):
        raise GradingError(f"{path}: not a Jupyter notebook (no list of cells)")
    return nb


def graded_ids(nb) -> list[str]:
    return [_meta(c)["grade_id"] for c in nb.cells if is_test(c) and "grade_id" in _meta(c)]


def _all_ids(nb) -> list[str]:
    return [_meta(c)["grade_id"] for c in nb.cells if "grade_id" in _meta(c)]


def find_source(nb, source) -> Path | None:
    """The source notebook (a file, or one found under a folder) holding the submission's tests."""
    if source is None:
        return None
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise GradingError(f"source {source}: no such file or folder")
    wanted, best, best_overlap = set(_all_ids(nb)), None, 0       # tests, answers and read-only cells
    for path in sorted(source.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        try:
            overlap = len(wanted & set(_all_ids(load_notebook(path))))
        except GradingError:
            continue
        if overlap > best_overlap:
            best, best_overlap = path, overlap
    return best


def restore_from_source(nb, source_nb) -> list[str]:
    """Make the submission's graded cells exactly the source's; return notes on what was changed.

    Locked cells (tests, read-only cells) are replaced by the source's; a test the submission lacks is
    put back after the cell that precedes it in the source; "graded" cells with a grade id the
    source does not have, and repeats of a grade id, lose their nbgrader metadata (they run as
    ordinary code and score nothing).
    """
    from collections import Counter

    notes: list[str] = []
    source_cells = {_meta(c)["grade_id"]: c for c in source_nb.cells if "grade_id" in _meta(c)}
    counts = Counter(_meta(c).get("grade_id") for c in nb.cells if _meta(c).get("grade_id"))
    seen = set()
    for cell in nb.cells:
        m = _meta(cell)
        gid = m.get("grade_id")
        src = source_cells.get(gid)
        repeated = counts.get(gid, 0) > 1 and src is not None and (is_test(src) or _meta(src).get("locked"))
        if m and (src is None or repeated):
            # a repeated locked cell: every copy becomes ordinary code and the source's is put back where
            # the source has it, so the position of a copy cannot decide what runs
            if repeated and counts[gid] > 0:
                notes.append(f"graded cell '{gid}' appears {counts[gid]} times (it repeats a grade id): the copies "
                             "are ignored (run as ordinary code, no points) and the source's cell is put back")
                counts[gid] = -1
            elif not repeated and (m.get("grade") or m.get("solution") or m.get("locked")):
                notes.append(f"graded cell '{gid}' is not in the source notebook: ignored (run as ordinary code, "
                             "no points)")
            cell.metadata.pop("nbgrader", None)
            continue
        if src is None:
            continue
        seen.add(gid)
        if _meta(src).get("locked") or is_test(src):
            if cell.get("cell_type") != src.cell_type or _norm(cell.source) not in (
                    _norm(src.source), _norm(visible_part(src.source))):
                notes.append(f"cell '{gid}' had been edited; the original was restored")
            cell.clear()
            cell.update(_copy_cell(src))
        else:                                               # an answer cell: the student's code, the source's metadata
            cell.metadata["nbgrader"] = dict(_meta(src))
    order = [_meta(c).get("grade_id") for c in source_nb.cells]
    for i, gid in enumerate(order):
        if gid is None or gid in seen or not (is_test(source_cells[gid]) or _meta(source_cells[gid]).get("locked")):
            continue
        before = next((g for g in reversed(order[:i]) if g in seen), None)
        at = 0 if before is None else 1 + next(j for j, c in enumerate(nb.cells) if _meta(c).get("grade_id") == before)
        nb.cells.insert(at, _copy_cell(source_cells[gid]))
        seen.add(gid)
        if counts.get(gid) != -1:
            what = "test cell" if is_test(source_cells[gid]) else "read-only cell"
            notes.append(f"{what} '{gid}' was missing from the submission; it was put back")
    return notes


def visible_part(source: str) -> str:
    """A test's source as students see it: without the ### BEGIN/END HIDDEN TESTS region."""
    lines, hidden = [], False
    for line in source.split("\n"):
        if "BEGIN HIDDEN TESTS" in line:
            hidden = True
        elif "END HIDDEN TESTS" in line:
            hidden = False
        elif not hidden:
            lines.append(line)
    return "\n".join(lines)


def _norm(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def _display(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _copy_cell(cell):
    import copy

    new = copy.deepcopy(cell)
    if new.cell_type == "code":
        new.outputs, new.execution_count = [], None
    return new


# ---- running ------------------------------------------------------------------------------
_TIMEOUT = "CellTimeout"          # ename of the reply nbclient substitutes for a cell that ran too long
MAX_OUTPUT = 100_000              # characters of output kept per cell; the rest is dropped (and said so)
_GUARD = "import llmsys_lab.grading.guard as _llmsys_guard"


def check_timeout(timeout) -> float:
    """A per-cell limit must be a positive number of seconds (0 would mean no limit: a hang)."""
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        raise GradingError(f"--timeout must be a number of seconds, got {timeout!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise GradingError(f"--timeout must be a positive number of seconds, got {timeout!r} "
                           "(a cell that never ends would hang the grader)")
    return value


def check_kernel(kernel_name: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        names = ", ".join(sorted(KernelSpecManager().find_kernel_specs())) or "none"
        raise GradingError(f"--kernel {kernel_name}: no such Jupyter kernel (installed: {names})") from None


def _wrap_test(source: str, token: str) -> str:
    """The test's code between guard.begin() and guard.end(token); a trailing expression stays the
    cell's result (nbgrader's partial credit)."""
    import ast

    body, last = source, None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        tree = None
    if tree is not None and tree.body and isinstance(tree.body[-1], ast.Expr):
        start = tree.body[-1].lineno - 1
        lines = source.split("\n")
        body, last = "\n".join(lines[:start]), "\n".join(lines[start:])
    code = f"{_GUARD}; _llmsys_guard.begin()\n{body}\n"
    if last is not None:
        code += f"_llmsys_result = (\n{last}\n)\n_llmsys_guard.end({token!r})\n_llmsys_result"
    else:
        code += f"_llmsys_guard.end({token!r})"
    return code


class _Client:
    """nbclient with a cap on the output kept per cell."""

    @staticmethod
    def make(nb, timeout, kernel_name, cwd, on_timeout, max_output):
        from nbclient import NotebookClient

        from .guard import MARK

        class Capped(NotebookClient):
            sizes: dict = {}

            def output(self, outs, msg, display_id, cell_index):
                size = self.sizes.get(cell_index, 0)
                content = msg.get("content", {})
                n = len(str(content.get("text", content.get("data", ""))))
                self.sizes[cell_index] = size + n
                if size + n > max_output and MARK in str(content.get("text", "")):   # the grader's line gets through
                    msg = {**msg, "content": {**content, "text": "".join(
                        line for line in content["text"].splitlines(True) if MARK in line)}}
                elif size + n > max_output and msg.get("msg_type") in ("stream", "display_data", "execute_result",
                                                                       "update_display_data"):
                    if size <= max_output:
                        self.sizes[cell_index] = max_output + 1
                        note = (f"\n[output truncated by the grader: more than {max_output:,} characters from this "
                                "cell; the rest was dropped]\n")
                        import nbformat

                        outs.append(nbformat.v4.new_output("stream", name="stdout", text=note))
                    return None
                return super().output(outs, msg, display_id, cell_index)

        message = f"still running after {timeout:g} s (an infinite loop?); interrupted"
        return NotebookClient.__new__(Capped), message, dict(
            nb=nb, timeout=timeout, kernel_name=kernel_name, allow_errors=True, interrupt_on_timeout=True,
            error_on_timeout={"ename": _TIMEOUT, "evalue": message, "traceback": [f"{_TIMEOUT}: {message}"]},
            on_cell_error=on_timeout, resources={"metadata": {"path": str(cwd)}})


def execute(nb, cwd, timeout: float, kernel_name: str = "python3", guard: dict | None = None,
            max_output: int = MAX_OUTPUT, after: str | None = None) -> dict[int, str]:
    """Run every code cell in one kernel; return {cell index: why it did not run normally}.

    A cell past `timeout` seconds is interrupted; nbclient then stops waiting for it (its
    `error_on_timeout` reply) and a probe cell checks that the kernel answers again. With `guard`
    ({'deny': [paths], 'tokens': {cell index: token}}) the grader's own cells run around the
    notebook's (see ``llmsys_lab.grading.guard``); they leave no trace in the returned notebook.
    """
    import nbformat
    from nbclient.exceptions import DeadKernelError

    problems: dict[int, str] = {}
    timed_out: list[int] = []
    client, message, kwargs = _Client.make(
        nb, timeout, kernel_name, cwd,
        lambda cell, cell_index, execute_reply: (
            timed_out.append(cell_index) if execute_reply["content"].get("ename") == _TIMEOUT else None),
        max_output)
    client.__init__(**kwargs)
    env = {k: v for k, v in os.environ.items() if k not in ("PWD", "OLDPWD", "JPY_SESSION_NAME")}
    env["PWD"] = str(cwd)
    stopped = None

    def side(source: str) -> bool:
        """Run one of the grader's cells; False if the kernel is gone or it failed."""
        client.nb.cells.append(nbformat.v4.new_code_cell(source))
        index = len(client.nb.cells) - 1
        client.timeout = max(timeout, 300)                    # importing the kit may take a while
        try:
            client.execute_cell(client.nb.cells[index], index)
            return not any(o.output_type == "error" for o in client.nb.cells[index].outputs)
        except DeadKernelError:
            return False
        finally:
            client.timeout = timeout
            client.nb.cells.pop()

    with client.setup_kernel(stderr=subprocess.DEVNULL, env=env, cwd=str(cwd)):
        if guard is not None and not side(f"{_GUARD}\n_llmsys_guard.install({guard['deny']!r}, "
                                           f"{guard['protect']!r})\ndel _llmsys_guard"):
            stopped = "not run: the grader could not set up the kernel"
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if stopped:
                problems[i] = stopped
                continue
            token = guard["tokens"].get(i) if guard else None
            locked = guard is not None and token is None and _meta(cell).get("locked")
            original = cell.source
            if token:
                cell.source = _wrap_test(original, token)
            elif locked:
                side(f"{_GUARD}; _llmsys_guard.before()")
            try:
                client.execute_cell(cell, i)
            except DeadKernelError:
                problems[i] = "the kernel died while running this cell (a crash, exit() or out of memory)"
                cell.outputs.append(_error_output("DeadKernelError", problems[i]))
                stopped = f"not run: the kernel died in cell {i}"
                continue
            finally:
                cell.source = original
            if locked:
                side(f"{_GUARD}; _llmsys_guard.record()")
            if i in timed_out:
                problems[i] = f"timed out: {message}"
                cell.outputs = [o for o in cell.outputs if o.output_type != "error"]
                cell.outputs.append(_error_output("TimeoutError", problems[i]))
                if not _responds(client, timed_out):
                    stopped = f"not run: the kernel did not recover after cell {i} timed out"
        if after is not None and not stopped:
            side(after)                       # the harness's probe: it writes data, decides nothing
    return problems


def _responds(client, timed_out: list[int]) -> bool:
    """After an interrupt: does the kernel run a trivial cell again?"""
    import nbformat
    from nbclient.exceptions import DeadKernelError

    client.nb.cells.append(nbformat.v4.new_code_cell("pass"))        # execute_cell writes into nb.cells
    index = len(client.nb.cells) - 1
    try:
        client.execute_cell(client.nb.cells[index], index)
        return index not in timed_out
    except DeadKernelError:
        return False
    finally:
        client.nb.cells.pop()


def _error_output(ename: str, evalue: str):
    import nbformat

    return nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


NOT_GRADABLE = "TritonUnavailable"


def _is_unfinished_kernel(out) -> bool:
    """A stub's `raise NotImplementedError()` left in a @triton.jit function: the interpreter (CPU) raises
    it, but on a GPU Triton's compiler refuses the raise statement (UnsupportedLanguageConstruct or a
    CompilationError naming the AST node), a message that would puzzle a student."""
    return (out.ename.rsplit(".", 1)[-1] in ("UnsupportedLanguageConstruct", "CompilationError")
            and "unsupported AST node type: Raise" in out.evalue and "NotImplementedError" in out.evalue)


def score_cell(cell, points: float, token: str | None = None) -> tuple[float | None, str]:
    """nbgrader's rule: error or stderr -> 0; a single number as result -> partial; else full.

    With `token`, the cell must also have printed it (it ran to its end); the token's line is
    removed from the output. None as points: not gradable on this machine (TritonUnavailable).
    """
    from .guard import MARK

    completed = token is None
    for out in cell.get("outputs", []):
        if out.output_type == "stream" and out.name == "stdout" and token and f"{MARK}{token}" in out.text:
            completed = True
            out.text = "".join(line for line in out.text.splitlines(True) if MARK not in line)
    cell.outputs = [o for o in cell.get("outputs", []) if not (o.output_type == "stream" and o.text == "")]
    for out in cell.get("outputs", []):
        if out.output_type == "error":
            if out.ename == NOT_GRADABLE:
                return None, f"not gradable on this machine: {out.evalue}"
            if out.ename == "NotImplementedError" and not out.evalue:
                return 0.0, "NotImplementedError: something this test calls is not implemented yet"
            if _is_unfinished_kernel(out):
                return 0.0, ("a Triton kernel this test calls is not implemented yet: it still contains `raise "
                             "NotImplementedError()`, which the GPU compiler cannot compile")
            return 0.0, f"{out.ename}: {out.evalue}".strip()
        if out.output_type == "stream" and out.name == "stderr":
            return 0.0, f"wrote to stderr: {out.text.strip().splitlines()[0] if out.text.strip() else ''}"
    if not completed:
        return 0.0, "the test did not run to its end (its failure was suppressed): 0 points"
    for out in cell.get("outputs", []):
        if out.output_type == "execute_result":              # nbgrader looks at the first result only
            try:
                value = float(out.data.get("text/plain", ""))
            except ValueError:
                break
            if not math.isfinite(value) or value < 0 or value >= points:
                break
            return value, f"partial credit: {value:g} of {points:g}"
    return float(points), ""


# ---- grading ------------------------------------------------------------------------------
@dataclass
class TestResult:
    test: str
    points: float
    max_points: float
    feedback: str = ""
    gradable: bool = True

    @property
    def passed(self) -> bool:
        return self.gradable and self.points >= self.max_points


@dataclass
class Submission:
    path: str
    source: str | None = None
    tests: list[TestResult] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    error: str | None = None
    official: bool = True                 # False: --no-source self-check (the submission's own tests)
    notebook: object = field(default=None, repr=False, compare=False)   # the executed notebook

    @property
    def score(self) -> float:
        return sum(t.points for t in self.tests if t.gradable)

    @property
    def max_score(self) -> float:
        return sum(t.max_points for t in self.tests if t.gradable)

    @property
    def not_gradable(self) -> list[TestResult]:
        return [t for t in self.tests if not t.gradable]

    def to_dict(self) -> dict:
        return {"submission": self.path, "source": self.source, "official": self.official, "score": self.score,
                "max_score": self.max_score, "tests": [dict(asdict(t), passed=t.passed) for t in self.tests],
                "not_gradable": [t.test for t in self.not_gradable], "messages": self.messages, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> "Submission":
        tests = [TestResult(t["test"], t["points"], t["max_points"], t["feedback"], t.get("gradable", True))
                 for t in d.get("tests", [])]
        return cls(d["submission"], d.get("source"), tests, list(d.get("messages", [])), d.get("error"),
                   d.get("official", True))


SELF_CHECK = ("self-check with the submission's own visible tests (--no-source): NOT an official grade "
              "(hidden tests not run, edited test cells not restored)")


def grade_notebook(path, source="auto", timeout: float = 120, kernel_name: str = "python3",
                   max_output: int = MAX_OUTPUT) -> Submission:
    """Grade one submission in this process, without the sandbox (see the module docstring; `grade`
    runs the notebook in a sandbox per submission and is what official grades use).

    source: a source notebook, or a folder to search for the one holding the submission's tests;
    "auto": the kit's solutions/; None: the submission's own (visible) tests, a self-check only.
    """
    import nbformat

    job = prepare(path, source, timeout)
    with tempfile.TemporaryDirectory(prefix="llmsys-grade-") as run_dir:
        nbformat.write(nbformat.read(Path(path), as_version=4), Path(run_dir) / Path(path).name)  # the copy
        problems = execute(job.nb, Path(run_dir), job.timeout, kernel_name,
                           {"deny": job.deny, "protect": [os.getpid(), os.getppid()], "tokens": job.tokens},
                           max_output)
    return finish(job, job.nb, problems)


@dataclass
class _Job:
    """A submission ready to run: its restored notebook, the tokens of its test cells, what to hide."""
    sub: Submission
    nb: object
    tokens: dict
    deny: list
    order: dict
    timeout: float


def prepare(path, source="auto", timeout: float = 120) -> _Job:
    """In the grader's process (never in the sandbox): find the source, restore the graded cells."""
    timeout = check_timeout(timeout)
    nb = load_notebook(path)
    sub = Submission(str(path))
    deny: list[str] = []
    order: dict[str, int] = {}                            # grade id -> position in the source
    if source == "auto":
        source = _default_source()
        if source is None:
            raise GradingError(f"{path}: no solutions/ folder here to take the tests from; give --source "
                               "(or --no-source for a self-check)")
    kit_solutions = _default_source()
    if source is not None:
        src_path = find_source(nb, source)
        if src_path is None:
            raise GradingError(f"{path}: no source notebook in {_display(Path(source))} has this submission's "
                               "grade ids (renamed test cells?); give --source, or --no-source for a self-check")
        deny = sorted({str(Path(source).resolve()), str(src_path.resolve().parent)}
                      | ({str(kit_solutions)} if kit_solutions else set()))
        src = load_notebook(src_path)
        order = {gid: i for i, gid in enumerate(graded_ids(src))}
        sub.source = _display(src_path)
        sub.messages += restore_from_source(nb, src)
    else:
        deny = [str(kit_solutions)] if kit_solutions else []
        sub.official = False
        sub.messages.append(SELF_CHECK)
    tests = [i for i, c in enumerate(nb.cells) if is_test(c)]
    if not tests:
        raise GradingError(f"{path}: no graded test cells (cells with nbgrader metadata grade=true); "
                           "is this an assignment notebook?")
    tokens = {i: secrets.token_hex(16) for i in tests}
    return _Job(sub, nb, tokens, deny, order, timeout)


def finish(job: _Job, nb, problems: dict[int, str]) -> Submission:
    """In the grader's process: score the executed notebook's test cells."""
    sub = job.sub
    sub.notebook = nb
    for i, cell in enumerate(nb.cells):
        m = _meta(cell)
        if i in job.tokens and is_test(cell):
            points = float(m.get("points", 0))
            got, feedback = (0.0, problems[i]) if i in problems else score_cell(cell, points, job.tokens[i])
            sub.tests.append(TestResult(m.get("grade_id", f"cell {i}"), got or 0.0, points, feedback,
                                        gradable=got is not None))
        elif m.get("solution") and cell.cell_type == "code":
            err = next((o for o in cell.get("outputs", []) if o.output_type == "error"), None)
            if err is not None:
                what = "is not implemented yet" if err.ename == "NotImplementedError" else \
                    f"raised {err.ename}: {err.evalue}".strip()
                sub.messages.append(f"your code in cell '{m.get('grade_id', i)}' {what}")
    sub.tests.sort(key=lambda t: job.order.get(t.test, len(job.order)))       # the source's order
    return sub


def _probe_cell(work: Path) -> str:
    """The cell that runs the probe after the notebook: the probe's source itself, read here (outside the kernel)
    and executed as a fresh module that replaces whatever ``llmsys_lab.grading.probe`` the notebook imported,
    planted or patched. (Code in the kernel can still patch Python itself; what it cannot change is that the
    outputs are judged outside.)"""
    from . import probe

    path = str(Path(probe.__file__).resolve())
    source = Path(path).read_text()
    return (f"import sys as _llmsys_sys, types as _llmsys_types\n"
            f"_llmsys_probe = _llmsys_types.ModuleType('llmsys_lab.grading.probe')\n"
            f"_llmsys_probe.__file__ = {path!r}\n"
            f"exec(compile({source!r}, {path!r}, 'exec'), _llmsys_probe.__dict__)\n"
            f"_llmsys_sys.modules['llmsys_lab.grading.probe'] = _llmsys_probe\n"
            f"_llmsys_probe.run({str(work)!r})")


def _sandbox_main() -> None:
    """Inside the sandbox: run the restored notebook in a kernel; write the executed notebook and the
    cells that did not run normally (JSON) into the job folder. No verdict is decided here."""
    import nbformat

    work = Path.cwd()
    job = json.loads((work / "job.json").read_text())
    nb = nbformat.read(work / "restored.ipynb", as_version=4)
    run_dir = work / "run"
    tokens = {int(k): v for k, v in job["tokens"].items()}
    after = _probe_cell(work) if (work / "probe_calls.json").exists() else None
    problems = execute(nb, run_dir, job["timeout"], job["kernel"],
                       {"deny": job["deny"], "protect": [os.getpid(), os.getppid()], "tokens": tokens},
                       job["max_output"], after=after)
    (work / "result.json").write_text(json.dumps({"problems": problems, "notebook": nbformat.writes(nb)}))


_RESULT_LIMIT = 256 << 20


def _read_result(path: Path) -> dict | None:
    """The sandbox's answer, read as data only (no symlinks followed, size capped, JSON)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(_RESULT_LIMIT + 1)
    if len(data) > _RESULT_LIMIT:
        return None
    try:
        result = json.loads(data)
        return result if isinstance(result, dict) else None
    except ValueError:
        return None


UNSAFE = ("UNSAFE: graded WITHOUT the sandbox (--unsafe): the submission ran with the grader's rights and could "
          "have changed this result or others; not an official grade")


def grade_isolated(path, source="auto", timeout: float = 120, kernel_name: str = "python3",
                   max_output: int = MAX_OUTPUT, unsafe: bool = False, limits=None) -> Submission:
    """Grade one submission: its notebook runs in a fresh sandbox (``sandbox.run``), the grader here
    restores its cells before and scores the returned notebook after. With ``unsafe`` and no sandbox
    on this machine, the notebook runs in a plain child process instead and the result says so."""
    import nbformat

    from . import sandbox

    ok, why = sandbox.available()
    if not ok and not unsafe:
        return Submission(str(path), error=f"cannot grade officially: {why}; grading refused (pass --unsafe to "
                                           "grade without the sandbox; every result is then labelled UNSAFE)")
    try:
        job = prepare(path, source, timeout)
    except GradingError as err:
        return Submission(str(path), error=str(err))
    n_cells = sum(c.cell_type == "code" for c in job.nb.cells)
    if limits is None:
        limits = sandbox.Limits(wall_s=job.timeout * (n_cells + 3) + 600)
    with tempfile.TemporaryDirectory(prefix="llmsys-grade-job-") as tmp:
        work = Path(tmp)
        (work / "run").mkdir()
        nbformat.write(nbformat.read(Path(path), as_version=4), work / "run" / Path(path).name)  # the copy
        nbformat.write(job.nb, work / "restored.ipynb")
        (work / "job.json").write_text(json.dumps({"tokens": {str(k): v for k, v in job.tokens.items()},
                                                   "deny": job.deny, "timeout": job.timeout, "kernel": kernel_name,
                                                   "max_output": max_output}))
        from . import harness

        spec = harness.spec_for(job.sub.source) if job.sub.official else None
        try:
            inputs = harness.write_inputs(spec, work) if spec is not None else None
        except Exception as err:  # noqa: BLE001  (the grader's own failure: reported, the batch goes on)
            return Submission(str(path), error=f"the grader could not prepare its checks for this submission: "
                                               f"{type(err).__name__}: {err}")
        hide = job.deny + _hidden_home() + harness.hidden_files(spec)
        private = Path(tempfile.mkdtemp(prefix="llmsys-grade-kit-"))       # outside the (writable) job folder
        replace = harness.stripped_modules(spec, private) if spec is not None else {}
        argv = [sys.executable, "-c", "from llmsys_lab.grading import _sandbox_main; _sandbox_main()"]
        if ok:
            try:
                done = sandbox.run(argv, work=work, hide=hide, limits=limits, replace=replace)
            finally:
                shutil.rmtree(private, ignore_errors=True)
            rc, stderr, timed_out = done.returncode, done.stderr, done.timed_out
        else:
            try:
                proc = subprocess.run(argv, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, timeout=limits.wall_s)
                rc, stderr, timed_out = proc.returncode, proc.stderr, False
            except subprocess.TimeoutExpired as err:
                rc, stderr, timed_out = -9, str(err.stderr or ""), True
        result = _read_result(work / "result.json")
        verdicts = harness.decide(spec, inputs, harness.read_outputs(work)) if spec is not None else {}
    if timed_out:
        return Submission(str(path), error=f"grading took longer than the wall-time limit ({limits.wall_s:g} s) "
                                           "and was stopped")
    try:
        nb = nbformat.reads(result["notebook"], as_version=4)
        problems = {int(k): str(v) for k, v in result["problems"].items()}
    except Exception:  # noqa: BLE001  (absent, or not what the sandbox writes)
        why = f"exit code {rc}" + (f", {stderr.strip().splitlines()[-1]}" if stderr.strip() else "")
        return Submission(str(path), error=f"the grading process died while grading this submission ({why}); "
                                           "did the submission kill it?")
    if len(nb.cells) != len(job.nb.cells) or any(
            a.cell_type != b.cell_type or a.source != b.source for a, b in zip(nb.cells, job.nb.cells)):
        return Submission(str(path), error="the notebook that came back from the sandbox is not the one sent "
                                           "(cells changed): the submission tampered with its grading")
    sub = finish(job, nb, problems)
    for t in sub.tests:                      # the harness's verdict, decided here, outside the sandbox
        why = verdicts.get(t.test)
        if why and t.gradable and t.points > 0:
            t.points, t.feedback = 0.0, f"the grader's own check of your outputs failed: {why}"
    if not ok:
        sub.official = False
        sub.messages.insert(0, UNSAFE)
    return sub


def _hidden_home() -> list[str]:
    """The grader's home folder, unless the environment or the kit lives in it."""
    home = Path.home().resolve()
    kit = Path(__file__).resolve().parents[2]
    inside = [Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), kit]
    return [] if any(p == home or home in p.parents for p in inside) or home == Path("/") else [str(home)]


def grade(paths, source="auto", timeout: float = 120, kernel_name: str = "python3", max_output: int = MAX_OUTPUT,
          on_result=None, jobs: int = 1, unsafe: bool = False) -> list[Submission]:
    """Grade each submission in its own sandbox (`jobs` at a time); bad input becomes a
    Submission with `error` set and the rest go on. `on_result(results so far, in input order)` is
    called as each one finishes. Without a working sandbox every submission is refused unless
    `unsafe` (then each result is labelled UNSAFE and is not official)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    timeout = check_timeout(timeout)
    if int(jobs) < 1:
        raise GradingError(f"--jobs must be at least 1, got {jobs}")
    paths = list(paths)
    done: dict[int, Submission] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        path = paths[i]
        if source == "auto" or source is None or Path(source).exists():
            sub = grade_isolated(path, source, timeout, kernel_name, max_output, unsafe=unsafe)
        else:
            sub = Submission(str(path), error=f"source {source}: no such file or folder")
        with lock:
            done[i] = sub
            if on_result is not None:
                on_result([done[j] for j in sorted(done)])

    with ThreadPoolExecutor(max_workers=int(jobs)) as pool:
        list(pool.map(one, range(len(paths))))
    return [done[i] for i in range(len(paths))]


# ---- reports ------------------------------------------------------------------------------
def _pts(x: float) -> str:
    return f"{x:g}"


def format_table(results: list[Submission]) -> str:
    lines = []
    for sub in results:
        lines.append(sub.path + (f"  (tests from {sub.source})" if sub.source else ""))
        if sub.error:
            lines.append(f"  error: {sub.error}")
            lines.append("")
            continue
        if UNSAFE in sub.messages:
            lines.append("  UNSAFE: NOT AN OFFICIAL GRADE (graded without the sandbox, --unsafe)")
        elif not sub.official:
            lines.append("  SELF-CHECK ONLY, NOT AN OFFICIAL GRADE (--no-source: visible tests only)")
        width = max(len(t.test) for t in sub.tests)
        for t in sub.tests:
            if t.gradable:
                lines.append(f"  {t.test:<{width}}  {_pts(t.points):>4} / {_pts(t.max_points):<4} {t.feedback}".rstrip())
        lines.append(f"  {'total':<{width}}  {_pts(sub.score):>4} / {_pts(sub.max_score)}")
        for t in sub.not_gradable:
            lines.append(f"  {t.test:<{width}}  not gradable on this machine ({_pts(t.max_points)} points "
                         f"excluded): {t.feedback.split(': ', 1)[-1]}")
        lines += [f"  note: {m}" for m in sub.messages if m not in (SELF_CHECK, UNSAFE)]
        lines.append("")
    if len(results) > 1:
        width = max(len(s.path) for s in results)
        lines.append(f"{'submission':<{width}}  score")
        for sub in results:
            lines.append(f"{sub.path:<{width}}  " + ("error" if sub.error else f"{_pts(sub.score)} / {_pts(sub.max_score)}"
                                                     + ("  (UNSAFE)" if UNSAFE in sub.messages else "" if sub.official else "  (self-check)")))
    return "\n".join(lines).rstrip()


def to_json(results: list[Submission]) -> str:
    return json.dumps([s.to_dict() for s in results], indent=1)


def to_csv(results: list[Submission]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["submission", "test", "points", "max_points", "feedback"])
    for sub in results:
        if sub.error:
            w.writerow([sub.path, "", "", "", f"error: {sub.error}"])
            continue
        for t in sub.tests:
            if t.gradable:
                w.writerow([sub.path, t.test, _pts(t.points), _pts(t.max_points), t.feedback])
            else:
                w.writerow([sub.path, t.test, "not gradable", _pts(t.max_points), t.feedback])
        w.writerow([sub.path, "total", _pts(sub.score), _pts(sub.max_score), "; ".join(sub.messages)])
    return buf.getvalue()


# ---- command line -------------------------------------------------------------------------
def _check_output_path(option: str, path: str | None) -> None:
    if path is None or path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise GradingError(f"{option} {path}: is a directory; give a file name")
    if not p.parent.is_dir():
        raise GradingError(f"{option} {path}: folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise GradingError(f"{option} {path}: not writable")


def _check_sandbox(unsafe: bool) -> None:
    from . import sandbox

    ok, why = sandbox.available()
    if not ok and not unsafe:
        raise GradingError(f"the grading sandbox cannot run on this machine: {why}. Official grades need it; "
                           "pass --unsafe to grade anyway (every result is then labelled UNSAFE, not official)")
    if not ok:
        print(f"warning: {why}; grading WITHOUT the sandbox (--unsafe): results are not official",
              file=sys.stderr)


def main_grade(args) -> int:
    """`python -m llmsys_lab grade`: table on stdout, optional JSON/CSV; exit 2 if any input was bad.

    Everything that can be checked before grading is (timeout, source, kernel, output paths), and the
    JSON/CSV files are rewritten after each submission, so a finished run's results are never lost.
    """
    source = None if args.no_source else args.source
    try:
        check_timeout(args.timeout)
        if getattr(args, "jobs", 1) < 1:
            raise GradingError(f"--jobs must be at least 1, got {args.jobs}")
        if source not in (None, "auto") and not Path(source).exists():
            raise GradingError(f"source {source}: no such file or folder")
        check_kernel(args.kernel)
        _check_output_path("--json", args.json)
        _check_sandbox(getattr(args, "unsafe", False))
        _check_output_path("--csv", args.csv)
    except GradingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def write_files(results) -> None:
        for path, text in ((args.json, to_json(results)), (args.csv, to_csv(results))):
            if path and path != "-":
                Path(path).write_text(text if text.endswith("\n") else text + "\n")

    results = grade(args.submissions, source, args.timeout, args.kernel, on_result=write_files,
                    jobs=getattr(args, "jobs", 1), unsafe=getattr(args, "unsafe", False))
    for path, text in ((args.json, to_json(results)), (args.csv, to_csv(results))):
        if path == "-":
            print(text.rstrip())
    if "-" not in (args.json, args.csv):
        print(format_table(results))
    for sub in results:
        if sub.error:
            print(f"error: {sub.error}", file=sys.stderr)
    return 2 if any(sub.error for sub in results) else 0
