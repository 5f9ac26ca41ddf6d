"""Assignment 06 (FlashAttention) graded by the harness: merge, online attention and the Triton kernel on inputs
drawn per submission, judged outside the sandbox against float64 attention; the kernel is launched by the harness's
copy of the assignment's launcher and must be a @triton.jit function written in the notebook."""
from pathlib import Path

import pytest
import torch

from llmsys_lab.grading import harness
from harness_cases import (assert_full_marks_and_zero, assert_the_harness_took_every_point, grade_variants,
                           scores, variant)
from test_grading_sandbox import needs_sandbox

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "solutions" / "06_flash_attention" / "flash_attention.ipynb"
STUDENT = ROOT / "assignments" / "06_flash_attention" / "flash_attention.ipynb"
SPEC = harness.SPECS["06_flash_attention"]

BORROWED = {   # right outputs, wrong method: the kit's kernel and PyTorch's fused attention (verdicts forged)
    "flash_kernel": "from llmsys_lab.kernels.flash_attention import _fwd_kernel as flash_fwd_kernel\n",
    "online_attention": ("_sdpa = F.scaled_dot_product_attention\n"
                         "def online_attention(q, k, v, block_n=16):\n    return _sdpa(q, k, v)\n"),
}
FULL_SCORES = {   # right outputs, not online: all S scores of a row at once
    "online_attention": ("def online_attention(q, k, v, block_n=16):\n"
                         "    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])\n"
                         "    return torch.softmax(s, dim=-1) @ v\n"),
}
ALTERNATIVE = {   # a correct merge written another way: weights from the log-sum-exp of the two maxima
    "merge": ("def merge(m1, l1, o1, m2, l2, o2):\n"
              "    m = torch.where(m1 > m2, m1, m2)\n"
              "    w1 = torch.where(m1 == float('-inf'), torch.zeros_like(m1), (m1 - m).exp())\n"
              "    w2 = torch.where(m2 == float('-inf'), torch.zeros_like(m2), (m2 - m).exp())\n"
              "    return m, l1 * w1 + l2 * w2, o1 * w1.unsqueeze(-1) + o2 * w2.unsqueeze(-1)\n"),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness06")
    books = {"solution": variant(SOLUTION), "stub": variant(STUDENT), "forged": variant(STUDENT, forge=True),
             "borrowed": variant(SOLUTION, BORROWED, forge=True), "full_scores": variant(SOLUTION, FULL_SCORES),
             "alternative": variant(SOLUTION, ALTERNATIVE)}
    return grade_variants(folder, books)


@needs_sandbox
def test_the_solution_scores_full_marks_and_the_stub_zero(graded):
    assert_full_marks_and_zero(graded, SPEC)


@needs_sandbox
def test_an_unanswered_notebook_that_forges_every_in_kernel_verdict_scores_zero(graded):
    assert_the_harness_took_every_point(graded["forged"])


@needs_sandbox
def test_the_kits_kernel_and_pytorchs_attention_score_zero(graded):
    got = scores(graded["borrowed"])
    for test in ("test_flash_forward", "test_flash_causal", "test_flash_ragged"):
        assert got[test][0] == 0, got
        assert "must be a @triton.jit kernel written in your notebook" in got[test][1], got[test]
    assert got["test_online_attention"][0] == 0 and "scaled_dot_product" in got["test_online_attention"][1], got
    assert got["test_merge"][0] == 2, got


@needs_sandbox
def test_attention_over_all_scores_at_once_is_not_online(graded):
    got = scores(graded["full_scores"])
    assert got["test_online_attention"][0] == 0, got
    assert "all" in got["test_online_attention"][1] and "scores of a row at once" in got["test_online_attention"][1]
    assert graded["full_scores"].score == 8, got


def test_the_judges_accept_float64_attention_and_refuse_a_wrong_kernel():
    from llmsys_lab.grading.judges import a06

    calls, tensors = SPEC.calls(torch.Generator().manual_seed(6))
    inputs = {**tensors, "__calls__": calls}
    right = {}
    for call in calls:
        if call.fn == "merge":
            m1, l1, o1, m2, l2, o2 = (tensors[n].double() for n in call.args)
            m = torch.maximum(m1, m2)
            a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
            right[call.id] = torch.cat([x.reshape(-1) for x in (m, a1 * l1 + a2 * l2,
                                                                  a1[..., None] * o1 + a2[..., None] * o2)])
        elif call.fn == "online_attention":
            right[call.id] = a06._attention(*(tensors[n] for n in call.args[:3]))[0].float()
        else:
            out, lse = a06._attention(*(tensors[n] for n in call.args[:3]), call.args[3])
            right[call.id] = torch.cat([out.float().reshape(-1), lse.float().reshape(-1)])
    assert {t: j(inputs, right, {}) for t, j in SPEC.judge.items()} == dict.fromkeys(SPEC.judge)
    wrong = dict(right)
    causal = next(c for c in calls if c.fn == "flash_fwd_kernel" and c.args[3])
    q, k, v = (tensors[n] for n in causal.args[:3])
    out, lse = a06._attention(q, k, v, causal=False)              # the mask forgotten
    wrong[causal.id] = torch.cat([out.float().reshape(-1), lse.float().reshape(-1)])
    assert "output" in SPEC.judge["test_flash_causal"](inputs, wrong, {})
    wrong = dict(right)
    wrong["merge/empty_first"] = torch.full_like(right["merge/empty_first"], float("nan"))   # 0 * inf
    assert "not finite" in SPEC.judge["test_merge"](inputs, wrong, {})
