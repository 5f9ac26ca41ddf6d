"""Autograder for the assignments, without an nbgrader database: `python -m llmsys_lab grade`.

It grades the way `nbgrader autograde` does, so both paths give the same scores:

1. The submission's test cells and read-only cells are restored from the instructor's source
   notebook in ``solutions/`` (matched by the cells' nbgrader ``grade_id``). That puts the hidden
   tests back (students only ever see the visible part) and undoes any edit to a locked cell. A test
   cell the student deleted is put back after the cell that preceded it in the source.
2. The notebook runs top to bottom in a fresh kernel (nbclient), one cell at a time, with a time
   limit per cell. An error in a cell does not stop the run; a cell that runs past the limit is
   interrupted and counted as failed; a kernel that dies or ignores the interrupt ends the run, and
   the tests that could not run score zero with a message saying why.
3. Each test cell scores nbgrader's way: an error, or anything written to stderr, scores 0; a
   single number as the cell's result is partial credit; otherwise full points.

The same module has ``check_own_code``, which test cells use to make sure an answer is the
student's own code and not a call into the kit's implementation of the same thing.
"""
from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

SOLUTIONS = Path(__file__).resolve().parent.parent / "solutions"


class GradingError(ValueError):
    """The input cannot be graded (missing file, not a notebook, no graded cells)."""


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


