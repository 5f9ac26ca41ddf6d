"""Verdicts decided outside the sandbox (llmsys_lab.grading.harness) for assignment 10's verify_step.

The kit's `llmsys_lab.speculative.verify` only raises inside the sandbox, so binding it to the answer's
name (an alias, `functools.partial`, a copied `__code__`) cannot pass, while a correct answer written
differently from the solution scores the points; the harness draws its own inputs and judges the
returned (accepted, next token) pairs outside, where the submission cannot reach.
"""
from pathlib import Path

import nbformat
import pytest
import torch

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
        [sub] = grading.grade([path], source=ROOT / "solutions", timeout=300, unsafe=not sandbox.available()[0])
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


# ---- assignment 07: the fused kernel and the merge, judged outside --------------------------------------
SOLUTION_07 = next((ROOT / "solutions" / "07_performance").glob("*.ipynb"))
POSING_KERNEL = (   # right outputs, wrong method: a PyTorch object that passes the in-kernel isinstance check
    "class _Posing(triton.runtime.jit.KernelInterface):\n"
    "    def __getitem__(self, grid):\n"
    "        def run(x, r, w, out, new, n, eps, BLOCK):\n"
    "            h = x + r\n"
    "            new.copy_(h)\n"
    "            h32 = h.float()\n"
    "            out.copy_(w * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype))\n"
    "        return run\n"
    "add_rmsnorm_kernel = _Posing()\n")
KIT_KERNEL = "from llmsys_lab.kernels.fused_norm import _fused_add_rmsnorm_kernel as add_rmsnorm_kernel\n"
KIT_MERGE = "import llmsys_lab.kernels.paged_attention as _pa\nmerge_splits = _pa.merge_splits_reference\n"


def solution_07(**answers) -> nbformat.NotebookNode:
    nb = nbformat.read(SOLUTION_07, as_version=4)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers:
            cell.source = answers[gid]
    return nb


@needs_sandbox
def test_assignment_07_right_outputs_by_the_wrong_method_score_zero(tmp_path):
    """A PyTorch object posing as the Triton kernel passes the in-kernel check (it is a KernelInterface and its
    outputs are right) but the harness launches the kernel itself and accepts only a @triton.jit function written
    in the notebook; the kit's own kernel and merge are stripped from the sandbox, so aliases of them raise."""
    nbformat.write(solution_07(add_rmsnorm_kernel=POSING_KERNEL, merge_splits=KIT_MERGE), tmp_path / "posing.ipynb")
    nbformat.write(solution_07(add_rmsnorm_kernel=KIT_KERNEL), tmp_path / "kit_kernel.ipynb")
    subs = {Path(s.path).stem: s for s in grading.grade([tmp_path / "posing.ipynb", tmp_path / "kit_kernel.ipynb"],
                                                        source=ROOT / "solutions", timeout=300, jobs=2)}
    posing = {t.test: t for t in subs["posing"].tests}
    assert subs["posing"].score == 0, [(t.test, t.points, t.feedback) for t in posing.values()]
    for test in ("test_fused_norm", "test_fused_norm_ragged"):
        assert posing[test].feedback.startswith("the grader's own check of your outputs failed"), posing[test].feedback
        assert "must be a @triton.jit kernel, got _Posing" in posing[test].feedback
    assert all("merge_splits_reference is not available while this assignment is graded" in posing[t].feedback
               for t in ("test_merge_splits", "test_merge_splits_edge")), [posing[t].feedback for t in posing]
    kit = {t.test: (t.points, t.feedback) for t in subs["kit_kernel"].tests}
    assert subs["kit_kernel"].score == 5, kit   # the merge (the solution's) keeps its 5 points
    assert kit["test_fused_norm"][0] == kit["test_fused_norm_ragged"][0] == 0, kit


