"""Assignments 07, 08 and 10 as a student with a typical bug meets them: the graded test's message names the
bug (which step and chunk of the ring, which output a store escaped, which token differs), not a symptom.

Each test runs the solution's own cells in this process (as a notebook kernel would), with one answer
changed the way a student gets it wrong, and checks the CheckFailed message.
"""
import linecache
import re
from pathlib import Path

import nbformat
import pytest

from llmsys_lab._runtime import triton_available
from llmsys_lab.checks import CheckFailed, finish_own_code

ROOT = Path(__file__).resolve().parent.parent


def cells_of(name: str) -> dict[str, str]:
    nb = nbformat.read(ROOT / "solutions" / name, as_version=4)
    return {c.metadata.get("nbgrader", {}).get("grade_id"): c.source for c in nb.cells if c.cell_type == "code"}


def run(ns: dict, source: str, label: str) -> None:
    """Execute a cell with its source registered, as IPython does (inspect.getsource must find it: the
    launcher ships functions' source to the ranks and @triton.jit reads it)."""
    filename = f"<cell {label}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), ns)


def play(name: str, answers: dict[str, str], tests: list[str], changes: dict[str, tuple[str, str]] = {},
         settings: dict | None = None) -> str | None:
    """Run setup, the answers (with `changes`: grade id -> (old, new) text) and the tests; return the first
    CheckFailed message, or None if every test passed."""
    cells = cells_of(name)
    ns = {"__name__": "__main__"}
    run(ns, cells["setup"], "setup")
    ns.update(settings or {})
    try:
        for gid in answers:
            source = cells[gid]
            if gid in changes:
                old, new = changes[gid]
                assert source.count(old) == 1, (gid, old)
                source = source.replace(old, new)
            run(ns, source, gid)
        for gid in tests:
            run(ns, cells[gid], gid)
    except CheckFailed as err:
        return str(err)
    finally:
        finish_own_code()
    return None


# ---- assignment 08: two ring bugs, two different messages; a deadlock; a bare collective --------
RING = "08_parallelism/parallelism.ipynb"
RING_CELLS = ["ring_all_reduce", "ring_test_fn"]


@pytest.mark.slow
def test_ring_bugs_are_told_apart_by_step_and_chunk():
    assert play(RING, RING_CELLS, ["test_ring_all_reduce"]) is None          # the solution passes
    off_by_one = play(RING, RING_CELLS, ["test_ring_all_reduce"], {"ring_all_reduce": (
        "send_i, recv_i = (rank - step) % world, (rank - step - 1) % world",
        "send_i, recv_i = (rank - step + 1) % world, (rank - step - 1) % world")})
    added = play(RING, RING_CELLS, ["test_ring_all_reduce"], {"ring_all_reduce": (
        "chunks[recv_i].copy_(incoming)", "chunks[recv_i].add_(incoming)")})
    assert re.search(r"at reduce-scatter step 0 rank \d sent chunk \d; the ring sends chunk \d then", off_by_one), off_by_one
    assert re.search(r"these chunks are wrong: chunk \d, which this rank receives at all-gather step \d", added), added
    assert off_by_one != added


@pytest.mark.slow
def test_a_deadlocked_ring_is_stopped_soon_and_called_a_deadlock():
    import time

    began = time.perf_counter()
    message = play(RING, RING_CELLS, ["test_ring_all_reduce"], {"ring_all_reduce": (
        "dist.recv(incoming, left)\n        req.wait()\n        chunks[recv_i].add_(incoming)",
        "dist.recv(incoming, right)\n        req.wait()\n        chunks[recv_i].add_(incoming)")},
        settings={"RANK_TIMEOUT": 3})
    assert message is not None and "a deadlock?" in message and "did not finish within 3 s" in message, message
    assert time.perf_counter() - began < 60


def test_a_bare_all_reduce_in_the_row_parallel_layer_is_named():
    message = play(RING, ["shards", "tp_layers", "tp_test_fn"], ["test_tp_mlp"], {"tp_layers": (
        "return reduce_from_tp(F.linear(x_shard, w_shard))",
        "out = F.linear(x_shard, w_shard)\n    dist.all_reduce(out)\n    return out")})
    assert message is not None and message.startswith("row_parallel_linear calls all_reduce itself"), message


# ---- assignment 07: an unmasked store or load is named --------------------------------------------
FUSED = "07_performance/performance.ipynb"
FUSED_CELLS = ["spec_add_rmsnorm", "add_rmsnorm_kernel", "launcher"]


@pytest.mark.skipif(not triton_available(), reason="needs Triton (its interpreter on a CPU)")
@pytest.mark.parametrize("old, new, expected", [
    ("tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)",
     "tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty))",
     r"your kernel wrote outside normed \(out_ptr\), past the end of a row: mask that store"),
    ("tl.store(new_res_ptr + offs, h, mask=mask)", "tl.store(new_res_ptr + offs, h)",
     r"your kernel wrote outside new_residual \(new_res_ptr\)"),
    ("x = tl.load(x_ptr + offs, mask=mask, other=0.0)", "x = tl.load(x_ptr + offs)",
     r"normed is NaN in row\(s\) \[4\] although every input is finite: the kernel read past the end of a row"),
])
def test_unmasked_stores_and_loads_are_named(old, new, expected):
    assert play(FUSED, FUSED_CELLS, ["test_fused_norm_ragged"]) is None
    message = play(FUSED, FUSED_CELLS, ["test_fused_norm_ragged"], {"add_rmsnorm_kernel": (old, new)})
    assert message is not None and re.search(expected, message), message


# ---- assignment 10: the text's loop runs as written, and a wrong token is located -----------------
SPEC = "10_speculative_decoding/speculative.ipynb"
SPEC_CELLS = ["verify_step", "rollback", "loop_setup", "speculative_greedy"]


def test_the_loop_as_the_text_writes_it_and_a_wrong_bonus_token_located():
    cells = cells_of(SPEC)
    assert "if k > 0" not in cells["speculative_greedy"]            # propose(k = 0) is called, as the text says
    assert play(SPEC, SPEC_CELLS, ["test_loop_greedy"]) is None
    message = play(SPEC, SPEC_CELLS, ["test_loop_greedy"], {"speculative_greedy": (
        "        rollback(cache, len(context) + n)\n",
        "        rollback(cache, len(context) + n)\n        nxt = (nxt + 1) % 4096 if n == len(tokens) else nxt\n")})
    assert message is not None and re.search(r"first difference at new token \d+: got \d+, expected \d+ "
                                             r"\(the first \d+ tokens agree\)", message), message
