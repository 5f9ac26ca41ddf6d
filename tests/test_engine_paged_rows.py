"""The engine's paged-row path under the worst schedules: every packed token (prefill chunks and decode
tokens) is a row of the paged decode kernel, and each request's next token comes from its last row.

Each case runs a workload on the kernel path (the Triton interpreter on a CPU, the compiled kernel on
a GPU) and checks what a scheduler must never get wrong: every request finishes once with the tokens
it generates alone (``generate``, greedy), the padded path (``use_kernel=False``) makes the same
schedule, the KV pool is entirely free afterwards and no device-side block-table row is leaked. The
workloads are the smallest that reach each corner (the interpreter costs about 0.4 s per row)."""
import pytest
import torch

from llmsys_lab._runtime import triton_available
from llmsys_lab.cuda_graphs import bucket_for, padded_stage, paged_rows
from llmsys_lab.engine import Engine, serve
from llmsys_lab.generate import generate
from llmsys_lab.paged_cache import PagedKVCache
from llmsys_lab.scheduler import RequestError, Scheduler

TEXTS = ["R", "ROMEO.\n", "To be, or not"]        # prompts of 1, 6 and 5 tokens


@pytest.fixture(scope="module")
def ktiny(ktiny):
    """The tiny model where the paged kernel runs (tests/conftest.py's `ktiny`) and TEXTS' prompts."""
    model, tok = ktiny
    return model, [tok(t).input_ids for t in TEXTS]


def _alone(model, prompt, n, eos):
    return generate(model, [prompt], n, eos_token_id=eos).new_tokens[0]


def _serve_and_check(model, prompts, reqs, eos=None, **kw):
    """Run `reqs` = [(prompt index, max_new_tokens, arrival_step)] on the kernel path and on the padded
    path; check every invariant and return the kernel-path engine and its requests."""
    engines = []
    for use_kernel in (True, False):
        engine = Engine(model, eos_token_id=eos, use_kernel=use_kernel, cuda_graphs=False, **kw)
        made = [engine.add_request(i, prompts[k], n, arrival_step=t) for i, (k, n, t) in enumerate(reqs)]
        seen = []
        while engine.scheduler.has_work:
            seen += [r.id for r in engine.step()]
            assert engine.iteration < 500, "the engine does not finish"
            rows = engine.scheduler.max_batch
            assert len(engine._row) + len(engine._free_rows) == rows
            assert sorted(list(engine._row.values()) + engine._free_rows) == list(range(rows))
            assert set(engine._row) <= set(engine.scheduler.running)
        assert sorted(seen) == list(range(len(reqs)))                     # each request once
        assert engine.blocks.num_free == engine.blocks.num_blocks         # no block leaked
        assert not engine._row and sorted(engine._free_rows) == list(range(engine.scheduler.max_batch))
        for r, (k, n, _) in zip(made, reqs):
            assert r.finished and r.output == _alone(model, prompts[k], n, eos), r.id
        engines.append((engine, made))
    (kernel, made), (padded, _) = engines
    assert [x["schedule"] for x in kernel.log] == [x["schedule"] for x in padded.log]
    return kernel, made


@pytest.mark.interpreter
def test_preemption_in_the_middle_of_a_chunked_prefill(ktiny, monkeypatch):
    """Token budget 2, chunked prefill, a pool of 6 blocks of 2: request 1 (6-token prompt) is
    preempted when only 2 of its prompt tokens are cached (request 0 needs a block to decode), then
    prefilled again from position 0 on the rows of a new block table."""
    model, prompts = ktiny
    states = []
    real_preempt = Scheduler.preempt

    def preempt(self, r):                   # the state of every preempted request, then the real thing
        states.append((r.id, r.prefilled, len(r.prompt), len(r.output)))
        real_preempt(self, r)

    monkeypatch.setattr(Scheduler, "preempt", preempt)
    engine, made = _serve_and_check(model, prompts, [(2, 4, 0), (1, 2, 1)], num_blocks=6, block_size=2,
                                    max_batch=2, token_budget=2, chunked_prefill=True)
    assert (1, 2, 6, 0) in states, states   # a check of the workload: preempted mid-prompt
    assert made[1].preemptions >= 1


