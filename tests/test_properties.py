"""Property-based tests (Hypothesis) of the block manager, the scheduler and the engine.

Invariants are checked after every step of randomly drawn operation sequences; a failure is shrunk
to a minimal sequence. The amount of search is set by the Hypothesis profile (tests/conftest.py):
`ci` by default, `stress` with HYPOTHESIS_PROFILE=stress (make test-stress).
"""
import pytest
import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from llmsys_lab.paged import BlockError, BlockManager, OutOfBlocks
from llmsys_lab.scheduler import RequestError
from llmsys_lab.simulator import SimRequest, simulate

TOKENS = st.integers(0, 3)              # a tiny vocabulary: prefixes repeat, so the cache gets hits


# ---- the block manager ------------------------------------------------------------------------

class BlockManagerMachine(RuleBasedStateMachine):
    """Sequences are added, grown, forked and freed on pools of 1..64 blocks of 1..16 tokens.

    Besides the manager's bookkeeping, the test keeps `store`: what each physical slot holds, written
    the way the engine writes K/V (every new token into its slot, a copy-on-write copies the block).
    Reading a sequence back through its table must give its tokens: two sequences writing into one
    block, or a prefix-cache hit on a block with other tokens, would show up here.
    """

    seqs = Bundle("seqs")

    # pools of 1..64 blocks, mostly tiny ones (that is where they run dry) and small blocks
    @initialize(num_blocks=st.one_of(st.integers(1, 6), st.integers(1, 64)),
                block_size=st.one_of(st.integers(1, 4), st.integers(1, 16)), prefix_caching=st.booleans())
    def setup(self, num_blocks, block_size, prefix_caching):
        self.m = BlockManager(num_blocks, block_size, prefix_caching=prefix_caching)
        self.store = [None] * (num_blocks * block_size)
        self.want: dict[str, list[int]] = {}          # live sequence -> its tokens
        self.known: set[str] = set()                  # every id the manager has seen (live or finished)
        self.next_id = 0

    def _snapshot(self):
        m = self.m
        tables = {sid: (tuple(t.blocks), tuple(t.filled), tuple(t.tokens), tuple(t.cache_ids))
                  for sid, t in m.tables.items()}
        return (tuple(m.allocator.free_list), tuple(m.allocator.refcount), tables, frozenset(m.finished),
                dict(m.cached), dict(m.block_key), tuple(m.evictable), m.hits, m.misses)

    def _attempt(self, op, *args):
        """Run op; if it raises a BlockError, the manager must be exactly as before."""
        before = self._snapshot()
        try:
            return True, op(*args)
        except BlockError as err:
            assert self._snapshot() == before, f"{op.__name__} raised {err!r} and changed the state"
            return False, err

    def _write(self, sid, start):
        tokens = self.m.table(sid).tokens
        for pos, slot in enumerate(self.m.slots(sid, start, len(tokens)), start=start):
            self.store[slot] = tokens[pos]

    @rule(target=seqs, tokens=st.lists(TOKENS, min_size=1, max_size=20))
    def add(self, tokens):
        sid = f"s{self.next_id}"
        self.next_id += 1
        ok, err = self._attempt(self.m.add, sid, tokens)
        if not ok:
            assert isinstance(err, OutOfBlocks) and self.m.blocks_needed(len(tokens)) > self.m.num_free
            return sid                                    # a dead id: later rules must see errors for it
        self.want[sid] = list(tokens)
        self.known.add(sid)
        self._write(sid, 0)
        return sid

    @rule(target=seqs, short=st.integers(0, 3), token=TOKENS)
    def add_filling_the_pool(self, short, token):
        """A sequence that takes every free block, its last one partly filled: the next copy on write
        or new block finds the pool empty."""
        n = self.m.num_free * self.m.block_size - min(short, self.m.block_size - 1)
        return self.add([token] * n) if n > 0 else self.add([token])

    @rule(sid=seqs, token=TOKENS)
    def append(self, sid, token):
        ok, result = self._attempt(self.m.append, sid, token)
        if sid not in self.want:
            assert not ok
            return
        if not ok:
            assert isinstance(result, OutOfBlocks)
            return
        if result is not None:                            # copy on write: the engine copies the block
            bs = self.m.block_size
            self.store[result.dst * bs:(result.dst + 1) * bs] = self.store[result.src * bs:(result.src + 1) * bs]
        self.want[sid].append(token)
        self._write(sid, len(self.want[sid]) - 1)

    @rule(target=seqs, parent=seqs)
    def fork(self, parent):
        child = f"s{self.next_id}"
        self.next_id += 1
        self._fork(parent, child)
        return child

    @rule(parent=seqs, child=seqs)
    def fork_into_a_drawn_id(self, parent, child):
        """Into a live or finished id it must fail (a finished id used to leak the child's blocks)."""
        self._fork(parent, child)

    def _fork(self, parent, child):
        ok, _ = self._attempt(self.m.fork, parent, child)
        assert ok == (parent in self.want and child not in self.known)
        if ok:
            self.want[child] = list(self.want[parent])
            self.known.add(child)

    @rule(sid=seqs)
    def free(self, sid):
        """Freed ids stay in the bundle: appending to, forking into or freeing them again must fail."""
        ok, _ = self._attempt(self.m.free, sid)
        assert ok == (sid in self.want)
        self.want.pop(sid, None)

    @rule(block=st.integers(-2, 70))
    def release_directly(self, block):
        """Releasing a block that is referenced, already free or unknown is refused (a cached block
        nobody uses is the manager's to release when it evicts it)."""
        assume(block not in self.m.evictable)
        ok, _ = self._attempt(self.m.allocator.release, block)
        assert not ok

    @invariant()
    def bookkeeping(self):
        m = getattr(self, "m", None)
        if m is None:
            return
        a = m.allocator
        refs = [0] * m.num_blocks
        for t in m.tables.values():
            for b in t.blocks:
                refs[b] += 1
        assert a.refcount == refs, "reference counts differ from the block tables"
        free, evictable = list(a.free_list), set(m.evictable)
        assert len(free) == len(set(free)), "a block is twice in the free list"
        referenced = {b for b, r in enumerate(refs) if r}
        assert set(free) | evictable | referenced == set(range(m.num_blocks))
        assert not (set(free) & evictable) and not (set(free) & referenced) and not (evictable & referenced)
        assert evictable <= set(m.block_key), "an evictable block is not in the cache"
        assert {e.block for e in m.cached.values()} == set(m.block_key)

    @invariant()
    def every_sequence_reads_back_its_tokens(self):
        if getattr(self, "m", None) is None:
            return
        assert set(self.m.tables) == set(self.want)
        for sid, tokens in self.want.items():
            assert self.m.table(sid).tokens == tokens
            assert [self.store[s] for s in self.m.slots(sid, 0, len(tokens))] == tokens, sid


