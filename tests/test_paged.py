"""Block allocator, block tables, copy-on-write, prefix caching and paged generation."""
import random

import pytest
import torch

from llmsys_lab.paged import BlockAllocator, BlockError, BlockManager, OutOfBlocks

ALAN = "Alan Turing is a computer scientist".split()
AI = "Artificial Intelligence is the future of technology".split()
LECTURE_ORDER = [7, 1, 3, 2, 5, 0, 4, 6]


def ids(words):
    return [hash(w) % 1000 for w in words]


def test_lecture_example_block_tables():
    m = BlockManager(num_blocks=8, block_size=4, order=LECTURE_ORDER)
    a = m.add("A", ids(ALAN))
    assert (a.blocks, a.filled) == ([7, 1], [4, 2])           # logical 0 -> 7, logical 1 -> 1
    m.append("A", 1)                                           # "and"
    m.append("A", 2)                                           # "mathematician": block 1 is full
    assert (a.blocks, a.filled) == ([7, 1], [4, 4])
    m.append("A", 3)                                           # "renowned": a new block, on demand
    assert (a.blocks, a.filled) == ([7, 1, 3], [4, 4, 1])
    b = m.add("B", ids(AI))
    assert (b.blocks, b.filled) == ([2, 5], [4, 3])
    assert m.num_free == 3
    assert m.slot("A", 8) == 3 * 4 and m.slot("B", 5) == 5 * 4 + 1


def test_free_returns_blocks_and_they_are_reused():
    m = BlockManager(num_blocks=4, block_size=2)
    m.add("x", [1, 2, 3])
    m.add("y", [4, 5])
    assert m.num_free == 1
    m.free("x")
    assert m.num_free == 3
    assert m.add("z", [6, 7, 8, 9, 10, 11]).blocks == [3, 1, 0]      # the free list, freed blocks last


def test_copy_on_write_for_parallel_sampling():
    m = BlockManager(num_blocks=8, block_size=4)
    m.add("p", [1, 2, 3, 4, 5, 6])                              # blocks 0 (full) and 1 (2 of 4)
    m.fork("p", "c")
    assert m.table("c").blocks == [0, 1] and m.allocator.refcount[:2] == [2, 2]
    cow = m.append("c", 99)                                     # the shared partial block is copied first
    assert (cow.src, cow.dst) == (1, 2) and m.table("c").blocks == [0, 2]
    assert m.append("p", 7) is None and m.table("p").blocks == [0, 1]   # the parent keeps its block
    m.free("p")
    m.free("c")
    assert m.num_free == 8


def test_prefix_caching_hits_and_eviction():
    m = BlockManager(num_blocks=6, block_size=2, prefix_caching=True)
    system = [10, 11, 12, 13]                                   # two full blocks shared by every request
    m.add("a", system + [1])
    m.add("b", system + [2])
    assert m.table("a").blocks[:2] == m.table("b").blocks[:2]  # shared physical blocks
    assert (m.hits, m.misses) == (2, 2) and m.hit_rate == 0.5
    m.free("a")
    m.free("b")
    assert m.num_free == 6 and len(m.evictable) == 2           # kept for later, but allocatable
    m.add("c", system + [3])
    assert m.hits == 4                                          # found again after both finished
    m.free("c")
    m.add("d", [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31])   # needs all 6 blocks: evicts the cache
    assert len(m.cached) == 6 - 0 and m.num_free == 0


def test_random_requests_never_leak():
    rng = random.Random(0)
    m = BlockManager(num_blocks=64, block_size=4, prefix_caching=True)
    live = []
    for step in range(3000):
        op = rng.random()
        if op < 0.3 and m.can_allocate(12):
            sid = f"s{step}"
            m.add(sid, [rng.randrange(3) for _ in range(rng.randint(1, 12))])
            live.append(sid)
        elif op < 0.4 and live and m.num_free > 2:
            child = f"f{step}"
            m.fork(rng.choice(live), child)
            live.append(child)
        elif op < 0.8 and live and m.num_free > 1:
            m.append(rng.choice(live), rng.randrange(3))
        elif live:
            m.free(live.pop(rng.randrange(len(live))))
        used = {b for t in m.tables.values() for b in t.blocks}
        assert sum(1 for r in m.allocator.refcount if r > 0) == len(used)
    for sid in live:
        m.free(sid)
    assert m.num_free == 64
    assert all(r == 0 for r in m.allocator.refcount)
    assert len(set(m.allocator.free_list) | set(m.evictable)) == 64