@pytest.mark.interpreter
def test_a_recomputation_longer_than_the_token_budget_comes_back_in_chunks(ktiny):
    """Without chunked prefill, a request preempted after generating more tokens than the budget is
    recomputed in budget-sized chunks (the scheduler's exception to whole-prompt admission), rows at
    positions past its prompt included."""
    model, prompts = ktiny
    engine, made = _serve_and_check(model, prompts, [(0, 8, 0), (0, 7, 0)], num_blocks=5, block_size=2,
                                    max_batch=2, token_budget=2)
    victim = made[1]
    assert victim.preemptions >= 1
    chunks = [n for x in engine.log for rid, n in x["schedule"]["prefill"] if rid == victim.id]
    # its 1-token prompt, then prompt + 4 tokens recomputed as 2 + 2 (the newest token is a decode row)
    assert chunks == [1, 2, 2] and victim.preemptions == 1, chunks


@pytest.mark.interpreter
def test_one_at_a_time_with_late_arrivals_one_token_prompts_and_eos_first(ktiny):
    """max_batch 1, static batches, block size 1 (every token starts a block): a 1-token prompt with
    max_new_tokens=1, one whose first token is EOS, and a request arriving long after the others."""
    model, prompts = ktiny
    eos = _alone(model, prompts[0], 1, None)[0]            # the first token "R" generates
    engine, made = _serve_and_check(model, prompts, [(0, 1, 0), (0, 5, 0), (2, 3, 9)], eos=eos, num_blocks=8,
                                    block_size=1, max_batch=1, token_budget=5, policy="static")
    assert [len(r.output) for r in made[:2]] == [1, 1] and made[1].output == [eos]
    assert made[2].admitted_step >= 9


class EagerReplay:
    """What ``IterationGraphs.run`` does, without CUDA: pad the iteration's rows to its bucket with the
    padding column (token 0, context 1, the scratch row) and run the engine's step on the padded stage
    (a replay runs exactly that step on exactly that stage)."""

    def __init__(self, engine):
        self.engine, self.max_tokens, self.sizes = engine, engine.buckets[-1], []

    def run(self, tokens, lens, rows):
        n = len(tokens)
        size = bucket_for(self.engine.buckets, n)
        self.sizes.append((n, size))
        pad = [0, 1, self.engine.scheduler.max_batch]
        return self.engine._step(padded_stage(tokens, lens, rows, size, pad).to(self.engine._tables.device))[:n]


@pytest.mark.interpreter
def test_prefill_and_mixed_iterations_padded_to_their_bucket_give_the_tokens_alone(ktiny):
    """Every iteration, prefill chunks and decodes, padded to a bucket of [1, 2, 5] as a graph replays
    it, with the graphed engine's scratch block and padding table row: the padding rows write only the
    scratch block, so every request still gets its tokens alone and the pool's K/V are untouched by them."""
    model, prompts = ktiny
    w = model.lm_head.weight
    engine = Engine(model, num_blocks=9, block_size=2, max_batch=2, token_budget=5, chunked_prefill=True,
                    eos_token_id=None, use_kernel=True, cuda_graphs=False)
    assert engine.buckets == [1, 2, 5]
    engine.cache = PagedKVCache(model.config, engine.blocks, w.dtype, w.device, scratch_blocks=1)
    engine._tables[2] = 9                                   # the padding row: every entry the scratch block
    engine.graphs = replay = EagerReplay(engine)
    reqs = [engine.add_request(0, prompts[0], 4), engine.add_request(1, prompts[1], 3, arrival_step=2)]
    list(engine.run())
    assert all(x["graph"] for x in engine.log)
    assert any(size > n for n, size in replay.sizes), replay.sizes          # some iterations were padded
    for r, k, n in zip(reqs, (0, 1), (4, 3)):
        assert r.output == _alone(model, prompts[k], n, None)
    # padding rows are tokens at position 0 of the scratch block: they wrote there and nowhere else
    assert engine.cache.k[:, 9, 0].any() and not engine.cache.k[:, 9, 1:].any()
    assert engine.blocks.num_free == 9 and not engine._row