@needs_sandbox
def test_an_unanswered_performance_notebook_that_forges_every_in_kernel_verdict_scores_zero(tmp_path):
    from test_grading_redteam import FORGE_COMPLETION

    nb = nbformat.read(ROOT / "assignments" / "07_performance" / "performance.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "add_rmsnorm_kernel")
    cell.source += "\n" + FORGE_COMPLETION
    assert_the_harness_takes_every_point(nb, tmp_path)


def test_every_stripped_function_exists(tmp_path):
    """A kit function renamed after its harness entry was written would stay callable in the sandbox: the strip
    refuses names the module does not define."""
    for name, spec in harness.SPECS.items():
        copies = harness.stripped_modules(spec, tmp_path)
        assert len(copies) == len(spec.strip), name
    bad = harness.Spec(hide=[], calls=lambda g: ([], {}), judge={}, strip={"flash.py": ("no_such_function",)})
    with pytest.raises(RuntimeError, match="no_such_function"):
        harness.stripped_modules(bad, tmp_path)


# ---- assignment 09: the method, observed where the probe calls the answers ------------------------------
HF_EXPERTS_DISPATCH = (   # right outputs, wrong method: transformers' own Mixtral experts do the dispatch
    "def dispatch_combine(x, weights, experts, gate_w, up_w, down_w):\n"
    "    from transformers.models.mixtral.modeling_mixtral import MixtralExperts\n"
    "    E, i, h = gate_w.shape\n"
    "    ex = MixtralExperts(MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=E,\n"
    "                                      num_experts_per_tok=experts.shape[1]))\n"
    "    params = {'gate_up_proj': torch.cat([gate_w, up_w], 1), 'down_proj': down_w}   # differentiable\n"
    "    return torch.func.functional_call(ex, params, (x, experts, weights.to(x.dtype)))\n")
KIT_LB_COPY = (   # the kit's loss behind a wrapper whose helper is a __code__ copy of it
    "import llmsys_lab.moe as _kit\n"
    "import types\n"
    "_f = _kit.load_balancing_loss\n_mine = types.FunctionType(_f.__code__, _f.__globals__, None, _f.__defaults__)\n"
    "def load_balancing_loss(router_logits, top_k, attention_mask=None):\n"
    "    return _mine(router_logits, top_k)\n")


@needs_sandbox
def test_assignment_09_transformers_experts_or_a_copied_kit_loss_score_what_they_deserve(tmp_path):
    """Both give the right outputs; the probe traces the calls it makes and refuses code from the kit's MoE
    module or transformers' MoE implementations, whichever way it was reached (import, wrapper, __code__ copy).
    The submission also forges every in-kernel verdict, so what takes the points is the probe's trace."""
    from test_grading_redteam import FORGE_COMPLETION

    source = next((ROOT / "solutions" / "09_moe").glob("*.ipynb"))
    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid == "dispatch_combine":
            cell.source = HF_EXPERTS_DISPATCH
        elif gid == "load_balancing_loss":
            cell.source = KIT_LB_COPY
        elif gid == "router":
            cell.source += "\n" + FORGE_COMPLETION
    nbformat.write(nb, tmp_path / "borrowed.ipynb")
    [sub] = grading.grade([tmp_path / "borrowed.ipynb"], source=ROOT / "solutions", timeout=300)
    assert sub.error is None, sub.error
    tests = {t.test: t for t in sub.tests}
    lost = ("test_dispatch", "test_mixtral_block", "test_load_balancing_loss")
    assert sub.score == sub.max_score - sum(tests[t].max_points for t in lost) == 4, \
        [(t.test, t.points, t.feedback) for t in sub.tests]
    assert all(tests[t].feedback.startswith("the grader's own check of your outputs failed") for t in lost), \
        [tests[t].feedback for t in lost]
    assert "of transformers/" in tests["test_dispatch"].feedback, tests["test_dispatch"].feedback
    assert "load_balancing_loss of llmsys_lab/moe.py" in tests["test_load_balancing_loss"].feedback, \
        tests["test_load_balancing_loss"].feedback


# ---- assignment 08: ranks started by the probe, raw results judged outside ------------------------------
ALL_REDUCE_WITH_DECOYS = (   # the library's all-reduce, then point-to-point decoys worth a ring's bytes
    "def ring_all_reduce(t):\n"
    "    dist.all_reduce(t)\n"
    "    world, rank = dist.get_world_size(), dist.get_rank()\n"
    "    chunks = t.view(-1).tensor_split(world)\n"
    "    for step in range(2 * (world - 1)):\n"
    "        c = chunks[(rank - step) % world].clone()\n"
    "        req = dist.isend(c, (rank + 1) % world)\n"
    "        dist.recv(torch.empty_like(chunks[(rank - step - 1) % world]), (rank - 1) % world)\n"
    "        req.wait()\n"
    "    return t\n")
KIT_TP_LAYERS = (   # the kit's TP layers, called so that the gradients reach the shards
    "def column_parallel_linear(x, w_shard):\n"
    "    from llmsys_lab.parallel.tensor_parallel import ColumnParallelLinear\n"
    "    return torch.func.functional_call(ColumnParallelLinear(w_shard), {'weight': w_shard}, (x,))\n"
    "def row_parallel_linear(x_shard, w_shard):\n"
    "    from llmsys_lab.parallel.tensor_parallel import RowParallelLinear\n"
    "    return torch.func.functional_call(RowParallelLinear(w_shard), {'weight': w_shard}, (x_shard,))\n"
    "def tp_mlp(x, w1_shard, w2_shard):\n"
    "    return row_parallel_linear(F.gelu(column_parallel_linear(x, w1_shard)), w2_shard)\n")

KIT_DDP_HOOKS = (   # the kit's bucketing (llmsys_lab.parallel.ddp), the student's own hooks around it
    "def register_ddp_hooks(params, bucket_bytes):\n"
    "    from llmsys_lab.parallel.ddp import make_buckets\n"
    "    trainable = list(dict.fromkeys(p for p in params if p.requires_grad))\n"
    "    buckets = [list(b) for b in make_buckets(trainable, bucket_bytes / 2 ** 20)]\n"
    "    for bucket in buckets:\n"
    "        ready = {'n': 0}\n"
    "        def hook(p, bucket=bucket, ready=ready):\n"
    "            ready['n'] += 1\n"
    "            if ready['n'] == len(bucket):\n"
    "                ready['n'] = 0\n"
    "                flat = torch.cat([q.grad.reshape(-1) for q in bucket])\n"
    "                dist.all_reduce(flat)\n"
    "                flat /= dist.get_world_size()\n"
    "                i = 0\n"
    "                for q in bucket:\n"
    "                    q.grad.copy_(flat[i:i + q.numel()].view_as(q))\n"
    "                    i += q.numel()\n"
    "        for p in bucket:\n"
    "            p.register_post_accumulate_grad_hook(hook)\n"
    "    return buckets\n")


@needs_sandbox
def test_assignment_08_attacks_on_the_ranks_score_what_they_deserve(tmp_path):
    """Each submission also forges every in-kernel verdict, so what decides is the harness: the ranks the probe
    starts count every message where torch.distributed ends (the process group's methods) and trace the kit's
    parallel code. An unanswered notebook scores 0; all_reduce behind decoy sends loses the ring (4); the kit's
    TP layers lose the TP MLP (4)."""
    from test_grading_redteam import FORGE_COMPLETION

    def variant(base, answers):
        nb = nbformat.read(base, as_version=4)
        for cell in nb.cells:
            gid = cell.metadata.get("nbgrader", {}).get("grade_id")
            if gid in answers:
                cell.source = answers[gid]
            if gid == "ring_all_reduce":
                cell.source += "\n" + FORGE_COMPLETION
        return nb

    solution = next((ROOT / "solutions" / "08_parallelism").glob("*.ipynb"))
    cases = {"unanswered": (ROOT / "assignments" / "08_parallelism" / "parallelism.ipynb", {}, 0),
             "decoys": (solution, {"ring_all_reduce": ALL_REDUCE_WITH_DECOYS}, 7),
             "kit_layers": (solution, {"tp_layers": KIT_TP_LAYERS}, 7),
             "kit_ddp": (solution, {"ddp_hooks": KIT_DDP_HOOKS}, 8)}
    for name, (base, answers, _) in cases.items():
        nbformat.write(variant(base, answers), tmp_path / f"{name}.ipynb")
    subs = {Path(s.path).stem: s for s in grading.grade([tmp_path / f"{n}.ipynb" for n in cases],
                                                        source=ROOT / "solutions", timeout=400, jobs=2)}
    for name, (_, _, deserved) in cases.items():
        sub = subs[name]
        detail = [(t.test, t.points, t.feedback) for t in sub.tests]
        assert sub.error is None and sub.score == deserved, (name, sub.error, detail)
        assert all(t.feedback.startswith("the grader's own check of your outputs failed") for t in sub.tests
                   if t.points == 0), (name, detail)
    ring = next(t for t in subs["decoys"].tests if t.test == "test_ring_all_reduce")
    assert "collective" in ring.feedback, ring.feedback
    tp = next(t for t in subs["kit_layers"].tests if t.test == "test_tp_mlp")
    assert "llmsys_lab/parallel/tensor_parallel.py" in tp.feedback, tp.feedback
    ddp = next(t for t in subs["kit_ddp"].tests if t.test == "test_ddp_buckets")
    assert "llmsys_lab/parallel/ddp.py" in ddp.feedback, ddp.feedback


def test_ddp_judge_wants_the_one_process_gradients_and_one_all_reduce_per_bucket():
    """The DDP judge on hand-made rank outputs: the reference gradients with the right collective count pass;
    one all-reduce per parameter (no buckets), an undivided sum, gradients that never reached p.grad, a wrong
    second pass and a gradient on the frozen weight each fail, with a hint that names the mistake."""
    from llmsys_lab.grading import harness
    from llmsys_lab.grading.probe import DDPNet

    g = torch.Generator().manual_seed(0)
    calls, t = harness._calls_08(g)
    assert {c.id for c in calls if c.id.startswith("ddp/")} == {f"ddp/{k}" for k in harness._DDP_CASES}

    def outputs(scale=1.0, frozen=0.0, extra_collectives=0, second_scale=1.0):
        out = {}
        for case, (world, bucket_bytes) in harness._DDP_CASES.items():
            passes = harness._ddp_reference(t, case)
            rows = [torch.cat([w.reshape(-1) for _, w in ws]) * f for ws, f in zip(passes, (scale, second_scale))]
            n = harness._ddp_buckets(bucket_bytes)
            tail = torch.tensor([frozen, n + extra_collectives, n], dtype=torch.float64)
            out[f"ddp/{case}"] = torch.cat([*rows, tail] * world)
        return out

    assert [harness._ddp_buckets(b) for _, b in harness._DDP_CASES.values()] == [3, 1, 2]
    assert harness._judge_ddp(t, outputs(), {}) is None
    assert "exactly 3 all-reduce" in harness._judge_ddp(t, outputs(extra_collectives=1), {})
    assert "not divided by the world size" in harness._judge_ddp(t, outputs(scale=2.0), {})
    assert "copy it back" in harness._judge_ddp(t, outputs(scale=0.5), {})
    assert "second backward pass" in harness._judge_ddp(t, outputs(second_scale=0.0), {})
    assert "frozen weight" in harness._judge_ddp(t, outputs(frozen=1.0), {})
    assert "raised RuntimeError" in harness._judge_ddp(t, outputs(), {"ddp/2/each": ["RuntimeError", "x"]})


def test_every_collective_is_counted_where_torch_distributed_ends():
    """count_messages patches the process group's methods: the public functions, the group object itself and
    point-to-point sends are all seen (one gloo rank here: sends to oneself are not allowed, so a 2-rank run)."""
    from llmsys_lab.parallel import launch

    [a, b] = launch(_count_probe, 2, backend="gloo", timeout=60)
    assert a == b == {"sent": 6 * 8, "collectives": 3}, (a, b)


def _count_probe():
    import torch
    import torch.distributed as dist

    from llmsys_lab.grading.probe import count_messages

    counter = count_messages()
    t = torch.ones(6, dtype=torch.float64)
    dist.all_reduce(t)                                                  # public function
    dist.distributed_c10d._get_default_group().allreduce([t]).wait()     # the group object itself
    dist.broadcast(t, 0)
    rank = dist.get_rank()
    req = dist.isend(t, 1 - rank)
    dist.recv(torch.empty_like(t), 1 - rank)
    req.wait()
    return dict(counter)


# ---- assignment 02: estimators on configurations drawn per submission --------------------------------------
KIT_ESTIMATORS = (   # every answer handed to the kit's estimators (the reference), through wrappers
    "def param_count(cfg):\n    return kit.param_count(cfg)\n"
    "def forward_flops(cfg, batch, seq):\n"
    "    return kit.total_flops(kit.forward_flops_table(cfg, batch, seq), cfg, matmul_only=True)\n"
    "def kv_bytes_per_token(cfg, bytes_per_value=2):\n"
    "    return int(kit.kv_bytes_per_token(cfg, {2: 'fp16', 4: 'fp32'}[bytes_per_value]))\n"
    "def compute_optimal(flops):\n"
    "    o = kit.compute_optimal(flops)\n    return o.params, flops / (6 * o.params)\n")
TABLE_LOOKUP = (    # the visible tests' answers typed in: right for the presets, nothing else
    "_SEEN = {}\n"
    "def param_count(cfg):\n    return _SEEN.get(cfg.name, 0)\n")


@needs_sandbox
def test_assignment_02_borrowed_or_unanswered_scores_zero(tmp_path):
    """Each notebook forges every in-kernel verdict; the harness draws configurations and budgets per submission,
    computes the answers with the kit's estimators outside, and the probe refuses the kit's estimator code."""
    from test_grading_redteam import FORGE_COMPLETION

    solution = next((ROOT / "solutions" / "02_estimators").glob("*.ipynb"))
    stub = next((ROOT / "assignments" / "02_estimators").glob("*.ipynb"))
    for name, base, answer in (("borrowed", solution, KIT_ESTIMATORS), ("unanswered", stub, None)):
        nb = nbformat.read(base, as_version=4)
        first = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "param_count")
        if answer:
            for cell in nb.cells:
                if cell.metadata.get("nbgrader", {}).get("solution"):
                    cell.source = "pass\n"
            first.source = answer
        first.source += "\n" + FORGE_COMPLETION
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
    subs = {Path(s.path).stem: s for s in grading.grade([tmp_path / "borrowed.ipynb", tmp_path / "unanswered.ipynb"],
                                                        source=ROOT / "solutions", timeout=300, jobs=2)}
    for name, sub in subs.items():
        detail = [(t.test, t.points, t.feedback) for t in sub.tests]
        assert sub.error is None and sub.score == 0, (name, detail)
        assert all(t.feedback.startswith("the grader's own check of your outputs failed") for t in sub.tests), detail
    assert all("of llmsys_lab/estimators/" in t.feedback for t in subs["borrowed"].tests), \
        [t.feedback for t in subs["borrowed"].tests]