def find_source(nb, source) -> Path | None:
    """The source notebook (a file, or one found under a folder) holding the submission's tests."""
    if source is None:
        return None
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise GradingError(f"source {source}: no such file or folder")
    wanted, best, best_overlap = set(graded_ids(nb)), None, 0
    for path in sorted(source.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        try:
            overlap = len(wanted & set(graded_ids(load_notebook(path))))
        except GradingError:
            continue
        if overlap > best_overlap:
            best, best_overlap = path, overlap
    return best


def restore_from_source(nb, source_nb) -> list[str]:
    """Overwrite locked cells (tests, read-only cells) with the source's; re-add deleted tests."""
    notes: list[str] = []
    source_cells = {_meta(c)["grade_id"]: c for c in source_nb.cells if "grade_id" in _meta(c)}
    seen = set()
    for cell in nb.cells:
        gid = _meta(cell).get("grade_id")
        src = source_cells.get(gid)
        if src is None:
            continue
        seen.add(gid)
        if _meta(src).get("locked") or is_test(src):
            if cell.get("cell_type") != src.cell_type or _norm(cell.source) not in (
                    _norm(src.source), _norm(visible_part(src.source))):
                notes.append(f"cell '{gid}' had been edited; the original was restored")
            cell.clear()
            cell.update(_copy_cell(src))
    order = [_meta(c).get("grade_id") for c in source_nb.cells]
    for i, gid in enumerate(order):
        if gid is None or gid in seen or not is_test(source_cells[gid]):
            continue
        before = next((g for g in reversed(order[:i]) if g in seen), None)
        at = 0 if before is None else 1 + next(j for j, c in enumerate(nb.cells) if _meta(c).get("grade_id") == before)
        nb.cells.insert(at, _copy_cell(source_cells[gid]))
        seen.add(gid)
        notes.append(f"test cell '{gid}' was missing from the submission; it was put back")
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


def execute(nb, cwd, timeout: float, kernel_name: str = "python3") -> dict[int, str]:
    """Run every code cell in one kernel; return {cell index: why it did not run normally}.

    A cell past `timeout` seconds is interrupted; nbclient then stops waiting for it (its
    `error_on_timeout` reply) and a probe cell checks that the kernel answers again.
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    problems: dict[int, str] = {}
    timed_out: list[int] = []
    message = f"still running after {timeout:g} s (an infinite loop?); interrupted"
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_name, allow_errors=True, interrupt_on_timeout=True,
        error_on_timeout={"ename": _TIMEOUT, "evalue": message, "traceback": [f"{_TIMEOUT}: {message}"]},
        on_cell_error=lambda cell, cell_index, execute_reply: (
            timed_out.append(cell_index) if execute_reply["content"].get("ename") == _TIMEOUT else None),
        resources={"metadata": {"path": str(cwd)}})
    stopped = None
    with client.setup_kernel(stderr=subprocess.DEVNULL):     # the kernel's own log lines, not cell output
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if stopped:
                problems[i] = stopped
                continue
            try:
                client.execute_cell(cell, i)
            except DeadKernelError:
                problems[i] = "the kernel died while running this cell (a crash, exit() or out of memory)"
                cell.outputs.append(_error_output("DeadKernelError", problems[i]))
                stopped = f"not run: the kernel died in cell {i}"
                continue
            if i in timed_out:
                problems[i] = f"timed out: {message}"
                cell.outputs = [o for o in cell.outputs if o.output_type != "error"]
                cell.outputs.append(_error_output("TimeoutError", problems[i]))
                if not _responds(client, timed_out):
                    stopped = f"not run: the kernel did not recover after cell {i} timed out"
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


def score_cell(cell, points: float) -> tuple[float, str]:
    """nbgrader's rule: error or stderr -> 0; a single number as result -> partial; else full."""
    for out in cell.get("outputs", []):
        if out.output_type == "error":
            if out.ename == "NotImplementedError" and not out.evalue:
                return 0.0, "NotImplementedError: something this test calls is not implemented yet"
            return 0.0, f"{out.ename}: {out.evalue}".strip()
        if out.output_type == "stream" and out.name == "stderr":
            return 0.0, f"wrote to stderr: {out.text.strip().splitlines()[0] if out.text.strip() else ''}"
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

    @property
    def passed(self) -> bool:
        return self.points >= self.max_points


@dataclass
class Submission:
    path: str
    source: str | None = None
    tests: list[TestResult] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    error: str | None = None
    notebook: object = field(default=None, repr=False, compare=False)   # the executed notebook

    @property
    def score(self) -> float:
        return sum(t.points for t in self.tests)

    @property
    def max_score(self) -> float:
        return sum(t.max_points for t in self.tests)

    def to_dict(self) -> dict:
        return {"submission": self.path, "source": self.source, "score": self.score, "max_score": self.max_score,
                "tests": [dict(asdict(t), passed=t.passed) for t in self.tests], "messages": self.messages,
                "error": self.error}


def grade_notebook(path, source="auto", timeout: float = 120, kernel_name: str = "python3") -> Submission:
    """Grade one submission (see the module docstring).

    source: a source notebook, or a folder to search for the one holding the submission's tests;
    "auto" searches the kit's solutions/ when it is there; None grades with the submission's own
    (visible) test cells only.
    """
    nb = load_notebook(path)
    sub = Submission(str(path))
    if source == "auto":
        source = SOLUTIONS if SOLUTIONS.is_dir() else None
    src_path = find_source(nb, source)
    if src_path is not None:
        src = load_notebook(src_path)
        sub.source = _display(src_path)
        sub.messages += restore_from_source(nb, src)
    else:
        sub.messages.append("no source notebook: graded with the submission's own test cells "
                            "(hidden tests not run, edited test cells not restored)")
    tests = [c for c in nb.cells if is_test(c)]
    if not tests:
        raise GradingError(f"{path}: no graded test cells (cells with nbgrader metadata grade=true); "
                           "is this an assignment notebook?")
    problems = execute(nb, Path(path).resolve().parent, timeout, kernel_name)
    sub.notebook = nb
    for i, cell in enumerate(nb.cells):
        m = _meta(cell)
        if is_test(cell):
            points, feedback = (0.0, problems[i]) if i in problems else score_cell(cell, float(m.get("points", 0)))
            sub.tests.append(TestResult(m.get("grade_id", f"cell {i}"), points, float(m.get("points", 0)),
                                        feedback))
        elif m.get("solution") and cell.cell_type == "code":
            err = next((o for o in cell.outputs if o.output_type == "error"), None)
            if err is not None:
                what = "is not implemented yet" if err.ename == "NotImplementedError" else \
                    f"raised {err.ename}: {err.evalue}".strip()
                sub.messages.append(f"your code in cell '{m.get('grade_id', i)}' {what}")
    return sub


def grade(paths, source="auto", timeout: float = 120, kernel_name: str = "python3") -> list[Submission]:
    """Grade each submission; bad input becomes a Submission with `error` set, the rest go on."""
    results = []
    for path in paths:
        try:
            results.append(grade_notebook(path, source, timeout, kernel_name))
        except GradingError as err:
            results.append(Submission(str(path), error=str(err)))
    return results


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
        width = max(len(t.test) for t in sub.tests)
        for t in sub.tests:
            lines.append(f"  {t.test:<{width}}  {_pts(t.points):>4} / {_pts(t.max_points):<4} {t.feedback}".rstrip())
        lines.append(f"  {'total':<{width}}  {_pts(sub.score):>4} / {_pts(sub.max_score)}")
        lines += [f"  note: {m}" for m in sub.messages]
        lines.append("")
    if len(results) > 1:
        width = max(len(s.path) for s in results)
        lines.append(f"{'submission':<{width}}  score")
        for sub in results:
            lines.append(f"{sub.path:<{width}}  " + ("error" if sub.error else f"{_pts(sub.score)} / {_pts(sub.max_score)}"))
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
            w.writerow([sub.path, t.test, _pts(t.points), _pts(t.max_points), t.feedback])
        w.writerow([sub.path, "total", _pts(sub.score), _pts(sub.max_score), "; ".join(sub.messages)])
    return buf.getvalue()


# ---- for test cells: is this the student's own code? ---------------------------------------
def kit_references(obj, forbid: tuple[str, ...] = (), allow: tuple[str, ...] = ()) -> list[str]:
    """Names that `obj` (a notebook function or class, and the notebook functions and classes it
    uses) takes from llmsys_lab, or that are in `forbid` (e.g. 'scaled_dot_product_attention')."""
    found: list[str] = []
    seen: set[int] = set()

    def visit_code(code, glb) -> None:
        for name in code.co_names:
            if name in forbid and name not in found:
                found.append(name)
            if name in allow or name not in glb:
                continue
            value = glb[name]
            module = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", "") or ""
            if module.split(".")[0] == "llmsys_lab" and name not in found:
                found.append(f"{name} (from {module})")
            elif module == glb.get("__name__"):
                visit(value)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                visit_code(const, glb)

    def visit(value) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, type):
            for attr in vars(value).values():
                visit(getattr(attr, "__func__", getattr(attr, "fget", attr)))
        fn = getattr(value, "fn", value)                     # a @triton.jit kernel wraps its function
        if isinstance(fn, types.FunctionType):
            visit_code(fn.__code__, fn.__globals__)

    visit(obj)
    return found


