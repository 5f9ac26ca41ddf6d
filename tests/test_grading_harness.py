"""Verdicts decided outside the sandbox (llmsys_lab.grading.harness) for assignment 10's verify_step.

The kit's `llmsys_lab.speculative.verify` only raises inside the sandbox, so binding it to the answer's
name (an alias, `functools.partial`, a copied `__code__`) cannot pass, while a correct answer written
differently from the solution scores the points; the harness draws its own inputs and judges the
returned (accepted, next token) pairs outside, where the submission cannot reach.
"""
from pathlib import Path

import nbformat
import pytest

from llmsys_lab import grading
from llmsys_lab.grading import harness, sandbox
from test_grading_sandbox import needs_sandbox   # skipped only where bwrap is missing (make test requires it where present)

pytestmark = pytest.mark.notebook          # grades notebooks with the trusted harness

ROOT = Path(__file__).resolve().parent.parent
STUDENT = next((ROOT / "assignments" / "10_speculative_decoding").glob("*.ipynb"))

ALTERNATIVE = (   # a correct verify_step written another way: one uniform per position, the residual by where()
    "def verify_step(draft, q, p, generator=None):\n"
    "    for i, x in enumerate(draft):\n"
    "        u = torch.rand((), generator=generator).item()\n"
    "        if u * q[i, x].item() <= p[i, x].item():\n"
    "            continue\n"
    "        r = torch.where(p[i] > q[i], p[i] - q[i], torch.zeros_like(p[i]))\n"
    "        return i, int(torch.multinomial(r / r.sum(), 1, generator=generator))\n"
    "    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))\n")
ALIAS = "import llmsys_lab.speculative\nverify_step = llmsys_lab.speculative.verify\n"
PARTIAL = ("import functools, importlib\n"
           "verify_step = functools.partial(importlib.import_module('llmsys_lab.speculative').verify)\n")
CODE_COPY = ("def verify_step(draft, q, p, generator=None):\n    pass\n"
             "from llmsys_lab.speculative import verify as _kit\n"
             "verify_step.__code__ = _kit.__code__\nverify_step.__globals__.update(_kit.__globals__)\n")


def student(answer: str) -> nbformat.NotebookNode:
    nb = nbformat.read(STUDENT, as_version=4)
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "verify_step":
            cell.source = answer
    return nb


CASES = {"alternative": (ALTERNATIVE, 5), "alias": (ALIAS, 0), "partial": (PARTIAL, 0), "code_copy": (CODE_COPY, 0)}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness10")
    paths = []
    for name, (answer, _) in CASES.items():
        nbformat.write(student(answer), folder / f"{name}.ipynb")
        paths.append(folder / f"{name}.ipynb")
    return {Path(r.path).stem: r for r in grading.grade(paths, source=ROOT / "solutions", timeout=120, jobs=2)}


def assert_the_harness_takes_every_point(nb, tmp_path):
    """An unanswered notebook that forges every in-kernel verdict scores 0/10, and what took the points is
    the grader's own check outside the sandbox (the forgery did fool the in-kernel verdicts)."""
    nbformat.write(nb, tmp_path / "forged.ipynb")
    [sub] = grading.grade([tmp_path / "forged.ipynb"], source=ROOT / "solutions", timeout=300)
    assert sub.error is None, sub.error
    assert (sub.score, sub.max_score) == (0, 10), [(t.test, t.points, t.feedback) for t in sub.tests]
    assert all(t.feedback.startswith("the grader's own check of your outputs failed") for t in sub.tests), \
        [t.feedback for t in sub.tests]


@needs_sandbox
@pytest.mark.parametrize("name", list(CASES))
def test_verify_step_scores_what_it_deserves(graded, name):
    sub = graded[name]
    assert sub.error is None, sub.error
    verify = {t.test: t for t in sub.tests if t.test.startswith("test_verify")}
    assert set(verify) == {"test_verify_greedy", "test_verify_distribution"}
    got = sum(t.points for t in verify.values())
    assert got == CASES[name][1], [(t.test, t.points, t.feedback) for t in sub.tests]
    if CASES[name][1] == 0:
        assert all("not available while this assignment is graded" in t.feedback or "not defined" in t.feedback
                   for t in verify.values()), [t.feedback for t in verify.values()]