HARNESS_REFERENCE = (   # the harness's own float64 reference, imported from inside the sandbox
    "def attention(q, k, v):\n"
    "    from llmsys_lab.grading.harness import _sdpa\n"
    "    return _sdpa(q, k, v).to(q.dtype)\n")


@needs_sandbox
def test_the_harness_itself_is_absent_in_the_sandbox(tmp_path):
    """The harness's references are complete answers; it is hidden from every submission, so importing one fails
    (and the forged in-kernel verdict does not help)."""
    from test_grading_redteam import FORGE_COMPLETION

    nb = nbformat.read(next((ROOT / "solutions" / "01_attention").glob("*.ipynb")), as_version=4)
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "attention")
    cell.source = HARNESS_REFERENCE + "\n" + FORGE_COMPLETION
    nbformat.write(nb, tmp_path / "harness_ref.ipynb")
    [sub] = grading.grade([tmp_path / "harness_ref.ipynb"], source=ROOT / "solutions", timeout=300)
    attention = next(t for t in sub.tests if t.test == "test_attention")
    assert attention.points == 0 and "No module named 'llmsys_lab.grading.harness'" in attention.feedback, \
        attention.feedback


SEQ_LEN_ROLLBACK = (   # the notebook's text says cache.seq_len is lengths[-1]: reading it is not borrowing the kit
    "def rollback(cache, num_tokens):\n"
    "    held = cache.seq_len\n"
    "    if not 0 <= num_tokens <= held:\n"
    "        raise ValueError(f'cannot keep {num_tokens} of {held} tokens')\n"
    "    cache.k[:, :, :, num_tokens:] = 0\n"
    "    cache.v[:, :, :, num_tokens:] = 0\n"
    "    cache.lengths = [num_tokens] * len(cache.lengths)\n")