BlockManagerMachine.TestCase.settings = settings(max_examples=4 * settings.default.max_examples)   # cheap steps
TestBlockManager = BlockManagerMachine.TestCase


def test_block_manager_machine_with_every_key_colliding(monkeypatch):
    """The same machine with a prefix-cache key that always collides: hits must still be verified."""
    monkeypatch.setattr(BlockManager, "_block_key", staticmethod(lambda parent, tokens: 7))
    BlockManagerMachine.TestCase().runTest()


# ---- the scheduler, through the simulator ----------------------------------------------------------

@st.composite
def workloads(draw):
    n = draw(st.integers(1, 8))
    reqs = [SimRequest(f"r{i}", draw(st.integers(1, 12)), draw(st.integers(1, 14)), draw(st.integers(1, 8)))
            for i in range(n)]
    block_size = draw(st.sampled_from([1, 2, 4]))
    need = max(-(-(r.prompt_len + r.output_len) // block_size) for r in reqs)
    max_batch = draw(st.integers(1, 5))
    # tiny pools (preemption) and budgets just above the longest prompt (recomputation over budget)
    kw = dict(policy=draw(st.sampled_from(["static", "continuous"])), max_batch=max_batch, block_size=block_size,
              num_blocks=draw(st.one_of(st.integers(max(1, need - 1), need + 2), st.integers(1, need + 8))),
              token_budget=draw(st.integers(max(max_batch, max(r.prompt_len for r in reqs)), 26)),
              chunked_prefill=draw(st.booleans()))
    return reqs, kw


@settings(max_examples=5 * settings.default.max_examples)        # cheap: no model, no tensors
@given(workloads())
def test_every_request_finishes_once_with_its_tokens_or_is_rejected(workload):
    reqs, kw = workload
    note(f"{reqs} {kw}")
    too_big = [r for r in reqs if -(-(r.prompt_len + r.output_len) // kw["block_size"]) > kw["num_blocks"]
               or (not kw["chunked_prefill"] and r.prompt_len > kw["token_budget"])]
    if too_big:
        with pytest.raises(RequestError, match="can never fit|exceeds the per-iteration token budget"):
            simulate(reqs, **kw)
        return
    # a generous bound: every iteration runs at least one token of some request, preemptions included
    bound = 50 * sum(r.prompt_len + r.output_len for r in reqs) + 10 * max(r.arrival_step for r in reqs)
    sim = simulate(reqs, max_iterations=bound, **kw)                 # raises SchedulerStalled on a hang
    assert sorted(sim.requests) == sorted(r.id for r in reqs)
    for r in reqs:
        got = sim.requests[r.id]
        assert got.finished and len(got.output) == r.output_len and len(got.token_times) >= r.output_len
        assert got.admitted_step >= r.arrival_step
        assert got.arrival_time <= got.first_token_time <= got.finished_time
    ends = [rid for it in sim.timeline for rid, what in it.values() if what == "END"]
    assert sorted(ends) == sorted(r.id for r in reqs)                  # exactly one END each
    assert all(used <= reserved for used, reserved in zip(sim.kv_used, sim.kv_reserved))
    assert max(sim.kv_reserved) <= kw["num_blocks"] * kw["block_size"]
    assert all(len(it) <= kw["max_batch"] for it in sim.timeline)


# ---- the engine on the real model -------------------------------------------------------------------

ALONE_TEXTS = ["ROMEO.\n", "To be, or not", "KING.\nMy lords", "HAMLET.\nWhat"]


def _alone(device):
    from llmsys_lab.generate import generate
    from llmsys_lab.model import load_tiny

    model, tok = load_tiny(device)
    prompts = [tok(t).input_ids for t in ALONE_TEXTS]
    alone = [generate(model, [p], 12).new_tokens[0] for p in prompts]
    return model, prompts, alone


@pytest.fixture(scope="module")
def tiny_alone(tiny, greedy):
    """The bundled model, a few prompts and what each generates alone (the reference; tests/conftest.py's
    session model and memoised greedy runs)."""
    model, tok = tiny
    prompts = [tok(t).input_ids for t in ALONE_TEXTS]
    return model, prompts, [greedy(model, p, 12) for p in prompts]


@pytest.fixture(scope="module")
def ktiny_alone():
    """The same on the GPU, where the paged kernel runs compiled and the engine replays CUDA graphs."""
    return _alone("cuda")


@st.composite
def engine_workloads(draw):
    n = draw(st.integers(1, 5))
    reqs = [(draw(st.integers(0, 3)), draw(st.integers(1, 12)), draw(st.integers(0, 6))) for _ in range(n)]
    max_batch = draw(st.integers(1, 4))
    kw = dict(block_size=draw(st.sampled_from([2, 4])), max_batch=max_batch,
              policy=draw(st.sampled_from(["static", "continuous"])), chunked_prefill=draw(st.booleans()),
              token_budget=draw(st.integers(max(max_batch, 4), 24)))
    return reqs, kw


def _every_request_gets_its_tokens_alone(model, prompts, alone, workload, spare, **engine_kw):
    from llmsys_lab.engine import Engine

    reqs, kw = workload
    longest = max(len(prompts[k]) + n for k, n, _ in reqs)
    assume(kw["chunked_prefill"] or max(len(prompts[k]) for k, _, _ in reqs) <= kw["token_budget"])
    num_blocks = -(-longest // kw["block_size"]) + spare               # the smallest pool that fits, or a bit more
    note(f"{reqs} {kw} num_blocks={num_blocks}")
    engine = Engine(model, num_blocks=num_blocks, **kw, **engine_kw)
    for i, (k, n, arrival) in enumerate(reqs):
        engine.add_request(i, prompts[k], n, arrival_step=arrival)
    seen = [r.id for r in engine.run()]
    assert sorted(seen) == list(range(len(reqs)))
    for r in engine.scheduler.finished:
        k, n, _ = reqs[r.id]
        assert r.output == alone[k][:n], r.id
    assert engine.blocks.num_free == num_blocks
    return engine


@settings(max_examples=6, deadline=None)                # the real model on a CPU: a few workloads only
@given(engine_workloads(), st.integers(0, 3))
def test_engine_on_tiny_pools_gives_every_request_its_tokens_alone(tiny_alone, workload, spare):
    _every_request_gets_its_tokens_alone(*tiny_alone, workload, spare)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: checks CUDA-graph replay of every "
                    "iteration under random workloads (the kernel path without graphs runs on the CPU on fixed cases "
                    "in tests/test_engine_graphs.py and tests/test_engine_paged_rows.py)")
@settings(max_examples=8, deadline=None)
@given(engine_workloads(), st.integers(0, 3))
def test_engine_on_the_kernel_path_gives_every_request_its_tokens_alone(ktiny_alone, workload, spare):
    """Every packed token a paged-attention row (prefill chunks included), through preemption, chunked
    prefill and static batches, every iteration replayed from a CUDA graph."""
    engine = _every_request_gets_its_tokens_alone(*ktiny_alone, workload, spare, use_kernel=True)
    assert engine.cuda_graphs and all(x["graph"] for x in engine.log)
