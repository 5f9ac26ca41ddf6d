"""Both grading paths: `python -m llmsys_lab grade` and the real nbgrader cycle.

Small synthetic notebooks (no torch in the kernel, so each runs in about a second) check the
grader's rules: nbgrader's scoring, restored and hidden tests, crashes, infinite loops, a dying
kernel and bad input. The end-to-end test runs nbgrader itself (generate_assignment, autograde,
generate_feedback) on a temporary course with assignment 2 and compares its scores with the
command line's.
"""
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from llmsys_lab import grading
from llmsys_lab.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}


def nbgrader_cell(source, kind, gid, points=None):
    cell = new_code_cell(source)
    cell.metadata["nbgrader"] = {"grade": kind == "test", "grade_id": gid, "locked": kind != "answer",
                                 "schema_version": 3, "solution": kind == "answer", "task": False}
    if kind == "test":
        cell.metadata.nbgrader["points"] = points
    return cell


def write(path, cells):
    nbformat.write(new_notebook(cells=cells, metadata=KERNEL), path)
    return path


def by_test(sub):
    return {t.test: (t.points, t.feedback) for t in sub.tests}


def load_script():
    spec = importlib.util.spec_from_file_location("make_assignments", ROOT / "scripts" / "make_assignments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- scoring, crashes, hangs ----------------------------------------------------------------
@pytest.mark.notebook
def test_scoring_rules_and_reports(tmp_path, capsys):
    path = write(tmp_path / "sub.ipynb", [
        nbgrader_cell("def double(x):\n    return 2 * x", "answer", "double"),
        nbgrader_cell("assert double(2) == 4", "test", "t_pass", 2),
        nbgrader_cell("assert double(3) == 7, 'double(3) should be 7'", "test", "t_fail", 1),
        nbgrader_cell("import sys\nprint('careful', file=sys.stderr)", "test", "t_stderr", 1),
        nbgrader_cell("0.5", "test", "t_partial", 2),
        nbgrader_cell("def half(x):\n    return x / 0\nhalf_of_two = half(2)", "answer", "half"),
        nbgrader_cell("assert half_of_two == 1", "test", "t_after_crash", 1),
    ])
    json_out, csv_out = tmp_path / "grades.json", tmp_path / "grades.csv"
    assert main(["grade", str(path), "--no-source", "--timeout", "60", "--json", str(json_out),
                 "--csv", str(csv_out)]) == 0
    table = capsys.readouterr().out
    [result] = json.loads(json_out.read_text())
    tests = {t["test"]: t for t in result["tests"]}
    assert {k: t["points"] for k, t in tests.items()} == {
        "t_pass": 2, "t_fail": 0, "t_stderr": 0, "t_partial": 0.5, "t_after_crash": 0}
    assert tests["t_fail"]["feedback"] == "AssertionError: double(3) should be 7"
    assert tests["t_stderr"]["feedback"] == "wrote to stderr: careful"
    assert tests["t_partial"]["feedback"] == "partial credit: 0.5 of 2"
    assert tests["t_after_crash"]["feedback"].startswith("NameError")
    assert (result["score"], result["max_score"]) == (2.5, 7)
    assert any("'half' raised ZeroDivisionError" in m for m in result["messages"])
    assert "t_fail" in table and "2.5 / 7" in table
    rows = csv_out.read_text().splitlines()
    assert rows[0] == "submission,test,points,max_points,feedback"
    assert f"{path},t_partial,0.5,2,partial credit: 0.5 of 2" in rows
    assert rows[-1].startswith(f"{path},total,2.5,7,")


@pytest.mark.notebook
def test_hangs_and_crashes_score_zero_and_grading_goes_on(tmp_path):
    """An infinite loop is interrupted after the cell timeout; a loop that ignores the interrupt,
    or a dying kernel, ends that notebook's run; the next submission is graded normally."""
    hang = write(tmp_path / "hang.ipynb", [
        nbgrader_cell("while True:\n    pass", "test", "t_loop", 1),
        nbgrader_cell("assert 1 + 1 == 2", "test", "t_next", 1),
    ])
    stubborn = write(tmp_path / "stubborn.ipynb", [
        nbgrader_cell("assert True", "test", "t_first", 1),
        nbgrader_cell("import time\nwhile True:\n    try:\n        time.sleep(0.05)\n    except KeyboardInterrupt:\n"
                      "        pass", "test", "t_stubborn", 1),
        nbgrader_cell("assert True", "test", "t_never", 1),
    ])
    dies = write(tmp_path / "dies.ipynb", [
        nbgrader_cell("import os\nos._exit(1)", "test", "t_exit", 1),
        nbgrader_cell("assert True", "test", "t_later", 1),
    ])
    fine = write(tmp_path / "fine.ipynb", [nbgrader_cell("assert True", "test", "t_ok", 3)])
    results = grading.grade([hang, stubborn, dies, fine], source=None, timeout=2)
    hang_r, stubborn_r, dies_r, fine_r = (by_test(r) for r in results)
    assert hang_r["t_loop"][0] == 0 and "timed out" in hang_r["t_loop"][1] and "interrupted" in hang_r["t_loop"][1]
    assert hang_r["t_next"] == (1, "")
    assert stubborn_r["t_first"] == (1, "") and "timed out" in stubborn_r["t_stubborn"][1]
    assert stubborn_r["t_never"] == (0, "not run: the kernel did not recover after cell 1 timed out")
    assert dies_r["t_exit"][0] == 0 and "kernel died" in dies_r["t_exit"][1]
    assert dies_r["t_later"] == (0, "not run: the kernel died in cell 0")
    assert fine_r == {"t_ok": (3, "")}


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.notebook
def test_bad_input_gets_a_clear_error_and_the_rest_is_graded(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a notebook")
    (tmp_path / "broken.ipynb").write_text('{"cells": [')
    write(tmp_path / "lesson.ipynb", [new_markdown_cell("# no tests"), new_code_cell("x = 1")])
    good = write(tmp_path / "good.ipynb", [nbgrader_cell("assert True", "test", "t", 1)])
    paths = [tmp_path / "missing.ipynb", tmp_path / "notes.txt", tmp_path / "broken.ipynb", tmp_path / "lesson.ipynb",
             tmp_path, good]
    code = main(["grade", *map(str, paths), "--no-source", "--timeout", "60"])
    out, err = capsys.readouterr()
    assert code == 2
    assert f"{tmp_path / 'missing.ipynb'}: no such file" in err
    assert f"{tmp_path / 'notes.txt'}: not a Jupyter notebook" in err
    assert f"{tmp_path / 'broken.ipynb'}: not a Jupyter notebook" in err
    assert f"{tmp_path / 'lesson.ipynb'}: no graded test cells" in err
    assert f"{tmp_path}: is a directory, not a notebook" in err
    summary = out.split("submission")[-1]                    # the table's last part: one line per submission
    assert any(line.startswith(str(good)) and line.endswith("1 / 1  (self-check)") for line in summary.splitlines())
    assert sum(line.endswith("error") for line in summary.splitlines()) == 5


def test_missing_source_is_an_error(tmp_path, capsys):
    good = write(tmp_path / "good.ipynb", [nbgrader_cell("assert True", "test", "t", 1)])
    assert main(["grade", str(good), "--source", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err


# ---- restoring tests from the source ------------------------------------------------------
@pytest.mark.notebook
def test_source_restores_hidden_edited_and_deleted_tests(tmp_path):
    source = write(tmp_path / "source.ipynb", [
        nbgrader_cell("def square(x):\n    ### BEGIN SOLUTION\n    return x * x\n    ### END SOLUTION", "answer", "square"),
        nbgrader_cell("assert square(3) == 9\n### BEGIN HIDDEN TESTS\nassert square(-2) == 4, 'negative numbers'\n"
                      "### END HIDDEN TESTS", "test", "t_square", 2),
        nbgrader_cell("assert square(0) == 0", "test", "t_zero", 1),
        nbgrader_cell("assert square(1) == 1", "test", "t_one", 1),
    ])
    student = load_script().student_version(nbformat.read(source, as_version=4))
    assert "negative" not in nbformat.writes(student) and "raise NotImplementedError()" in student.cells[0].source
    student.cells[0].source = "def square(x):\n    return x * abs(x)"       # right on 3 and 0, wrong on -2
    student.cells[2].source = "pass  # I changed the test"                  # tampering with a locked test
    del student.cells[3]                                                    # and deleting another
    sub_path = tmp_path / "submission.ipynb"
    nbformat.write(student, sub_path)

    with_source = grading.grade_notebook(sub_path, source=tmp_path, timeout=60)
    assert with_source.source.endswith("source.ipynb")
    assert by_test(with_source) == {"t_square": (0, "AssertionError: negative numbers"), "t_zero": (1, ""),
                                    "t_one": (1, "")}
    assert "cell 't_zero' had been edited; the original was restored" in with_source.messages
    assert "test cell 't_one' was missing from the submission; it was put back" in with_source.messages
    without = grading.grade_notebook(sub_path, source=None, timeout=60)
    assert by_test(without) == {"t_square": (2, ""), "t_zero": (1, "")}      # visible tests only, as edited


# ---- check_own_code -----------------------------------------------------------------------
def test_check_own_code_finds_calls_into_the_kit(tmp_path):
    namespace = {"__name__": "__main__"}
    exec(
        "import torch.nn.functional as F\n"
        "from llmsys_lab import estimators as kit\n"
        "from llmsys_lab.attention import causal_mask\n"
        "def own(x):\n    return [v * 2 for v in x]\n"
        "def helper(cfg):\n    return kit.param_count(cfg)\n"
        "def uses_helper(cfg):\n    return own([1]) and helper(cfg)\n"
        "def uses_sdpa(q):\n    return F.scaled_dot_product_attention(q, q, q)\n"
        "def uses_mask(n):\n    return (lambda: causal_mask(n))()\n"
        "class Cache:\n    def update(self, k):\n        return own(k)\n"
        "class Cheat:\n    @property\n    def size(self):\n        return helper(None)\n",
        namespace)
    refs = grading.kit_references
    assert refs(namespace["own"]) == [] and refs(namespace["Cache"]) == []
    assert refs(namespace["uses_helper"]) == ["kit (from llmsys_lab.estimators)"]
    assert refs(namespace["uses_sdpa"], forbid=("scaled_dot_product_attention",)) == ["scaled_dot_product_attention"]
    assert refs(namespace["uses_mask"]) == ["causal_mask (from llmsys_lab.attention)"]
    assert refs(namespace["Cheat"]) == ["kit (from llmsys_lab.estimators)"]
    own_sdpa = {"__name__": "__main__"}
    exec("def scaled_dot_product_attention(q):\n    return q * 2\n", own_sdpa)
    assert refs(own_sdpa["scaled_dot_product_attention"], forbid=("scaled_dot_product_attention",)) == []


SNEAKY = (
    "import torch\n"
    "import torch.nn.functional as F\n"
    "from llmsys_lab import estimators as kit\n"
    "from llmsys_lab.attention import causal_mask\n"
    "def own(q):\n    return torch.softmax(q @ q.transpose(-2, -1), -1) @ q\n"
    "def scaled_dot_product_attention(q):          # the student's own helper, with the forbidden name\n"
    "    return own(q)\n"
    "def uses_own_helper(q):\n    return scaled_dot_product_attention(q)\n"
    "def default_arg(q, _f=F.scaled_dot_product_attention):\n    return _f(q, q, q)\n"
    "def _make():\n    m = causal_mask\n    return lambda n: m(n, n)\n"
    "closure = _make()\n"
    "class Callable:\n    def __call__(self, q):\n        return getattr(F, 'scaled_dot_' + 'product_attention')(q, q, q)\n"
    "def by_eval(q):\n    return eval('F.scaled_dot_product_attention')(q, q, q)\n"
    "def via_kit_module(cfg):\n    return getattr(kit, 'param_count')(cfg)\n"
    "def swallowed(n):\n    try:\n        return causal_mask(n, n)\n    except AssertionError:\n        return None\n"
    "def switches_tracing_off(n):\n    import sys\n    sys.setprofile(None)\n    return causal_mask(n, n)\n")


def test_check_own_code_traces_what_the_code_really_calls():
    """The rule judges the calls made while the test runs, not the names in the source."""
    import torch

    from llmsys_lab.checks import CheckFailed, finish_own_code
    from llmsys_lab.presets import get_preset

    ns = {"__name__": "__main__"}
    exec(SNEAKY, ns)
    q = torch.randn(1, 1, 3, 4)
    for name, arg in (("own", q), ("uses_own_helper", q)):
        grading.check_own_code(ns[name], forbid=("scaled_dot_product_attention",))
        ns[name](arg)
        finish_own_code()                                   # passes: the student's own code
    cases = {"default_arg": (ns["default_arg"], q, "scaled_dot_product_attention"),
             "closure": (ns["closure"], 3, "causal_mask (from llmsys_lab.attention)"),
             "callable": (ns["Callable"](), q, "scaled_dot_product_attention"),
             "eval": (ns["by_eval"], q, "scaled_dot_product_attention"),
             "getattr on the kit": (ns["via_kit_module"], get_preset("llmsys-tiny"), "param_count")}
    for case, (fn, arg, called) in cases.items():
        grading.check_own_code(fn, forbid=("scaled_dot_product_attention",))
        with pytest.raises(CheckFailed, match="your code called .*" + called.split(" ")[0]):
            fn(arg)
        with pytest.raises(CheckFailed, match="your own implementation"):
            finish_own_code()                                # the end of the test cell
    grading.check_own_code(ns["swallowed"])
    assert ns["swallowed"](3) is None                       # the code caught the failure ...
    with pytest.raises(CheckFailed, match="causal_mask"):
        finish_own_code()                                    # ... the test still fails
    grading.check_own_code(ns["switches_tracing_off"])
    ns["switches_tracing_off"](3)
    with pytest.raises(CheckFailed, match="sys.setprofile"):
        finish_own_code()


def test_check_own_code_allows_what_the_test_gives_and_what_the_kit_calls_itself():
    """A kit object the test hands to the student's code (allow=...) may be used, and the kit
    functions it calls in turn are not the student's calls; a forbidden name is forbidden only when
    the student's code calls it."""
    from llmsys_lab.checks import CheckFailed, finish_own_code

    ns = {"__name__": "__main__"}
    exec("from llmsys_lab.kv_cache import KVCache\n"
         "from llmsys_lab.configs import ModelConfig\n"
         "def uses_given(cfg):\n    c = KVCache.for_model(cfg, 1, 8)\n    c.truncate(0)\n    return c\n"
         "def truncate_itself(cfg):\n    c = KVCache.for_model(cfg, 1, 8)\n    return c.truncate(0)\n", ns)
    from llmsys_lab.presets import get_preset

    cfg = get_preset("llmsys-tiny")
    grading.check_own_code(ns["uses_given"], allow=("KVCache",))
    ns["uses_given"](cfg)
    finish_own_code()                                        # KVCache's methods were allowed
    grading.check_own_code(ns["uses_given"])
    with pytest.raises(CheckFailed, match="KVCache.for_model"):
        ns["uses_given"](cfg)                                # not allowed: the student's call into the kit
    with pytest.raises(CheckFailed):
        finish_own_code()
    grading.check_own_code(ns["truncate_itself"], forbid=("truncate",), allow=("KVCache.for_model",))
    with pytest.raises(CheckFailed, match="truncate"):
        ns["truncate_itself"](cfg)                           # forbidden, called by the student's code
    with pytest.raises(CheckFailed):
        finish_own_code()


# ---- the nbgrader cycle -------------------------------------------------------------------
def fill_in(release, source, answer_ids):
    """A student's submission: the released notebook with some answers written in."""
    answers = {c.metadata.nbgrader["grade_id"]: "\n".join(l for l in c.source.splitlines() if "### " not in l)
               for c in source.cells if c.metadata.get("nbgrader", {}).get("solution")}
    nb = copy.deepcopy(release)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answer_ids:
            cell.source = answers[gid]
    return nb


@pytest.mark.notebook
def test_nbgrader_cycle_and_cli_agree(tmp_path):
    """generate_assignment -> (submissions) -> autograde -> generate_feedback, offline, with nbgrader
    itself; full marks for the solution, zero for the stub, partial for a half-solved notebook."""
    from nbgrader.api import Gradebook

    name, nb_name = "02_estimators", "estimators.ipynb"
    course = tmp_path / "course"
    (course / "source" / name).mkdir(parents=True)
    shutil.copy(ROOT / "solutions" / name / nb_name, course / "source" / name / nb_name)
    (course / "nbgrader_config.py").write_text(
        'c = get_config()\nc.CourseDirectory.course_id = "llmsys-lab"\nc.Execute.timeout = 300\n')
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    def nbgrader(*args):
        done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"

    nbgrader("generate_assignment", name)
    release = course / "release" / name / nb_name
    assert release.read_text() == (ROOT / "assignments" / name / nb_name).read_text(), \
        "nbgrader's release differs from assignments/ (make assignments)"

    source, released = nbformat.read(course / "source" / name / nb_name, 4), nbformat.read(release, 4)
    students = {"ada": ["param_count", "forward_flops", "kv_bytes_per_token", "compute_optimal"],   # solved
                "bob": [],                                                                          # untouched
                "cy": ["param_count", "kv_bytes_per_token"]}                                       # half
    paths = []
    for student, answers in students.items():
        folder = course / "submitted" / student / name
        folder.mkdir(parents=True)
        nbformat.write(fill_in(released, source, answers), folder / nb_name)
        paths.append(folder / nb_name)

    # the command line grades the same submissions meanwhile (against the same source)
    cli = subprocess.Popen([sys.executable, "-m", "llmsys_lab", "grade", *map(str, paths), "--source",
                            str(course / "source"), "--timeout", "300", "--json", "-"],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        nbgrader("autograde", name)
        nbgrader("generate_feedback", name)
    finally:
        cli_out, cli_err = cli.communicate(timeout=900)
    assert cli.returncode == 0, cli_err

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        scores = {s: gb.find_submission(name, s).score for s in students}
        per_test = {s: {g.name: g.score for g in gb.find_submission(name, s).notebooks[0].grades} for s in students}
    assert scores == {"ada": 10, "bob": 0, "cy": 5}
    cli_results = {Path(r["submission"]).parts[-3]: r for r in json.loads(cli_out)}
    for student in students:
        assert {t["test"]: t["points"] for t in cli_results[student]["tests"]} == per_test[student], student
    for student in students:
        html = (course / "feedback" / student / name / nb_name.replace(".ipynb", ".html")).read_text()
        assert f"estimators (Score: {scores[student]:.1f} / 10.0)" in html


# ---- the grader's own robustness ----------------------------------------------------------
@pytest.mark.parametrize("timeout", ["0", "-5", "nan"])
def test_a_timeout_that_is_not_positive_is_refused(tmp_path, capsys, timeout):
    good = write(tmp_path / "good.ipynb", [nbgrader_cell("assert True", "test", "t", 1)])
    assert main(["grade", str(good), "--no-source", f"--timeout={timeout}"]) == 2
    assert "--timeout must be a positive number of seconds" in capsys.readouterr().err
    with pytest.raises(grading.GradingError, match="positive"):
        grading.grade([good], source=None, timeout=0)


def test_bad_kernel_and_output_paths_are_refused_before_grading(tmp_path, capsys):
    good = write(tmp_path / "good.ipynb", [nbgrader_cell("assert True", "test", "t", 1)])
    cases = [(["--kernel", "nonexistent"], "--kernel nonexistent: no such Jupyter kernel"),
             (["--json", "/nonexistent/dir/x.json"], "--json /nonexistent/dir/x.json: folder /nonexistent/dir does not exist"),
             (["--csv", str(tmp_path)], f"--csv {tmp_path}: is a directory")]
    for extra, message in cases:
        assert main(["grade", str(good), "--no-source", "--timeout", "60", *extra]) == 2
        out, err = capsys.readouterr()
        assert message in err and "Traceback" not in err and out == ""


@pytest.mark.notebook
def test_output_is_capped_per_cell_and_results_are_written_as_they_come(tmp_path):
    loud = write(tmp_path / "loud.ipynb", [
        nbgrader_cell("for i in range(200_000):\n    print('spam spam spam spam', i)", "answer", "spam"),
        nbgrader_cell("assert True", "test", "t", 1)])
    seen = []
    [sub] = grading.grade([loud], source=None, timeout=60, max_output=10_000,
                          on_result=lambda results: seen.append([r.path for r in results]))
    assert seen == [[str(loud)]]
    assert sub.score == 1
    text = "".join(o.get("text", "") for o in sub.notebook.cells[0].outputs)
    assert len(text) < 12_000 and "output truncated by the grader: more than 10,000 characters" in text


@pytest.mark.notebook
def test_no_source_is_an_error_and_no_source_flag_is_a_labelled_self_check(tmp_path, capsys):
    lone = write(tmp_path / "lone.ipynb", [nbgrader_cell("pass", "test", "not_in_any_source", 5)])
    source = write(tmp_path / "src" / "s.ipynb", [nbgrader_cell("assert False", "test", "other", 1)]) \
        if (tmp_path / "src").mkdir() is None else None
    assert main(["grade", str(lone), "--source", str(source.parent), "--timeout", "60"]) == 2
    assert "no source notebook" in capsys.readouterr().err
    assert main(["grade", str(lone), "--no-source", "--timeout", "60", "--json", str(tmp_path / "r.json")]) == 0
    assert "NOT AN OFFICIAL GRADE" in capsys.readouterr().out
    [result] = json.loads((tmp_path / "r.json").read_text())
    assert result["official"] is False and result["score"] == 5


# ---- machines without Triton ----------------------------------------------------------------
# hide Triton as on macOS: the import blocker tests/test_no_triton.py uses too
NO_TRITON_SITE = Path(__file__).resolve().parent / "no_triton_site"


@pytest.mark.notebook
def test_triton_parts_are_not_gradable_without_triton(tmp_path):
    """Assignment 6 on a machine where `import triton` fails: parts 1-2 pass, the kernel's three tests
    are 'not gradable on this machine' (excluded from score and maximum), the rest runs with notes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(NO_TRITON_SITE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "llmsys_lab", "grade",
                           str(ROOT / "solutions" / "06_flash_attention" / "flash_attention.ipynb"), "--timeout", "300",
                           "--json", str(out), "--csv", str(tmp_path / "r.csv")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads(out.read_text())
    tests = {t["test"]: t for t in result["tests"]}
    assert [n for n, t in tests.items() if t["passed"]] == ["test_merge", "test_online_attention"]
    assert result["not_gradable"] == ["test_flash_forward", "test_flash_causal", "test_flash_ragged"]
    assert all("not gradable on this machine" in tests[n]["feedback"] and "needs Triton" in tests[n]["feedback"]
               for n in result["not_gradable"])
    assert (result["score"], result["max_score"]) == (4, 4)
    assert "not gradable on this machine (3 points excluded)" in done.stdout
    assert "test_flash_forward,not gradable,3," in (tmp_path / "r.csv").read_text()
    assert not any(m.startswith("your code") for m in result["messages"]), result["messages"]


@pytest.mark.notebook
def test_importing_triton_before_the_kit_without_a_gpu_is_refused():
    code = ("import os, torch\nassert not torch.cuda.is_available()\nimport triton.language\n"
            "try:\n    import llmsys_lab\nexcept RuntimeError as err:\n    print('refused:', err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "refused: triton was imported before llmsys_lab" in done.stdout, done.stdout + done.stderr
    assert "import llmsys_lab` before `import triton`" in done.stdout


# ---- messages the checks give ---------------------------------------------------------------
def test_nan_mismatch_says_how_many_nans():
    import torch

    from llmsys_lab.checks import compare

    actual, expected = torch.zeros(2, 3), torch.zeros(2, 3)
    actual[0, 0] = actual[1, 2] = float("nan")
    assert compare(actual, expected, "out") == \
        "out[(0, 0)] is nan, expected 0.0 (NaN mismatch: out has 2 NaN of 6 elements, the reference 0)"


def test_gqa_hidden_test_names_the_wrong_exception():
    """Assignment 1: a GQA that fails on 6 query / 4 K/V heads with a RuntimeError is told what was expected."""
    from llmsys_lab.checks import CheckFailed, finish_own_code

    nb = nbformat.read(ROOT / "solutions" / "01_attention" / "attention.ipynb", as_version=4)
    cells = {c.metadata.get("nbgrader", {}).get("grade_id"): c.source for c in nb.cells}
    ns = {"__name__": "__main__"}
    exec(cells["setup"], ns)
    exec(cells["attention"], ns)
    exec(cells["causal_mask"], ns)
    exec(cells["causal_attention"], ns)
    exec("def gqa_attention(q, k, v, causal=False):\n"
         "    b, h, t, d = q.shape\n"
         "    k = k[:, :, None].expand(b, k.shape[1], h // k.shape[1], *k.shape[2:]).reshape(b, h, *k.shape[2:])\n"
         "    v = v[:, :, None].expand(b, v.shape[1], h // v.shape[1], *v.shape[2:]).reshape(b, h, *v.shape[2:])\n"
         "    return causal_attention(q, k, v) if causal else attention(q, k, v)\n", ns)
    try:
        with pytest.raises(CheckFailed, match="expected ValueError naming 6 and 4, got RuntimeError: "):
            exec(cells["test_gqa"], ns)
    finally:
        finish_own_code()


def test_an_unfinished_triton_kernel_on_a_gpu_is_reported_as_not_implemented():
    """On a GPU, Triton's compiler refuses the stub's `raise NotImplementedError()` with an AST message;
    the grade says what it means. Another compile error, or a student's own raise, is reported as is."""
    raised = ("at 4:4:\ndef add_rmsnorm_kernel(x_ptr, n_cols, BLOCK: tl.constexpr):\n    # YOUR CODE HERE\n"
              "    raise NotImplementedError()\n    ^\nunsupported AST node type: Raise")

    def cell(ename, evalue):
        return nbformat.v4.new_code_cell("t()", outputs=[nbformat.v4.new_output(
            "error", ename=ename, evalue=evalue, traceback=[])])

    for ename in ("UnsupportedLanguageConstruct", "triton.compiler.errors.CompilationError"):
        got, why = grading.score_cell(cell(ename, raised), 3)
        assert got == 0.0 and "Triton kernel this test calls is not implemented yet" in why, why
    own = raised.replace("NotImplementedError()", "ValueError('bad')")
    got, why = grading.score_cell(cell("UnsupportedLanguageConstruct", own), 3)
    assert got == 0.0 and why.startswith("UnsupportedLanguageConstruct: at 4:4") and "not implemented" not in why
    got, why = grading.score_cell(cell("CompilationError", "at 1:2: some other compile error"), 3)
    assert why == "CompilationError: at 1:2: some other compile error"