def test_a_rollback_that_reads_the_cache_size_scores_full_marks(tmp_path):
    """Following the text (`cache.seq_len`) must not cost points: the own-code rule forbids the kit's truncate,
    not reading the cache's size."""
    nb = nbformat.read(next((ROOT / "solutions" / "10_speculative_decoding").glob("*.ipynb")), as_version=4)
    next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "rollback").source = SEQ_LEN_ROLLBACK
    nbformat.write(nb, tmp_path / "seq_len.ipynb")
    [sub] = grading.grade([tmp_path / "seq_len.ipynb"], source=ROOT / "solutions", timeout=300,
                          unsafe=not sandbox.available()[0])
    rollback = next(t for t in sub.tests if t.test == "test_rollback")
    assert (rollback.points, rollback.max_points) == (2, 2), rollback.feedback


DISARM_PROBE = (   # switch the probe's tracer off in the module the notebook can reach, and plant a probe of its own
    "import sys, types\n"
    "import llmsys_lab.grading.probe as _probe\n"
    "_probe.Tracer.wrap = lambda self, fn: fn\n"
    "_fake = types.ModuleType('llmsys_lab.grading.probe')\n"
    "_fake.__dict__.update(_probe.__dict__)\n"
    "sys.modules['llmsys_lab.grading.probe'] = _fake\n")