def test_a_block_size_the_kernel_cannot_tile_is_refused_up_front_or_served(ktiny):
    """Either the engine refuses the block size when it is built, naming it (the Triton kernel: it reads
    the cache in chunks of 64 tokens), or it serves the request with the tokens generated alone (its
    PyTorch reference, without Triton); never a failure in the middle of the first iteration (the
    engine used to accept block size 3, then fail inside its first forward pass holding the request's
    blocks and table row)."""
    model, prompts = ktiny
    if triton_available():
        with pytest.raises(ValueError, match=r"block_size = 3: block_n = 64 and block_size = 3 must divide one "
                                             r"another: the Triton paged kernel reads the cache in chunks of 64 "
                                             r"tokens, so the block size must divide 64 or be a multiple of it"):
            Engine(model, num_blocks=4, block_size=3, use_kernel=True, eos_token_id=None)
        for ok in (1, 16, 128):                                # sizes that tile with the kernel's chunks
            Engine(model, num_blocks=4, block_size=ok, use_kernel=True)
        return
    engine = Engine(model, num_blocks=4, block_size=3, use_kernel=True, eos_token_id=None)
    engine.add_request(0, prompts[0], 2)
    assert [r.output for r in engine.run()] == [_alone(model, prompts[0], 2, None)]
    assert engine.blocks.num_free == 4


# ---- settings and inputs ---------------------------------------------------------------------------

def test_capture_graphs_without_graphs_is_a_no_op(ktiny):
    """Graphs off (the CPU default; asked for explicitly, so a GPU runs the same case)."""
    model, prompts = ktiny
    engine = Engine(model, num_blocks=4, block_size=4, use_kernel=True, cuda_graphs=False)
    assert engine.capture_graphs() == 0.0 and engine.capture_seconds == 0.0 and engine.graphs is None
    engine, done = serve(model, [prompts[0]], 2, num_blocks=4, block_size=4, capture_graphs=True, use_kernel=True,
                         cuda_graphs=False, eos_token_id=None)
    assert engine.capture_seconds == 0.0 and done[0].output == _alone(model, prompts[0], 2, None)


@pytest.mark.parametrize("value", [0, -1, True, False, 8.0, None, "8", 7])
def test_bad_max_graph_tokens_are_refused(ktiny, value):
    with pytest.raises(ValueError, match=r"max_graph_tokens must be an int >= max_batch = 8"):
        Engine(ktiny[0], num_blocks=4, block_size=4, max_batch=8, max_graph_tokens=value)


def test_the_smallest_max_graph_tokens_gives_the_decode_buckets_only(ktiny):
    engine = Engine(ktiny[0], num_blocks=4, block_size=4, max_batch=8, token_budget=64, max_graph_tokens=8)
    assert engine.buckets == [1, 2, 4, 8]


@pytest.mark.parametrize("value", [None, "8"])
def test_a_bad_max_batch_is_named_in_the_error(ktiny, value):
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        Engine(ktiny[0], num_blocks=4, block_size=4, max_batch=value)


def test_a_non_bool_use_kernel_is_refused(ktiny):
    with pytest.raises(ValueError, match="use_kernel"):
        Engine(ktiny[0], num_blocks=4, block_size=4, use_kernel="no")


def test_paged_rows_refuses_a_chunk_at_a_negative_position():
    with pytest.raises(ValueError, match="position"):
        paged_rows([([5], -1, 0)])


def test_a_prompt_longer_than_the_budget_is_refused_without_chunked_prefill_and_served_with_it(ktiny):
    """Without chunked prefill a 6-token prompt over a budget of 4 is refused when added (nothing is
    queued, no block taken, the id stays free); with chunked prefill it is served in chunks of 4 + 2."""
    model, prompts = ktiny
    engine = Engine(model, num_blocks=4, block_size=4, max_batch=2, token_budget=4, use_kernel=True,
                    eos_token_id=None)
    with pytest.raises(RequestError, match=r"6-token prompt exceeds the per-iteration token budget of 4"):
        engine.add_request("long", prompts[1], 2)
    assert not engine.scheduler.has_work and engine.blocks.num_free == 4
    engine.add_request("long", prompts[0], 2)               # the id was not taken by the refused request
    assert [r.output for r in engine.run()] == [_alone(model, prompts[0], 2, None)]
    engine, made = _serve_and_check(model, prompts, [(1, 2, 0)], num_blocks=4, block_size=4, max_batch=2,
                                    token_budget=4, chunked_prefill=True)
    assert [x["schedule"]["prefill"] for x in engine.log][:2] == [[(0, 4)], [(0, 2)]]