def check_own_code(obj, forbid: tuple[str, ...] = (), allow: tuple[str, ...] = ()) -> None:
    """Raise CheckFailed when `obj` calls into the kit (or a forbidden function) instead of
    implementing the computation itself."""
    from .checks import CheckFailed

    refs = kit_references(obj, forbid, allow)
    if refs:
        name = getattr(obj, "__name__", repr(obj))
        raise CheckFailed(f"{name} uses {', '.join(refs)}: this exercise asks for your own implementation "
                          "(the kit's version is the reference it is checked against)")


# ---- command line -------------------------------------------------------------------------
def main_grade(args) -> int:
    """`python -m llmsys_lab grade`: table on stdout, optional JSON/CSV; exit 2 if any input was bad."""
    import sys

    source = None if args.no_source else args.source
    if source not in (None, "auto") and not Path(source).exists():
        print(f"error: source {source}: no such file or folder", file=sys.stderr)
        return 2
    results = grade(args.submissions, source, args.timeout, args.kernel)
    for path, text in ((args.json, to_json(results)), (args.csv, to_csv(results))):
        if path == "-":
            print(text.rstrip())
        elif path:
            Path(path).write_text(text if text.endswith("\n") else text + "\n")
    if "-" not in (args.json, args.csv):
        print(format_table(results))
    for sub in results:
        if sub.error:
            print(f"error: {sub.error}", file=sys.stderr)
    return 2 if any(sub.error for sub in results) else 0