@needs_sandbox
def test_a_notebook_cannot_disarm_the_probe_it_imports(tmp_path):
    """The probe runs as a fresh copy of its source, whatever the notebook did to the module it imported."""
    from test_grading_redteam import FORGE_COMPLETION

    nb = nbformat.read(next((ROOT / "solutions" / "09_moe").glob("*.ipynb")), as_version=4)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid == "load_balancing_loss":
            cell.source = KIT_LB_COPY + "\n" + DISARM_PROBE
        elif gid == "router":
            cell.source += "\n" + FORGE_COMPLETION
    nbformat.write(nb, tmp_path / "disarm.ipynb")
    [sub] = grading.grade([tmp_path / "disarm.ipynb"], source=ROOT / "solutions", timeout=300)
    tests = {t.test: t for t in sub.tests}
    assert sub.score == 8, [(t.test, t.points, t.feedback) for t in sub.tests]
    assert "load_balancing_loss of llmsys_lab/moe.py" in tests["test_load_balancing_loss"].feedback, \
        tests["test_load_balancing_loss"].feedback


def test_every_assignment_is_judged_by_the_harness_test_by_test():
    """Each assignment folder has a harness spec, and every graded test of its source notebook has a judge: no
    graded test is decided by the in-kernel cell alone."""
    for folder in sorted(p for p in (ROOT / "solutions").iterdir() if p.is_dir()):
        spec = harness.SPECS.get(folder.name)
        assert spec is not None, f"{folder.name} has no harness spec"
        nb = nbformat.read(next(folder.glob("*.ipynb")), as_version=4)
        graded = {c.metadata["nbgrader"]["grade_id"] for c in nb.cells
                  if c.metadata.get("nbgrader", {}).get("points")}
        assert graded and set(spec.judge) == graded, (folder.name, sorted(graded), sorted(spec.judge))


