"""Assignment 11 (scaling laws) graded by the harness: runs drawn per submission from a random law, laws and
budgets drawn too; the fits, optima and losses are computed outside the sandbox, and the kit's scaling code (the
in-kernel tests' reference) may not run while the probe calls the answers."""
from pathlib import Path

import pytest
import torch

from llmsys_lab.grading import harness
from harness_cases import (assert_full_marks_and_zero, assert_the_harness_took_every_point, grade_variants,
                           scores, variant)
from test_grading_sandbox import needs_sandbox

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "solutions" / "11_scaling_laws" / "scaling_laws.ipynb"
STUDENT = ROOT / "assignments" / "11_scaling_laws" / "scaling_laws.ipynb"
SPEC = harness.SPECS["11_scaling_laws"]

KIT_ANSWERS = {   # the kit does the work: in-kernel verdicts forged, the probe's tracer refuses the kit's code
    "fit_law": "def fit_law(n_params, n_tokens, losses):\n    return kit.fit_chinchilla(n_params, n_tokens, losses).law.as_dict()\n",
    "compute_optimal": ("_opt = kit.ChinchillaLaw.compute_optimal\n"
                        "def compute_optimal(law, flops):\n    return _opt(kit.ChinchillaLaw(**law), flops)\n"),
}
ALTERNATIVE = {   # correct answers written another way: a numerical minimum over log N, float32 tensors returned
    "compute_optimal": (
        "def compute_optimal(law, flops):\n"
        "    lo, hi = 0.0, math.log(flops / 6)\n"
        "    f = lambda x: law_loss(law, math.exp(x), flops / (6 * math.exp(x)))\n"
        "    for _ in range(200):                      # golden-section search on log N\n"
        "        a, b = hi - 0.618 * (hi - lo), lo + 0.618 * (hi - lo)\n"
        "        lo, hi = (lo, b) if f(a) < f(b) else (a, hi)\n"
        "    n = math.exp((lo + hi) / 2)\n"
        "    return torch.tensor(n, dtype=torch.float64), torch.tensor(flops / (6 * n), dtype=torch.float64)\n"),
    "longer_or_bigger": (
        "def longer_or_bigger(law, n_params, n_tokens, flops):\n"
        "    pair = [law_loss(law, n_params, flops / (6 * n_params)), law_loss(law, flops / (6 * n_tokens), n_tokens)]\n"
        "    return ['longer', 'bigger'][int(pair[1] < pair[0])], pair[0], pair[1]\n"),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness11")
    books = {"solution": variant(SOLUTION), "stub": variant(STUDENT), "forged": variant(STUDENT, forge=True),
             "kit": variant(SOLUTION, KIT_ANSWERS, forge=True), "alternative": variant(SOLUTION, ALTERNATIVE)}
    return grade_variants(folder, books)


@needs_sandbox
def test_the_solution_scores_full_marks_and_the_stub_zero(graded):
    assert_full_marks_and_zero(graded, SPEC)


@needs_sandbox
def test_an_unanswered_notebook_that_forges_every_in_kernel_verdict_scores_zero(graded):
    assert_the_harness_took_every_point(graded["forged"])


@needs_sandbox
def test_answers_that_run_the_kits_scaling_code_score_zero(graded):
    got = scores(graded["kit"])
    for test in ("test_fit_law", "test_compute_optimal"):
        assert got[test][0] == 0, got
        assert got[test][1].startswith("the grader's own check of your outputs failed"), got[test]
        assert "a reference implementation this exercise asks you to write yourself" in got[test][1], got[test]
    assert got["test_longer_or_bigger"][0] == 3, got     # the solution's, untouched


def reference_outputs(calls, answers):
    """What a correct submission returns, computed by the kit's laws here (the harness's own closed forms are what
    the judges use): the judges accept it."""
    from llmsys_lab.scaling import ChinchillaLaw, fit_chinchilla

    out = {}
    for call in calls:
        if call.fn == "fit_law":
            law = fit_chinchilla(*call.args, top=10, max_iter=1000).law.as_dict()
            out[call.id] = torch.tensor([law[k] for k in ("E", "A", "B", "alpha", "beta")], dtype=torch.float64)
        elif call.fn == "compute_optimal":
            out[call.id] = torch.tensor(ChinchillaLaw(**call.args[0]).compute_optimal(call.args[1]), dtype=torch.float64)
        else:
            law, n, d, c = call.args
            lo, bi = ChinchillaLaw(**law).loss(n, c / (6 * n)), ChinchillaLaw(**law).loss(c / (6 * d), d)
            out[call.id] = torch.tensor([answers(lo, bi), lo, bi], dtype=torch.float64)
    return out


def test_the_judges_accept_right_answers_and_refuse_wrong_ones():
    g = torch.Generator().manual_seed(11)
    calls, tensors = SPEC.calls(g)
    inputs = {**tensors, "__calls__": calls}
    assert sum(c.fn == "longer_or_bigger" for c in calls) == 6
    right = reference_outputs(calls, lambda lo, bi: float(bi < lo))
    assert {t: j(inputs, right, {}) for t, j in SPEC.judge.items()} == dict.fromkeys(SPEC.judge)
    # both answers occur among the drawn cases, so a constant choice fails
    for constant in (0.0, 1.0):
        wrong = reference_outputs(calls, lambda lo, bi, c=constant: c)
        assert "the law says" in SPEC.judge["test_longer_or_bigger"](inputs, wrong, {})
    first = next(c.id for c in calls if c.fn == "compute_optimal")
    off = dict(right)
    off[first] = right[first] * torch.tensor([1.01, 1 / 1.01], dtype=torch.float64)   # 1% too large, 6ND kept
    assert "N* for the law" in SPEC.judge["test_compute_optimal"](inputs, off, {})
    fit = next(c.id for c in calls if c.fn == "fit_law")
    off = dict(right)
    off[fit] = right[fit] * torch.tensor([1, 1, 1, 1.2, 1], dtype=torch.float64)      # alpha 20% off
    assert SPEC.judge["test_fit_law"](inputs, off, {}) is not None
    assert "raised ValueError" in SPEC.judge["test_fit_law"](inputs, right, {fit: ["ValueError", "no"]})


def test_every_draw_has_fresh_inputs():
    a, _ = SPEC.calls(torch.Generator().manual_seed(1))
    b, _ = SPEC.calls(torch.Generator().manual_seed(2))
    assert [c.args for c in a] != [c.args for c in b]