def test_the_stripped_module_keeps_everything_else(tmp_path):
    [(original, copy)] = harness.stripped_modules(harness.SPECS["10_speculative_decoding"], tmp_path).items()
    text = Path(copy).read_text()
    assert Path(original).name == "speculative.py"
    assert "class Sampling" in text and "def expected_speedup" in text
    assert text.count("is not available while this assignment is graded") == 2
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("llmsys_lab._stripped_speculative", copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.expected_speedup(0.8, 4, 0.1) > 1
        with pytest.raises(RuntimeError, match="speculative.verify is not available"):
            module.verify([1], None, None)
    finally:
        del sys.modules[spec.name]


FLASH_STYLE_MERGE = (   # the standard FlashAttention formulation: subtract the total log-sum-exp
    "def merge_splits(part, lse):\n"
    "    total = torch.logsumexp(lse, dim=-1, keepdim=True)\n"
    "    total = torch.where(total == float('-inf'), torch.zeros_like(total), total)\n"
    "    return (torch.exp(lse - total)[..., None] * part).sum(dim=-2)\n")


def test_a_flash_attention_style_merge_scores_full_marks():
    """Assignment 07's merge tests accept every numerically sound merge: at lse = 800 the fp32 spacing is
    6e-5, so e^(lse - total) is exact to ~1e-4 only; the tests' tolerance there is 1e-4."""
    import tempfile

    source = next((ROOT / "solutions" / "07_performance").glob("*.ipynb"))
    nb = nbformat.read(source, as_version=4)
    [cell] = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "merge_splits"]
    cell.source = FLASH_STYLE_MERGE
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flash_merge.ipynb"
        nbformat.write(nb, path)
        [sub] = grading.grade([path], source=ROOT / "solutions", timeout=300, unsafe=True)
    assert sub.error is None, sub.error
    merge = {t.test: (t.points, t.max_points, t.feedback) for t in sub.tests if "merge" in t.test}
    assert merge and all(points == most for points, most, _ in merge.values()), merge


@needs_sandbox
def test_an_unanswered_moe_notebook_that_forges_every_in_kernel_verdict_scores_zero(tmp_path):
    """Assignment 09: the submission rewrites each failing test's error into the grader's completion line
    (patched jupyter_client Session.send); every graded test is also decided by the harness outside."""
    from test_grading_redteam import FORGE_COMPLETION

    nb = nbformat.read(ROOT / "assignments" / "09_moe" / "moe.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "router")
    cell.source += "\n" + FORGE_COMPLETION
    assert_the_harness_takes_every_point(nb, tmp_path)


PLAIN_GREEDY = (   # right tokens, wrong method: the target alone, one forward pass per token, no drafts verified
    "@torch.no_grad()\n"
    "def speculative_greedy(model, drafter, prompt, max_new_tokens, gamma):\n"
    "    drafter.begin(len(prompt) + max_new_tokens)\n"
    "    cache = KVCache.for_model(model.config, 1, len(prompt) + max_new_tokens)\n"
    "    logits = model(torch.tensor([prompt]), kv_cache=cache)\n"
    "    out = []\n"
    "    for _ in range(max_new_tokens):\n"
    "        out.append(int(logits[0, -1].argmax()))\n"
    "        logits = model(torch.tensor([[out[-1]]]), kv_cache=cache)\n"
    "    return out\n")


@needs_sandbox
def test_plain_greedy_decoding_is_not_speculative_decoding(tmp_path):
    source = next((ROOT / "solutions" / "10_speculative_decoding").glob("*.ipynb"))
    nb = nbformat.read(source, as_version=4)
    [cell] = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "speculative_greedy"]
    cell.source = PLAIN_GREEDY
    nbformat.write(nb, tmp_path / "plain_greedy.ipynb")
    [sub] = grading.grade([tmp_path / "plain_greedy.ipynb"], source=ROOT / "solutions", timeout=300)
    assert sub.error is None, sub.error
    scores = {t.test: (t.points, t.feedback) for t in sub.tests}
    assert sub.score == 7 and scores["test_loop_greedy"][0] == 0, scores
    assert "forward passes for 20 tokens" in scores["test_loop_greedy"][1]


@needs_sandbox
def test_an_unanswered_speculative_notebook_that_forges_every_in_kernel_verdict_scores_zero(tmp_path):
    from test_grading_redteam import FORGE_COMPLETION

    nb = student(next(c for c in nbformat.read(STUDENT, as_version=4).cells
                      if c.metadata.get("nbgrader", {}).get("grade_id") == "verify_step").source + "\n" + FORGE_COMPLETION)
    assert_the_harness_takes_every_point(nb, tmp_path)
