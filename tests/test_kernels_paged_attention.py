"""The Triton paged-attention decode kernel against a gather reference and contiguous SDPA."""
import pytest
import torch
import torch.nn.functional as F

from llmsys_lab.kernels.paged_attention import paged_attention_decode, paged_attention_reference

pytestmark = pytest.mark.interpreter          # on a CPU these kernels run in the Triton interpreter

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def make(device, dtype, b, h, h_kv, d, block_size, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-n // block_size) for n in lens)
    num_blocks = need + 3
    perm = torch.randperm(num_blocks, generator=g)                 # blocks scattered over the pool
    width = max(-(-n // block_size) for n in lens)
    tables = torch.zeros(b, width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):
        k = -(-n // block_size)
        tables[i, :k] = perm[used:used + k].int()
        used += k
    q = torch.randn(b, h, d, generator=g).to(device, dtype)
    kc = torch.randn(num_blocks, block_size, h_kv, d, generator=g).to(device, dtype)
    vc = torch.randn(num_blocks, block_size, h_kv, d, generator=g).to(device, dtype)
    return q, kc, vc, tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,h_kv,d,block_size,lens", [
    (4, 2, 32, 4, [5, 1, 13]),          # GQA, ragged lengths, a one-token sequence
    (4, 4, 64, 16, [40, 17]),           # MHA, lengths not multiples of the block size
    (8, 1, 32, 8, [64, 3, 9, 30]),      # MQA
])
def test_matches_gather_reference_and_contiguous_sdpa(device, dtype, h, h_kv, d, block_size, lens):
    q, kc, vc, bt, cl = make(device, dtype, len(lens), h, h_kv, d, block_size, lens)
    out = paged_attention_decode(q, kc, vc, bt, cl, block_n=16)
    ref = paged_attention_reference(q, kc, vc, bt, cl)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    for i, n in enumerate(lens):                                   # contiguous K/V through SDPA
        pos = torch.arange(n, device=device)
        blocks = bt[i].long()[pos // block_size]
        k = kc[blocks, pos % block_size].transpose(0, 1)[None]     # (1, H_kv, n, D)
        v = vc[blocks, pos % block_size].transpose(0, 1)[None]
        sdpa = F.scaled_dot_product_attention(q[i][None, :, None].float(), k.float(), v.float(), enable_gqa=True)
        torch.testing.assert_close(out[i].float(), sdpa[0, :, 0], atol=TOL[dtype] * 2, rtol=TOL[dtype] * 2)


def test_empty_sequence_gives_zeros_not_nan(device):
    q, kc, vc, bt, cl = make(device, torch.float32, 2, 4, 2, 32, 4, [6, 1])
    cl[1] = 0
    out = paged_attention_decode(q, kc, vc, bt, cl, block_n=16)
    assert not torch.isnan(out).any() and torch.all(out[1] == 0)


@pytest.mark.parametrize("change,err,msg", [
    (dict(q=torch.zeros(2, 4)), ValueError, r"q must be \(batch, heads, head_dim\)"),
    (dict(d=24), ValueError, "head_dim must be a power of two >= 16, got 24"),
    (dict(h=6, h_kv=4), ValueError, "kv_heads = 4 must divide heads = 6"),
    (dict(tables_dtype=torch.int64), TypeError, "block_tables and context_lens must be int32"),
    (dict(q_dtype=torch.float16), TypeError, "q, k_cache and v_cache must share a dtype"),
])
def test_bad_input(change, err, msg):
    h, h_kv, d = change.get("h", 4), change.get("h_kv", 2), change.get("d", 32)
    q, kc, vc, bt, cl = make("cpu", torch.float32, 2, h, h_kv, d, 4, [5, 3])
    q = change.get("q", q).to(change.get("q_dtype", torch.float32))
    bt = bt.to(change.get("tables_dtype", torch.int32))
    with pytest.raises(err, match=msg):
        paged_attention_decode(q, kc, vc, bt, cl)


@pytest.mark.parametrize("change,msg", [
    (dict(lens=[5, 13]), r"context_lens\[1\] = 13 needs 4 blocks of 4, but block_tables has 2 columns"),
    (dict(lens=[5, -1]), r"context_lens\[1\] = -1 is negative"),
    (dict(block=(0, 1, 99)), r"block_tables\[0, 1\] = 99 is not a block of the pool \(0..5\)"),
    (dict(block=(1, 0, -2)), r"block_tables\[1, 0\] = -2 is not a block of the pool \(0..5\)"),
])
def test_tables_that_do_not_cover_the_context_are_refused_before_launch(change, msg):
    """Out-of-pool blocks or lengths beyond the table used to read garbage (NaN, or a crash in the interpreter)."""
    q, kc, vc, bt, cl = make("cpu", torch.float32, 2, 4, 2, 32, 4, [5, 3])
    if "lens" in change:
        cl = torch.tensor(change["lens"], dtype=torch.int32)
    if "block" in change:
        i, j, v = change["block"]
        bt[i, j] = v
    with pytest.raises(ValueError, match=msg):
        paged_attention_decode(q, kc, vc, bt, cl)


def test_unused_table_entries_may_hold_anything(device):
    """Padding beyond a sequence's blocks is never read, so it is not checked."""
    q, kc, vc, bt, cl = make(device, torch.float32, 2, 4, 2, 32, 4, [5, 3])
    bt[1, 1] = -7                                                  # sequence 1 uses one block only
    out = paged_attention_decode(q, kc, vc, bt, cl, block_n=16)
    bt[1, 1] = 0
    torch.testing.assert_close(out, paged_attention_reference(q, kc, vc, bt, cl), atol=2e-5, rtol=2e-5)


def test_the_check_can_be_skipped_by_a_caller_that_built_the_tables(device):
    q, kc, vc, bt, cl = make(device, torch.float32, 2, 4, 2, 32, 4, [5, 3])
    out = paged_attention_decode(q, kc, vc, bt, cl, block_n=16, check=False)
    torch.testing.assert_close(out, paged_attention_reference(q, kc, vc, bt, cl), atol=2e-5, rtol=2e-5)


# ---- split-KV (flash-decoding): the context of a sequence over several programs, merged by lse ----

@pytest.mark.parametrize("num_splits", [1, 2, 3, 4])
@pytest.mark.parametrize("h,h_kv,block_size,lens", [
    (4, 2, 4, [37]),                    # batch 1, GQA; 37 is a multiple of neither the block nor a split
    (8, 2, 8, [50, 5, 23]),             # batch 3, GQA; 5 tokens: shorter than one split (other splits empty)
])
def test_split_kv_matches_the_reference_and_the_unsplit_kernel(device, num_splits, h, h_kv, block_size, lens):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, kc, vc, bt, cl = make(device, dtype, len(lens), h, h_kv, 32, block_size, lens, seed=num_splits)
    split = paged_attention_decode(q, kc, vc, bt, cl, block_n=16, num_splits=num_splits)
    unsplit = paged_attention_decode(q, kc, vc, bt, cl, block_n=16, num_splits=1)
    torch.testing.assert_close(split, paged_attention_reference(q, kc, vc, bt, cl), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(split, unsplit, atol=TOL[dtype], rtol=TOL[dtype])


def test_split_kv_empty_sequence_and_more_splits_than_chunks(device):
    """A 0-token sequence gives zeros (every partial has lse = -inf); 4 splits of a 3-token context leave 3 empty."""
    q, kc, vc, bt, cl = make(device, torch.float32, 2, 4, 2, 32, 4, [3, 6])
    cl[1] = 0
    out = paged_attention_decode(q, kc, vc, bt, cl, block_n=16, num_splits=4)
    assert not torch.isnan(out).any() and torch.all(out[1] == 0)
    torch.testing.assert_close(out, paged_attention_reference(q, kc, vc, bt, cl), atol=2e-5, rtol=2e-5)


def test_split_kv_automatic_choice_runs_the_split_path(device):
    q, kc, vc, bt, cl = make(device, torch.float32, 1, 4, 2, 32, 4, [29])
    out = paged_attention_decode(q, kc, vc, bt, cl, block_n=16, num_splits=None)
    torch.testing.assert_close(out, paged_attention_reference(q, kc, vc, bt, cl), atol=2e-5, rtol=2e-5)


def test_merge_kernel_equals_lesson_06_merge_of_the_same_partials(device):
    """The Triton merge against merge_splits_reference (llmsys_lab.flash.merge_stats folded over splits),
    on partials with empty ranges (lse = -inf) and a row whose ranges are all empty."""
    from llmsys_lab.kernels.paged_attention import _merge_splits_kernel, merge_splits_reference, triton

    g = torch.Generator().manual_seed(0)
    b, h, s, d = 2, 3, 3, 16
    part = torch.randn(b, h, s, d, generator=g)
    lse = torch.randn(b, h, s, generator=g) * 4
    lse[0, 1, 2] = float("-inf")
    part[0, 1, 2] = 0
    lse[1, 2] = float("-inf")
    part[1, 2] = 0
    part, lse = part.to(device), lse.to(device)           # the kernel runs where Triton compiles: the GPU if any
    out = torch.empty(b, h, d, device=device)
    _merge_splits_kernel[(b, h)](part, lse, out, h, out.stride(0), out.stride(1), NUM_SPLITS=s,
                                 SPLITS_PAD=triton.next_power_of_2(s), HEAD_DIM=d)
    ref = merge_splits_reference(part, lse)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out[1, 2] == 0)
    # and the merge is the softmax-weighted mean of the partials
    w = torch.softmax(lse[0, 0], dim=0)
    torch.testing.assert_close(out[0, 0], (w[:, None] * part[0, 0]).sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_num_splits_is_refused(bad):
    q, kc, vc, bt, cl = make("cpu", torch.float32, 2, 4, 2, 32, 4, [5, 3])
    with pytest.raises(ValueError, match=f"num_splits must be None .* or an int >= 1, got {bad!r}"):
        paged_attention_decode(q, kc, vc, bt, cl, num_splits=bad)


def test_choose_num_splits():
    from llmsys_lab.kernels.paged_attention import INTERPRETER_SPLITS, choose_num_splits

    assert choose_num_splits(1, 8, 4096, None) == INTERPRETER_SPLITS             # no GPU: a fixed small number
    assert choose_num_splits(1, 8, 4096, 132) == 32                               # ceil(264 / 8) = 33, but >= 128 tokens per split
    assert choose_num_splits(8, 8, 4096, 132) == 5                                # ceil(2 x 132 / 64)
    assert choose_num_splits(32, 8, 2048, 132) == 1                               # 256 programs fill 132 SMs
    assert choose_num_splits(1, 8, 512, 132) == 4                                 # >= 128 tokens per split
    assert choose_num_splits(1, 8, 100, 132) == 1
    assert choose_num_splits(1, 1, 1 << 20, 132) == 32                            # capped at max_splits


@pytest.mark.parametrize("bad", [8, 4, 24, 16.0])
def test_bad_block_n_is_refused_before_the_compiler_sees_it(bad):
    """tl.dot needs an inner dimension >= 16 on a GPU: refuse it with a message, not a compiler trace."""
    q, kc, vc, bt, cl = make("cpu", torch.float32, 2, 4, 2, 32, 4, [5, 3])
    with pytest.raises(ValueError, match=f"block_n must be a power of two >= 16 .*got {bad!r}"):
        paged_attention_decode(q, kc, vc, bt, cl, block_n=bad)
