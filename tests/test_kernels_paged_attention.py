"""The Triton paged-attention decode kernel against a gather reference and contiguous SDPA."""
import pytest
import torch
import torch.nn.functional as F

from llmsys_lab.kernels.paged_attention import paged_attention_decode, paged_attention_reference

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