@pytest.mark.parametrize("call,err,msg", [
    (lambda: BlockManager(8, 0), BlockError, "block_size must be a positive int, got 0"),
    (lambda: BlockManager(0, 4), BlockError, "num_blocks must be a positive int, got 0"),
    (lambda: BlockManager(2, 4).add("a", list(range(9))), OutOfBlocks,
     r"sequence 'a' needs 3 blocks for 9 tokens \(block size 4\) but only 2 of 2 are free"),
    (lambda: BlockManager(2, 4).free("nobody"), BlockError, "unknown sequence 'nobody'"),
    (lambda: BlockAllocator(4).decref(2), BlockError, r"block 2 is already free \(double free\)"),
    (lambda: BlockAllocator(4).decref(9), BlockError, r"unknown block 9 \(blocks are 0..3\)"),
    (lambda: BlockManager(2, 4).add("a", []), BlockError, "empty prompt"),
    (lambda: BlockAllocator(3, order=[0, 0, 1]), BlockError, "permutation"),
])
def test_bad_input(call, err, msg):
    with pytest.raises(err, match=msg):
        call()


def test_append_to_finished_sequence_and_running_out():
    m = BlockManager(num_blocks=1, block_size=2)
    m.add("a", [1, 2])
    with pytest.raises(OutOfBlocks, match="no free block: all 1 blocks are in use"):
        m.append("a", 3)
    m.free("a")
    with pytest.raises(BlockError, match="sequence 'a' has finished and its blocks were freed"):
        m.append("a", 4)
    with pytest.raises(BlockError, match="sequence 'a' has finished"):
        m.free("a")


# ---- K/V in blocks: generation -----------------------------------------------------------

# `tiny` (the bundled model, loaded once per session): tests/conftest.py
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_generation_equals_contiguous_cache_and_hf(tiny, block_size):
    from transformers import AutoModelForCausalLM

    from llmsys_lab.generate import generate, pad_left
    from llmsys_lab.model import TINY_MODEL_PATH
    from llmsys_lab.paged_generate import generate_paged

    model, tok = tiny
    prompts = [tok(t).input_ids for t in ["ROMEO.\n", "To be, or not", "KING.\nMy lords, I pray you", "HAMLET.\nWhat"]]
    paged = generate_paged(model, prompts, 40, block_size=block_size, order=list(reversed(range(60))), num_blocks=60)
    assert paged.new_tokens == generate(model, prompts, 40).new_tokens
    hf = AutoModelForCausalLM.from_pretrained(TINY_MODEL_PATH, dtype=torch.float32).eval()
    ids, mask = pad_left(prompts, 0, "cpu")
    out = hf.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=40, pad_token_id=0, eos_token_id=0)
    for row, new in enumerate(paged.new_tokens):
        assert out[row, ids.shape[1]:ids.shape[1] + len(new)].tolist() == new
    assert paged.manager.num_free == 60                          # every block came back


def test_paged_generation_runs_out_of_blocks_with_a_clear_error(tiny):
    from llmsys_lab.paged_generate import generate_paged

    model, tok = tiny
    with pytest.raises(OutOfBlocks, match=r"sequence 0 needs 3 blocks for 9 tokens \(block size 4\) but only 1 of 1 are free"):
        generate_paged(model, [tok("KING.\nMy lords, I pray you").input_ids], 40, block_size=4, num_blocks=1)


def test_parallel_sampling_shares_the_prompt_and_equals_independent_samples(tiny):
    from llmsys_lab.generate import generate
    from llmsys_lab.paged_generate import sample_parallel

    model, tok = tiny
    prompt = tok("KING.\nMy lords, I pray you").input_ids          # 9 tokens: a shared, partly filled block
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    out = sample_parallel(model, prompt, gens, max_new_tokens=25, block_size=4, temperature=0.9, top_k=50)
    for s, new in enumerate(out.new_tokens):
        alone = generate(model, [prompt], 25, do_sample=True, temperature=0.9, top_k=50,
                         generator=torch.Generator().manual_seed(s)).new_tokens[0]
        assert new == alone
    assert len({tuple(n) for n in out.new_tokens}) > 1                 # the samples differ
    assert out.manager.num_free == out.manager.num_blocks


def test_prefix_caching_with_real_kv_gives_the_same_tokens(tiny):
    from llmsys_lab.paged_generate import generate_paged

    model, tok = tiny
    head = tok("KING.\nMy lords, I pray you, hear me speak").input_ids
    prompts = [head + tok(t).input_ids for t in [" now.", " again,", " of Rome"]]
    plain = generate_paged(model, prompts, 20, block_size=4)
    cached = generate_paged(model, prompts, 20, block_size=4, prefix_caching=True)
    assert cached.new_tokens == plain.new_tokens
    assert cached.manager.hits >= 2 * (len(head) // 4)


def test_kernel_block_sizes_must_divide():
    from llmsys_lab.kernels.paged_attention import paged_attention_decode

    q, kc = torch.zeros(1, 2, 16), torch.zeros(2, 6, 1, 16)
    with pytest.raises(ValueError, match="block_n = 16 and block_size = 6 must divide one another"):
        paged_attention_decode(q, kc, kc, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), block_n=16)


def test_slots_outside_the_sequence_are_refused():
    m = BlockManager(num_blocks=4, block_size=2, order=[3, 2, 1, 0])
    m.add("a", [1, 2, 3])
    assert m.slots("a", 0, 3) == [6, 7, 4] and m.slot("a", 2) == 4
    with pytest.raises(BlockError, match=r"sequence 'a' has 3 tokens, no positions 2..3"):
        m.slots("a", 2, 4)


