"""Assignment 04 (paged KV) graded by the trusted harness: the allocator and the block tables are driven through
operation sequences drawn per submission and replayed outside the sandbox on the harness's own model of the rules;
gather_kv and paged_decode_attention are compared with float64 computations on fresh caches and block tables.
The kit's paged modules are refused while the probe calls the answers."""
from pathlib import Path

import nbformat
import pytest
import torch

from llmsys_lab.grading import harness
from harness_cases import grade_variants, variant
from test_grading_sandbox import needs_sandbox

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "solutions" / "04_paged_kv" / "paged_kv.ipynb"
STUB = ROOT / "assignments" / "04_paged_kv" / "paged_kv.ipynb"

ALT_ALLOCATOR = (   # a list and a flag per block instead of a deque and a set
    "class BlockAllocator:\n"
    "    def __init__(self, num_blocks, order=None):\n"
    "        self.n = num_blocks\n"
    "        self.queue = list(range(num_blocks)) if order is None else list(order)\n"
    "        self.in_use = [False] * num_blocks\n"
    "    @property\n"
    "    def num_free(self):\n"
    "        return len(self.queue)\n"
    "    def allocate(self):\n"
    "        if len(self.queue) == 0:\n"
    "            raise OutOfBlocks('the pool is exhausted')\n"
    "        b = self.queue.pop(0)\n"
    "        self.in_use[b] = True\n"
    "        return b\n"
    "    def release(self, block):\n"
    "        if not (isinstance(block, int) and 0 <= block < self.n) or not self.in_use[block]:\n"
    "            raise BlockError(f'block {block} is not allocated')\n"
    "        self.in_use[block] = False\n"
    "        self.queue.append(block)\n")
ALT_TABLES = (
    "class BlockTables:\n"
    "    def __init__(self, allocator, block_size):\n"
    "        self.allocator, self.block_size = allocator, block_size\n"
    "        self.tables, self.filled = {}, {}\n"
    "    def add(self, seq, num_tokens):\n"
    "        n = math.ceil(num_tokens / self.block_size)\n"
    "        if self.allocator.num_free < n:\n"
    "            raise OutOfBlocks(f'{seq}: {n} blocks needed')\n"
    "        self.tables[seq] = [self.allocator.allocate() for _ in range(n)]\n"
    "        self.filled[seq] = [min(self.block_size, num_tokens - i * self.block_size) for i in range(n)]\n"
    "    def append(self, seq):\n"
    "        if seq not in self.filled:\n"
    "            raise BlockError(seq)\n"
    "        f = self.filled[seq]\n"
    "        if f[-1] < self.block_size:\n"
    "            f[-1] += 1\n"
    "            return\n"
    "        self.tables[seq].append(self.allocator.allocate())\n"
    "        f.append(1)\n"
    "    def free(self, seq):\n"
    "        if seq not in self.tables:\n"
    "            raise BlockError(seq)\n"
    "        blocks = self.tables.pop(seq)\n"
    "        self.filled.pop(seq)\n"
    "        while blocks:\n"
    "            self.allocator.release(blocks.pop())\n")
ALT_GATHER = (   # block by block, then SDPA per sequence
    "def gather_kv(k_cache, v_cache, table, length):\n"
    "    bs = k_cache.shape[1]\n"
    "    ks, vs = [], []\n"
    "    for i in range(-(-length // bs)):\n"
    "        b, n = int(table[i]), min(bs, length - i * bs)\n"
    "        ks.append(k_cache[b, :n])\n"
    "        vs.append(v_cache[b, :n])\n"
    "    return torch.cat(ks).permute(1, 0, 2), torch.cat(vs).permute(1, 0, 2)\n"
    "def paged_decode_attention(q, k_cache, v_cache, block_tables, lengths):\n"
    "    outs = []\n"
    "    for i in range(q.shape[0]):\n"
    "        k, v = gather_kv(k_cache, v_cache, block_tables[i], int(lengths[i]))\n"
    "        outs.append(torch.nn.functional.scaled_dot_product_attention(q[i][:, None], k, v, enable_gqa=True)[:, 0])\n"
    "    return torch.stack(outs)\n")
