"""Submissions that attack the grader: each must score exactly what its honest answers deserve.

Every submission is assignment 1's student notebook (the fastest assignment) with the same honest
answers -- `attention` right (3 points), the causal mask, causal attention and GQA wrong -- plus one
attack in an answer cell. So each must score 3 / 10, whatever the attack tried. All of them are
graded in one batch (`grading.grade`, a child process per submission, as the command line does).
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from llmsys_lab import grading

pytestmark = pytest.mark.notebook          # grades forged notebooks (make test-fast leaves them out)

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "solutions" / "01_attention" / "attention.ipynb"
STUDENT = ROOT / "assignments" / "01_attention" / "attention.ipynb"

HONEST = {
    "attention": "def attention(q, k, v):\n"
                 "    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v\n",
    "causal_mask": "def causal_mask(t_q, t_k):\n    return torch.ones(t_q, t_k, dtype=torch.bool)   # wrong\n",
    "causal_attention": "def causal_attention(q, k, v):\n    return attention(q, k, v)   # wrong: no mask\n",
    "gqa_attention": "def gqa_attention(q, k, v, causal=False):\n    return attention(q, k, v)   # wrong: no repeat\n",
}
RIGHT = {   # the solution's answers (for submissions whose answers are all right)
    "causal_mask": "def causal_mask(t_q, t_k):\n"
                   "    return torch.arange(t_k)[None, :] <= torch.arange(t_q)[:, None] + (t_k - t_q)\n",
    "causal_attention": "def causal_attention(q, k, v):\n"
                        "    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])\n"
                        "    s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), float('-inf'))\n"
                        "    return torch.softmax(s, dim=-1) @ v\n",
    "gqa_attention": "def gqa_attention(q, k, v, causal=False):\n"
                     "    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:\n"
                     "        raise ValueError(f'{k.shape[1]} K/V heads must divide {q.shape[1]} query heads')\n"
                     "    g = q.shape[1] // k.shape[1]\n"
                     "    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)\n"
                     "    return causal_attention(q, k, v) if causal else attention(q, k, v)\n",
}

SWALLOW_CUSTOM_EXC = "get_ipython().set_custom_exc((BaseException,), lambda *args, **kwargs: None)\n"
SWALLOW_EVERYTHING = (
    "import io, sys\n"
    "sys.excepthook = lambda *args: None\n"
    "get_ipython().showtraceback = lambda *args, **kwargs: None\n"
    "type(get_ipython()).showtraceback = lambda *args, **kwargs: None\n"
    "get_ipython()._showtraceback = lambda *args, **kwargs: None\n"
    "sys.stderr = io.StringIO()\n")
REDEFINE_HELPERS = (
    "def check_close(*args, **kwargs):\n    print('OK')\n"
    "check_own_code = lambda *args, **kwargs: None\n"
    "class CheckFailed(Exception):\n    pass\n")
PATCH_MODULES = (
    "import builtins, llmsys_lab.checks, llmsys_lab.grading\n"
    "llmsys_lab.checks.compare = lambda *args, **kwargs: None\n"
    "llmsys_lab.checks.check_close.__code__ = (lambda *args, **kwargs: None).__code__\n"
    "llmsys_lab.grading.check_own_code = lambda *args, **kwargs: None\n"
    "_real_isinstance = builtins.isinstance\n"
    "builtins.AssertionError = type('AssertionError', (Exception,), {})\n")
READ_SOLUTIONS = (
    "import glob, json, os, pathlib, llmsys_lab, llmsys_lab.grading as grading\n"
    "places = [pathlib.Path(llmsys_lab.__file__).resolve().parents[1] / 'solutions',\n"
    "          pathlib.Path('..') / 'solutions', pathlib.Path('../..') / 'solutions', pathlib.Path.cwd() / 'solutions']\n"
    "places += [pathlib.Path(v) / 'solutions' for v in os.environ.values() if os.path.isdir(v)]\n"
    "places += [getattr(grading, 'SOLUTIONS', pathlib.Path('/nonexistent'))]\n"
    "stolen = 0\n"
    "for place in places:\n"
    "    try:\n"
    "        text = (place / '01_attention' / 'attention.ipynb').read_text()\n"
    "    except OSError:\n"
    "        continue\n"
    "    for cell in json.loads(text)['cells']:\n"
    "        if cell.get('metadata', {}).get('nbgrader', {}).get('solution'):\n"
    "            exec(''.join(cell['source']), globals())\n"
    "            stolen += 1\n"
    "    break\n"
    "print('cells stolen:', stolen)\n")
ESCAPE_OWN_CODE = {   # right answers, each made by the kit or SDPA in a way a scan of the names does not see
    "attention": "def attention(q, k, v, _f=F.scaled_dot_product_attention):   # a default argument\n"
                 "    return _f(q, k, v)\n",
    "causal_mask": "def _make():\n    from llmsys_lab.attention import causal_mask as m\n"
                   "    return lambda t_q, t_k: m(t_q, t_k)\n"
                   "causal_mask = _make()                                   # a closure\n",
    "causal_attention": "def causal_attention(q, k, v):\n"
                        "    return eval('F.scaled_dot' + '_product_attention')(q, k, v, is_causal=True)   # eval\n",
    "gqa_attention": "class _G:\n    def __call__(self, q, k, v, causal=False):\n"
                     "        f = getattr(F, 'scaled_dot_product_attention'.strip())\n"
                     "        return f(q, k, v, is_causal=causal, enable_gqa=True)\n"
                     "gqa_attention = _G()                                   # a callable object\n",
}
OWN_HELPER_NAMED_SDPA = {   # right answers that use the student's own helper called scaled_dot_product_attention
    "attention": "def scaled_dot_product_attention(q, k, v, mask=None):\n"
                 "    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])\n"
                 "    if mask is not None:\n        s = s.masked_fill(~mask, float('-inf'))\n"
                 "    return torch.softmax(s, dim=-1) @ v\n"
                 "def attention(q, k, v):\n    return scaled_dot_product_attention(q, k, v)\n",
    "causal_attention": "def causal_attention(q, k, v):\n"
                        "    return scaled_dot_product_attention(q, k, v, causal_mask(q.shape[-2], k.shape[-2]))\n",
}


def student(answers: dict, extra: str = "", extra_after: str = "causal_mask") -> nbformat.NotebookNode:
    """The student notebook with `answers` filled in and `extra` appended to answer cell `extra_after`."""
    nb = nbformat.read(STUDENT, as_version=4)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers:
            cell.source = answers[gid] + (extra if gid == extra_after else "")
    return nb


def graded_cells(nb):
    return [c for c in nb.cells if grading.is_test(c)]


def forged_extra_cell():
    nb = student(HONEST)
    cell = copy.deepcopy(graded_cells(nb)[0])
    cell.metadata.nbgrader.update(grade_id="bonus_points", points=1000)
    cell.source, cell.id = "pass", "bonus-points"
    nb.cells.append(cell)
    return nb


def duplicated_tests():
    nb = student(HONEST)
    for i, cell in enumerate(graded_cells(nb)):
        dup = copy.deepcopy(cell)
        dup.source, dup.id = "pass", f"dup-{i}"
        nb.cells.insert(1, dup)                                 # a 'pass' copy of each test, before the real ones
    return nb


def renamed_test_ids():
    nb = student(HONEST)
    for cell in graded_cells(nb):
        cell.metadata.nbgrader["grade_id"] += "_mine"
        cell.source = "pass"
    return nb


def renamed_every_id():
    nb = renamed_test_ids()
    for cell in nb.cells:
        if "nbgrader" in cell.metadata and not cell.metadata.nbgrader["grade_id"].endswith("_mine"):
            cell.metadata.nbgrader["grade_id"] += "_mine"
    return nb


def signals_the_grader():
    return student(HONEST, "import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                           "except PermissionError as err:\n    print(err)\n")


def kills_the_grader():     # through a subprocess, which the kernel's audit hook does not see
    return student(HONEST, "import os, subprocess\nsubprocess.run(['kill', '-9', str(os.getppid())])\n")


ALIAS_KIT = {   # the kit's own functions under the answers' names (alias, functools.partial, a copied __code__)
    "attention": "import llmsys_lab.attention\nattention = llmsys_lab.attention.scaled_dot_product_attention\n",
    "causal_mask": "import functools, importlib\n"
                   "causal_mask = functools.partial(importlib.import_module('llmsys_lab.attention').causal_mask)\n",
    "causal_attention": "def causal_attention(q, k, v):\n    pass\n"
                        "from llmsys_lab.attention import scaled_dot_product_attention as _kit\n"
                        "causal_attention.__code__ = _kit.__code__\n",
    "gqa_attention": "import llmsys_lab.attention as _kit\n"
                     "gqa_attention = lambda q, k, v, causal=False: _kit.scaled_dot_product_attention(q, k, v, "
                     "causal=causal)\n",
}
FORGE_COMPLETION = (   # turn each failing test's error into the grader's completion line (read from the cell's code)
    "import re, jupyter_client.session as _s\n"
    "from llmsys_lab.grading.guard import MARK as _MARK\n"
    "_send = _s.Session.send\n"
    "def _forged(self, stream, msg_or_type, content=None, parent=None, *args, **kwargs):\n"
    "    kind = msg_or_type if isinstance(msg_or_type, str) else msg_or_type.get('msg_type')\n"
    "    code = get_ipython().user_ns['In'][-1] if get_ipython().user_ns.get('In') else ''\n"
    "    token = re.search(r\"_llmsys_guard.end\\('([0-9a-f]+)'\\)\", code or '')\n"
    "    if token and kind == 'error':\n"
    "        return _send(self, stream, 'stream', {'name': 'stdout', 'text': _MARK + token.group(1) + '\\n'},\n"
    "                     parent, *args, **kwargs)\n"
    "    if token and kind == 'execute_reply' and content and content.get('status') == 'error':\n"
    "        content = {'status': 'ok', 'execution_count': content.get('execution_count'), 'user_expressions': {},\n"
    "                   'payload': []}\n"
    "    return _send(self, stream, msg_or_type, content, parent, *args, **kwargs)\n"
    "_s.Session.send = _forged\n")
READ_SOLUTIONS_DIR_FD = (   # pure Python, relative to a directory fd (the audit event carries no dir_fd)
    "import json, os, pathlib, llmsys_lab\n"
    "root = os.open(pathlib.Path(llmsys_lab.__file__).resolve().parents[1], os.O_RDONLY)\n"
    "stolen = 0\n"
    "try:\n"
    "    fd = os.open('solutions/01_attention/attention.ipynb', os.O_RDONLY, dir_fd=root)\n"
    "    text = b''\n"
    "    while chunk := os.read(fd, 1 << 16):\n"
    "        text += chunk\n"
    "    for cell in json.loads(text)['cells']:\n"
    "        if cell.get('metadata', {}).get('nbgrader', {}).get('solution'):\n"
    "            exec(''.join(cell['source']), globals())\n"
    "            stolen += 1\n"
    "except OSError as err:\n"
    "    print('refused:', type(err).__name__)\n"
    "print('cells stolen:', stolen)\n")


def unanswered(extra: str) -> nbformat.NotebookNode:
    """The untouched stub with `extra` appended to its first answer cell."""
    nb = nbformat.read(STUDENT, as_version=4)
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "attention")
    cell.source += "\n" + extra
    return nb


# name: (notebook, expected points per test)
ATTACKS = {
    "swallow_custom_exc": (lambda: student(HONEST, SWALLOW_CUSTOM_EXC), 3),
    "kills_the_grader": (kills_the_grader, None),
    "signals_the_grader": (signals_the_grader, 3),
    "swallow_everything": (lambda: student(HONEST, SWALLOW_EVERYTHING), 3),
    "redefine_helpers": (lambda: student(HONEST, REDEFINE_HELPERS), 3),
    "patch_modules": (lambda: student(HONEST, PATCH_MODULES), 3),
    "read_solutions": (lambda: student(HONEST, READ_SOLUTIONS, extra_after="gqa_attention"), 3),
    "escape_own_code": (lambda: student(ESCAPE_OWN_CODE), 0),
    "own_helper_named_sdpa": (lambda: student({**RIGHT, **OWN_HELPER_NAMED_SDPA}), 10),
    "forged_extra_cell": (forged_extra_cell, 3),
    "duplicated_tests": (duplicated_tests, 3),
    "renamed_test_ids": (renamed_test_ids, 3),
    "alias_kit_functions": (lambda: student(ALIAS_KIT), 0),
    "forge_completion_unanswered": (lambda: unanswered(FORGE_COMPLETION), 0),
    "read_solutions_dir_fd": (lambda: student(HONEST, READ_SOLUTIONS_DIR_FD, extra_after="gqa_attention"), 3),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("redteam")
    paths = []
    for name, (build, _) in ATTACKS.items():
        nbformat.write(build(), folder / f"{name}.ipynb")
        paths.append(folder / f"{name}.ipynb")
    results = grading.grade(paths, source=ROOT / "solutions", timeout=60, jobs=2)
    return {Path(r.path).stem: r for r in results}


@pytest.mark.parametrize("name", [n for n, (_, points) in ATTACKS.items() if points is not None])
def test_attack_scores_what_the_honest_answers_deserve(graded, name):
    sub = graded[name]
    assert sub.error is None, sub.error
    assert sub.official and sub.source == "solutions/01_attention/attention.ipynb"
    assert [(t.test, t.max_points) for t in sub.tests] == [
        ("test_attention", 3), ("test_causal_mask", 2), ("test_causal_attention", 2), ("test_gqa", 3)]
    assert (sub.score, sub.max_score) == (ATTACKS[name][1], 10), [(t.test, t.points, t.feedback) for t in sub.tests]


def test_what_each_attack_is_told(graded):
    feedback = {n: {t.test: t.feedback for t in graded[n].tests} for n in graded}
    assert "suppressed" in feedback["swallow_custom_exc"]["test_causal_mask"] or \
        "CheckFailed" in feedback["swallow_custom_exc"]["test_causal_mask"]
    assert "your code called" in feedback["escape_own_code"]["test_attention"]
    assert "scaled_dot_product_attention" in feedback["escape_own_code"]["test_causal_attention"]
    # the closure over the kit's causal_mask cannot even be built: the module is absent from the sandbox
    assert "name 'causal_mask' is not defined" in feedback["escape_own_code"]["test_causal_mask"]
    assert "your code in cell 'causal_mask' raised ModuleNotFoundError: No module named 'llmsys_lab.attention'" \
        in graded["escape_own_code"].messages
    assert "scaled_dot_product_attention" in feedback["escape_own_code"]["test_gqa"]
    messages = graded["forged_extra_cell"].messages
    assert "graded cell 'bonus_points' is not in the source notebook: ignored (run as ordinary code, no points)" \
        in messages
    assert sum("repeats a grade id" in m for m in graded["duplicated_tests"].messages) == 4
    assert sum("was missing from the submission; it was put back" in m for m in graded["renamed_test_ids"].messages) == 4
    # the solutions could not be read: the answer cell says so in its output
    nb = graded["read_solutions"].notebook
    out = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "cells stolen: 0" in out
    out = "".join(o.get("text", "") for c in graded["read_solutions_dir_fd"].notebook.cells
                  for o in c.get("outputs", []))
    assert "cells stolen: 0" in out
    # the forgery fooled every in-kernel verdict; the harness outside, which checks the returned outputs, did not
    assert all(f.startswith("the grader's own check of your outputs failed") and "NotImplementedError" in f
               for f in feedback["forge_completion_unanswered"].values()), feedback["forge_completion_unanswered"]
    # the kit's module is absent from the sandbox: the alias cannot even be made
    assert any("No module named 'llmsys_lab.attention'" in m for m in graded["alias_kit_functions"].messages), \
        graded["alias_kit_functions"].messages


def test_a_submission_that_kills_its_grader_loses_only_its_own_result(graded):
    sub = graded["kills_the_grader"]
    assert sub.error and "grading process died" in sub.error
    names = list(graded)
    assert names.index("kills_the_grader") < names.index("signals_the_grader")   # graded after it, normally
    assert graded["signals_the_grader"].error is None


def test_renaming_every_grade_id_is_an_error_not_a_self_check(tmp_path):
    path = tmp_path / "renamed.ipynb"
    nbformat.write(renamed_every_id(), path)
    done = subprocess.run([sys.executable, "-m", "llmsys_lab", "grade", str(path), "--timeout", "60", "--json", "-"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout
    [result] = json.loads(done.stdout)
    assert result["error"] and "no source notebook" in result["error"] and result["score"] == 0
    assert "no source notebook" in done.stderr


# ---- assignment 11: the kit's fit instead of one's own -----------------------------------------------------------
def scaling_student(kit_fit: bool) -> nbformat.NotebookNode:
    """Assignment 11's student notebook with the solution's answers; with kit_fit, fit_law returns the kit's
    Chinchilla fit (right numbers, not the student's code) reached through a default argument."""
    source = nbformat.read(ROOT / "solutions" / "11_scaling_laws" / "scaling_laws.ipynb", as_version=4)
    answers = {c.metadata.nbgrader["grade_id"]: c.source for c in source.cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    if kit_fit:
        answers["fit_law"] = ("def fit_law(n_params, n_tokens, losses, _fit=kit.fit_chinchilla):\n"
                              "    return _fit(n_params, n_tokens, losses).law.as_dict()\n")
    nb = nbformat.read(ROOT / "assignments" / "11_scaling_laws" / "scaling_laws.ipynb", as_version=4)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers:
            cell.source = answers[gid]
    return nb


def test_calling_the_kits_fit_scores_zero_for_that_part_only(tmp_path):
    paths = []
    for name, kit_fit in (("honest", False), ("kit_fit", True)):
        nbformat.write(scaling_student(kit_fit), tmp_path / f"{name}.ipynb")
        paths.append(tmp_path / f"{name}.ipynb")
    results = {Path(r.path).stem: r for r in grading.grade(paths, source=ROOT / "solutions", timeout=300, jobs=2)}
    honest, cheat = results["honest"], results["kit_fit"]
    assert honest.error is None and cheat.error is None, (honest.error, cheat.error)
    assert cheat.source == "solutions/11_scaling_laws/scaling_laws.ipynb"
    assert (honest.score, honest.max_score) == (10, 10), [(t.test, t.points, t.feedback) for t in honest.tests]
    points = {t.test: t.points for t in cheat.tests}
    assert points == {"test_fit_law": 0, "test_compute_optimal": 3, "test_longer_or_bigger": 3}, points
    feedback = {t.test: t.feedback for t in cheat.tests}["test_fit_law"]
    assert "your code called" in feedback and "fit_chinchilla" in feedback, feedback
# ---- assignment 12: the kit's MLA pieces instead of the student's own ---------------------------------
A12_SOURCE = ROOT / "solutions" / "12_deepseek_v3" / "deepseek_v3.ipynb"
A12_STUDENT = ROOT / "assignments" / "12_deepseek_v3" / "deepseek_v3.ipynb"


def a12_right_answers() -> dict:
    """The solution's answer cells (its BEGIN/END SOLUTION lines are comments)."""
    nb = nbformat.read(A12_SOURCE, as_version=4)
    return {c.metadata.nbgrader["grade_id"]: c.source for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("solution")}


A12_CHEATS = {   # answer cell -> a right answer made by the kit, and the points each test should give
    "kit_absorbed": ({"absorbed": "def _make():\n    from llmsys_lab.deepseek import mla as m\n"
                                  "    return lambda *args, **kwargs: m.absorbed_attention(*args, **kwargs)\n"
                                  "absorbed_attention = _make()                # a closure over the kit's\n"},
                     {"test_cache": 3, "test_absorbed": 0, "test_mla_step": 0}),
    "kit_forward": ({"mla_step": "def mla_step(mla, x, cache, layer=0):      # right outputs from the kit's MLA.forward\n"
                                 "    seen = getattr(cache, '_seen', None)\n"
                                 "    cache._seen = x if seen is None else torch.cat([seen, x], dim=1)\n"
                                 "    cache.update(layer, torch.zeros(x.shape[0], x.shape[1], mla.config.kv_lora_rank),\n"
                                 "                 torch.zeros(x.shape[0], x.shape[1], mla.config.qk_rope_head_dim))\n"
                                 "    return type(mla).__call__(mla, cache._seen)[:, -x.shape[1]:]\n"},
                    {"test_cache": 3, "test_absorbed": 4, "test_mla_step": 0}),
}


@pytest.fixture(scope="module")
def graded_a12(tmp_path_factory):
    folder = tmp_path_factory.mktemp("redteam12")
    right, paths = a12_right_answers(), []
    for name, (cheat, _) in A12_CHEATS.items():
        nb = nbformat.read(A12_STUDENT, as_version=4)
        for cell in nb.cells:
            gid = cell.metadata.get("nbgrader", {}).get("grade_id")
            if gid in right:
                cell.source = cheat.get(gid, right[gid])
        nbformat.write(nb, folder / f"{name}.ipynb")
        paths.append(folder / f"{name}.ipynb")
    results = grading.grade(paths, source=ROOT / "solutions", timeout=120, jobs=2)
    return {Path(r.path).stem: r for r in results}


@pytest.mark.parametrize("name", list(A12_CHEATS))
def test_assignment_12_kit_mla_instead_of_own_code_scores_zero_for_that_part(graded_a12, name):
    sub = graded_a12[name]
    assert sub.error is None, sub.error
    assert sub.official and sub.source == "solutions/12_deepseek_v3/deepseek_v3.ipynb"
    assert {t.test: t.points for t in sub.tests} == A12_CHEATS[name][1], [(t.test, t.points, t.feedback) for t in sub.tests]
    for t in sub.tests:                       # a zero comes from the own-code rule, not from a wrong number
        if not t.points:
            assert ("your code called" in t.feedback and "llmsys_lab.deepseek" in t.feedback
                    or "the kit's MLA forward" in t.feedback), t.feedback