# ---- atomicity and validation ---------------------------------------------------------------

def _state(m):
    import copy

    return copy.deepcopy((list(m.allocator.free_list), list(m.allocator.refcount), m.tables, m.finished,
                          dict(m.cached), list(m.evictable), m.hits, m.misses))


def test_copy_on_write_on_an_empty_pool_changes_nothing():
    m = BlockManager(num_blocks=2, block_size=4)
    m.add("p", [1, 2, 3, 4, 5, 6])                        # blocks 0 (full) and 1 (half): the pool is full
    m.fork("p", "c")
    before = _state(m)
    with pytest.raises(OutOfBlocks):
        m.append("c", 99)                                  # needs a copy of block 1: no block left
    assert _state(m) == before
    assert m.allocator.refcount == [2, 2]
    m.free("c")                                            # the parent still owns both blocks
    assert m.allocator.refcount == [1, 1] and m.num_free == 0
    with pytest.raises(OutOfBlocks):
        m.add("q", [7])                                    # block 1 is still the parent's


def test_copy_on_write_failure_never_shares_a_block():
    m = BlockManager(num_blocks=3, block_size=4)
    m.add("p", [1, 2, 3, 4, 5, 6])
    m.fork("p", "c")
    m.add("x", [9])                                        # takes the last free block
    with pytest.raises(OutOfBlocks):
        m.append("c", 99)
    m.free("x")
    m.free("c")
    q = m.add("q", [7])                                    # the one free block, never one of p's
    assert set(q.blocks).isdisjoint(m.table("p").blocks)
    assert m.allocator.refcount == [1, 1, 1]


@pytest.mark.parametrize("block,msg", [
    (0, r"block 0 is already free \(double release\)"),
    (-1, r"unknown block -1 \(blocks are 0..3\)"),
    (4, r"unknown block 4 \(blocks are 0..3\)"),
    (True, r"unknown block True"),
])
def test_release_is_validated(block, msg):
    a = BlockAllocator(4)
    free = list(a.free_list)
    with pytest.raises(BlockError, match=msg):
        a.release(block)
    assert list(a.free_list) == free


def test_release_twice_after_use_is_refused():
    a = BlockAllocator(2)
    b = a.allocate()
    a.decref(b)
    a.release(b)
    with pytest.raises(BlockError, match=f"block {b} is already free"):
        a.release(b)
    assert sorted(a.free_list) == [0, 1]


def test_fork_into_a_finished_or_existing_id_is_refused():
    m = BlockManager(num_blocks=4, block_size=2)
    m.add("p", [1, 2, 3])
    m.add("done", [4])
    m.free("done")
    before = _state(m)
    with pytest.raises(BlockError, match="sequence 'done' already exists"):
        m.fork("p", "done")
    with pytest.raises(BlockError, match="sequence 'p' already exists"):
        m.fork("p", "p")
    assert _state(m) == before
    m.free("p")
    assert m.num_free == 4


def test_prefix_cache_hash_collision_is_a_miss_not_a_shared_block(monkeypatch):
    """Every key collides: a hit must still compare the tokens (and the prefix before them)."""
    monkeypatch.setattr(BlockManager, "_block_key", staticmethod(lambda parent, tokens: 42))
    m = BlockManager(num_blocks=8, block_size=2, prefix_caching=True)
    a = m.add("a", [1, 2, 3, 4])
    b = m.add("b", [5, 6, 7, 8])
    assert set(a.blocks).isdisjoint(b.blocks)
    c = m.add("c", [1, 2, 9, 9])                           # first block equal to a's: a real hit
    assert c.blocks[0] == a.blocks[0] and c.blocks[1] not in a.blocks + b.blocks


def test_prefix_cache_checks_the_whole_prefix_not_just_the_block():
    m = BlockManager(num_blocks=8, block_size=2, prefix_caching=True)
    a = m.add("a", [1, 2, 3, 4])
    b = m.add("b", [9, 9, 3, 4])                           # same second block, different prefix
    assert b.blocks[1] != a.blocks[1]


def test_tokens_are_validated():
    m = BlockManager(num_blocks=4, block_size=2)
    with pytest.raises(BlockError, match=r"sequence 'a': token 1 is 2.5, not an int"):
        m.add("a", [1, 2.5])
    m.add("b", [1])
    with pytest.raises(BlockError, match="sequence 'b': token is '3', not an int"):
        m.append("b", "3")
    assert "a" not in m.tables and m.table("b").tokens == [1]


def test_prefixes_with_equal_python_hashes_do_not_share_a_block():
    """hash((5, 6)) == hash((5 + 2**61 - 1, 6)) in CPython: the old key, the prefix's hash, shared the block."""
    big = 5 + 2**61 - 1
    assert hash((5, 6)) == hash((big, 6))
    m = BlockManager(num_blocks=4, block_size=2, prefix_caching=True)
    a, b = m.add("a", [5, 6]), m.add("b", [big, 6])
    assert a.blocks != b.blocks and m.hits == 0