KIT_ALLOCATOR = (   # the kit's allocator and manager behind the notebook's names
    "import llmsys_lab.paged as _kp\n"
    "class BlockAllocator(_kp.BlockAllocator):\n"
    "    pass\n")
KIT_TABLES = (
    "class BlockTables:\n"
    "    def __init__(self, allocator, block_size):\n"
    "        self.allocator, self.block_size = allocator, block_size\n"
    "        self._m = _kp.BlockManager(allocator.num_blocks, block_size, list(allocator.free_list))\n"
    "        self.allocator = self._m.allocator\n"
    "    @property\n"
    "    def tables(self):\n"
    "        return {s: t.blocks for s, t in self._m.tables.items()}\n"
    "    @property\n"
    "    def filled(self):\n"
    "        return {s: t.filled for s, t in self._m.tables.items()}\n"
    "    def add(self, seq, n):\n"
    "        self._m.add(seq, [0] * n)\n"
    "    def append(self, seq):\n"
    "        self._m.append(seq, 0)\n"
    "    def free(self, seq):\n"
    "        self._m.free(seq)\n")
KIT_ATTENTION = (
    "from llmsys_lab.kernels.paged_attention import paged_attention_reference as paged_decode_attention\n")


def _gather_solution():
    nb = nbformat.read(SOLUTION, as_version=4)
    return next(c.source for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "gather")