PER_TOKEN_MV_LOOP = (   # right outputs, the method the text rules out: a loop over tokens with 1-D products
    "def dispatch_combine(x, weights, experts, gate_w, up_w, down_w):\n"
    "    y = torch.zeros_like(x)\n"
    "    for n in range(x.shape[0]):\n"
    "        for j in range(experts.shape[1]):\n"
    "            e = int(experts[n, j])\n"
    "            h = F.silu(gate_w[e] @ x[n]) * (up_w[e] @ x[n])\n"
    "            y[n] = y[n] + weights[n, j].to(x.dtype) * (down_w[e] @ h)\n"
    "    return y\n")
RING_BY_ALL_REDUCE = "def ring_all_reduce(t):\n    dist.all_reduce(t)\n    return t\n"


def test_student_methods_the_text_rules_out_are_named(tmp_path):
    """A per-token loop of matrix-vector products is counted like any matrix product (the dispatch rule), and a
    ring that calls a collective is named before its ranks start."""
    for folder, gid, answer in (("09_moe", "dispatch_combine", PER_TOKEN_MV_LOOP),
                                ("08_parallelism", "ring_all_reduce", RING_BY_ALL_REDUCE)):
        nb = nbformat.read(next((ROOT / "solutions" / folder).glob("*.ipynb")), as_version=4)
        next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == gid).source = answer
        nbformat.write(nb, tmp_path / f"{folder}.ipynb")
    subs = {Path(s.path).stem: s for s in grading.grade([tmp_path / "09_moe.ipynb", tmp_path / "08_parallelism.ipynb"],
                                                        source=ROOT / "solutions", timeout=400, jobs=2,
                                                        unsafe=not sandbox.available()[0])}
    dispatch = next(t for t in subs["09_moe"].tests if t.test == "test_dispatch")
    assert dispatch.points == 0 and "matrix products for" in dispatch.feedback, dispatch.feedback
    ring = next(t for t in subs["08_parallelism"].tests if t.test == "test_ring_all_reduce")
    assert ring.points == 0 and "ring_all_reduce calls all_reduce" in ring.feedback, ring.feedback