CASES = {   # name -> (notebook, score it deserves)
    "solution": (lambda: variant(SOLUTION, {}), 10),
    "stub": (lambda: variant(STUB, {}), 0),
    "forged": (lambda: variant(STUB, {}, forge=True), 0),
    "borrowed": (lambda: variant(SOLUTION, {"allocator": KIT_ALLOCATOR, "block_tables": KIT_TABLES,
                                             "gather": _gather_solution().split("def paged_decode_attention")[0]
                                             + KIT_ATTENTION}, forge=True), 2),
    "alternative": (lambda: variant(SOLUTION, {"allocator": ALT_ALLOCATOR, "block_tables": ALT_TABLES,
                                                "gather": ALT_GATHER}), 10),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness04")
    return grade_variants(folder, {name: make() for name, (make, _) in CASES.items()})


@needs_sandbox
@pytest.mark.parametrize("name", list(CASES))
def test_assignment_04_scores_what_each_submission_deserves(graded, name):
    sub = graded[name]
    detail = [(t.test, t.points, t.feedback) for t in sub.tests]
    assert sub.error is None, sub.error
    assert (sub.score, sub.max_score) == (CASES[name][1], 10), detail
    if name == "forged":      # every in-kernel verdict was forged: the harness took the points
        assert all(t.feedback.startswith("the grader's own check of your outputs failed") for t in sub.tests), detail
    if name == "borrowed":
        lost = {t.test: t.feedback for t in sub.tests if t.points == 0}
        assert set(lost) == {"test_allocator", "test_lecture_block_table", "test_traces", "test_paged_attention"}, detail
        assert all(f.startswith("the grader's own check of your outputs failed") for f in lost.values()), detail
        assert "of llmsys_lab/paged.py" in lost["test_traces"], lost
        assert "of llmsys_lab/kernels/paged_attention.py" in lost["test_paged_attention"], lost


# ---- the judges themselves, on outputs made here (no notebook) ----------------------------------------
def _run_driver(call, ns, tensors):
    import importlib

    module, _, function = call.via.partition(":")
    fn = getattr(importlib.import_module(module), function)(ns[call.fn], call.fn, ns)
    return fn(*call.args)


def _namespace(allocator_src, tables_src):
    import math
    from collections import deque

    class BlockError(ValueError):
        pass

    class OutOfBlocks(BlockError):
        pass

    ns = {"math": math, "deque": deque, "torch": torch, "BlockError": BlockError, "OutOfBlocks": OutOfBlocks}
    exec(allocator_src, ns)
    exec(tables_src, ns)
    return ns


SPEC = harness.SPECS["04_paged_kv"]


def _verdicts(ns, seed=0):
    calls, tensors = SPEC.calls(torch.Generator().manual_seed(seed))
    outputs, errors = {}, {}
    for call in calls:
        if call.via:
            try:
                outputs[call.id] = _run_driver(call, ns, tensors)
            except Exception as err:  # noqa: BLE001
                errors[call.id] = [type(err).__name__, str(err)]
    return {tid: SPEC.judge[tid]({**tensors, "__calls__": calls}, outputs, errors)
            for tid in ("test_allocator", "test_lecture_block_table", "test_traces")}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_model_accepts_correct_bookkeeping_and_refuses_subtle_bugs(seed):
    """The judges accept two different correct implementations on every drawn trace, and catch bugs the
    lecture's example alone does not: release to the front of the free list, freeing first block first, an
    add that allocates part of its blocks before running out, a double free accepted."""
    verdicts = _verdicts(_namespace(ALT_ALLOCATOR, ALT_TABLES), seed)
    assert all(v is None for v in verdicts.values()), verdicts
    bugs = {
        "front": (ALT_ALLOCATOR.replace("self.queue.append(block)", "self.queue.insert(0, block)"), ALT_TABLES,
                  "test_allocator"),
        "double_free": (ALT_ALLOCATOR.replace(" or not self.in_use[block]", ""), ALT_TABLES, "test_allocator"),
        "first_first": (ALT_ALLOCATOR, ALT_TABLES.replace("blocks.pop()", "blocks.pop(0)"), "test_traces"),
        "partial_add": (ALT_ALLOCATOR, ALT_TABLES.replace("        if self.allocator.num_free < n:\n"
                                                          "            raise OutOfBlocks(f'{seq}: {n} blocks needed')\n",
                                                          ""), "test_traces"),
    }
    for name, (alloc, tables, test) in bugs.items():
        verdicts = _verdicts(_namespace(alloc, tables), seed)
        assert verdicts[test] is not None, (name, verdicts)


def test_gather_and_attention_judges_refuse_wrong_outputs():
    calls, tensors = SPEC.calls(torch.Generator().manual_seed(3))
    inputs = {**tensors, "__calls__": calls}
    ns = _namespace(ALT_ALLOCATOR, ALT_TABLES)
    exec(ALT_GATHER, ns)
    outputs = {}
    for call in calls:
        args = [tensors[a] if isinstance(a, str) else a for a in call.args]
        if call.fn == "gather_kv":
            outputs[f"{call.id}#0"], outputs[f"{call.id}#1"] = (x.contiguous() for x in ns["gather_kv"](*args))
        elif call.fn == "paged_decode_attention":
            outputs[call.id] = ns["paged_decode_attention"](*args)
    assert SPEC.judge["test_gather"](inputs, outputs, {}) is None
    assert SPEC.judge["test_paged_attention"](inputs, outputs, {}) is None
    first = next(c.id for c in calls if c.fn == "gather_kv")
    outputs[f"{first}#1"] = outputs[f"{first}#1"].flip(1)                       # tokens in the wrong order
    assert "values" in SPEC.judge["test_gather"](inputs, outputs, {})
    last = [c.id for c in calls if c.fn == "paged_decode_attention"][-1]
    outputs[last] = outputs[last] * 1.001
    assert "max abs error" in SPEC.judge["test_paged_attention"](inputs, outputs, {})


def test_every_graded_test_of_assignment_04_has_a_judge():
    nb = nbformat.read(next((ROOT / "solutions" / "04_paged_kv").glob("*.ipynb")), as_version=4)
    graded_ids = {c.metadata["nbgrader"]["grade_id"] for c in nb.cells
                  if c.metadata.get("nbgrader", {}).get("grade") and c.metadata["nbgrader"].get("points")}
    assert graded_ids and graded_ids == set(harness.SPECS["04_paged_kv"].judge)
