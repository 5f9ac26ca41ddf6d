"""Paged attention for decode, in Triton: one new query per sequence against K/V stored in blocks.

The K/V of a sequence are scattered over fixed-size physical blocks; its block table says which.
The kernel never builds a contiguous copy: for each chunk of BLOCK_N token positions it looks up
their physical blocks in the block table, loads those K rows straight from the block pool,
and folds them into the output with the online softmax (running max m, running sum l),
the same recurrence FlashAttention uses (lesson 06).

One program handles one (sequence, K/V head) pair and all the query heads that share that K/V
head (GQA), so every K/V byte is read from memory once. Decode is memory-bound (lesson 02):
the speed that matters is bytes of K/V read per second.

**Split-KV ("flash-decoding").** At small batch, batch x K/V heads programs cannot fill the GPU
(1 x 8 programs on an H200's 132 SMs): each sequence's context is then split over `num_splits`
programs; each attends to its range of token positions and writes a partial output, normalised by
its own softmax sum, with its log-sum-exp lse = m + log(l). A second small kernel merges the
partials per (sequence, query head) with lesson 06's two-block merge generalised to S blocks
(llmsys_lab.flash.merge_stats): M = max_s lse_s, out = sum_s e^(lse_s - M) o_s / sum_s e^(lse_s - M).
The merge is a Triton kernel rather than a PyTorch reduction because at batch 1 the whole decode
step takes ~20 us and the half-dozen launches of an eager max / exp / multiply / sum / divide
would cost about as much as the attention itself; one launch reads the partials once.

Layouts: q (B, H, D); k_cache, v_cache (num_blocks, block_size, H_kv, D);
block_tables (B, max_blocks) int32; context_lens (B,) int32. Output (B, H, D).
"""
from __future__ import annotations

import math

import torch
from llmsys_lab._runtime import check_kernel_dtype, require_triton
from llmsys_lab.kernels._triton import tl, triton  # Triton, or a stand-in that raises TritonUnavailable

BLOCK_N = 64            # tokens per inner step of the kernel, by default (a block size must tile with it)


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, out_ptr, part_ptr, lse_ptr, scale, num_heads,
                         stride_qb, stride_qh, stride_kb, stride_ks, stride_kh,
                         stride_btb, stride_ob, stride_oh,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                         NUM_SPLITS: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)                         # 0 when the context is not split
    offs_g = tl.arange(0, GROUP_PAD)                 # query heads of this K/V head (padded for tl.dot)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)     # (GROUP_PAD, D)

    ctx = tl.load(len_ptr + b)
    if NUM_SPLITS == 1:
        lo = 0
        hi = ctx
    else:
        # this program's token positions: the context cut into NUM_SPLITS ranges of whole BLOCK_N
        # chunks (the last ranges may be short or empty)
        per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, ctx)
    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)       # token positions of this chunk
        n_mask = offs_n < hi
        # logical block -> physical block, then the row inside it: the paging step
        block = tl.load(bt_ptr + b * stride_btb + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        rows = block.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks + kvh * stride_kh
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)   # (BLOCK_N, D)
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale       # (GROUP_PAD, BLOCK_N), fp32 accumulate
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # online softmax: rescale what was accumulated with the old max, add this chunk
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]     # an empty sequence (or range) gives 0, not NaN
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        # partials (B, H, NUM_SPLITS, D) and lse (B, H, NUM_SPLITS), fp32; an empty range has lse = -inf
        row = (b * num_heads + heads) * NUM_SPLITS + split                    # (GROUP_PAD,)
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=g_mask[:, None])
        tl.store(lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, num_heads, stride_ob, stride_oh,
                         NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program per (sequence, query head): the log-sum-exp merge of its NUM_SPLITS partials."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    row = (b * num_heads + h) * NUM_SPLITS + offs_s                          # (SPLITS_PAD,)
    lse = tl.load(lse_ptr + row, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)            # every range empty (a 0-token sequence): weights 0
    w = tl.exp(lse - m)                                 # e^(m_s - M) l_s: the merge_stats weights
    o = tl.load(part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    den = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(den > 0, den, 1.0)      # (HEAD_DIM,)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


# Splits used by num_splits=None where there is no GPU to size them for (the interpreter): small,
# so that the tests exercise the split path at interpreter speed.
INTERPRETER_SPLITS = 2


def choose_num_splits(batch: int, kv_heads: int, max_context: int, num_sms: int | None,
                      block_n: int = BLOCK_N, min_tokens_per_split: int = 128, max_splits: int = 32) -> int:
    """How many programs share one sequence's context: about two programs per SM, no more.

    The unsplit kernel runs batch x kv_heads programs; once that fills the SMs, splitting only adds
    the partials' writes and the merge. Below that, split by ceil(2 num_sms / (batch x kv_heads)),
    but give each split at least `min_tokens_per_split` tokens (a short range does not amortise its
    program's start-up, the load of q and the write of a partial) and at most `max_splits`.
    `num_sms` None (no GPU: the Triton interpreter) gives INTERPRETER_SPLITS.

    Why two programs per SM, not one: measured on an H200 (benchmarks/paged_attention.py, batch 8,
    context 4096, 64 programs unsplit), one per SM (3 splits) reached 0.90x SDPA and 4 to 8 splits
    0.98x: programs do not all take equally long (a split may end mid-block), and a second program
    per SM hides the first one's tail. At every measured shape this choice was never slower than the
    unsplit kernel, so ``num_splits=None`` (this choice) is the kernel's default. The floor of 128
    tokens per split is measured too: at batch 1 and context 4096, replayed in a CUDA graph (as the
    engine's decode runs), 16 splits of 256 tokens reached 0.85x SDPA and 32 splits of 128 tokens 0.99x.
    Launched one by one from Python the same kernel stays near 0.45x SDPA at batch 1 whatever the split:
    two Triton launches cost more CPU time than the ~10 us of GPU work.
    """
    if num_sms is None:
        return INTERPRETER_SPLITS
    programs = batch * kv_heads
    if programs >= num_sms:
        return 1
    by_sms = -(-2 * num_sms // programs)
    by_length = max(1, max_context // max(min_tokens_per_split, block_n))
    return max(1, min(by_sms, by_length, max_splits))


def check_block_tables(block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int,
                       block_size: int) -> None:
    """Every block a sequence reads must be in the table and in the pool; the kernel does not check
    (an id outside the pool reads another tensor's memory: garbage, NaN or a crash).

    One vectorised pass and one device-to-host copy of a flag; only on failure is the culprit found.
    Entries past a sequence's last block are padding: never read, so never checked.
    """
    width = block_tables.shape[1]
    used = (context_lens.long() + block_size - 1).div(block_size, rounding_mode="floor")      # (B,) blocks read
    cols = torch.arange(width, device=block_tables.device)
    reads = cols[None, :] < used[:, None]                                              # (B, max_blocks)
    bad_ids = reads & ((block_tables < 0) | (block_tables >= num_blocks))
    bad_lens = (context_lens < 0) | (used > width)
    if not bool(bad_ids.any() | bad_lens.any()):
        return
    if bool(bad_lens.any()):
        i = int(bad_lens.nonzero()[0, 0])
        n = int(context_lens[i])
        if n < 0:
            raise ValueError(f"context_lens[{i}] = {n} is negative")
        raise ValueError(f"context_lens[{i}] = {n} needs {-(-n // block_size)} blocks of {block_size}, but "
                         f"block_tables has {width} columns")
    i, j = (int(x) for x in bad_ids.nonzero()[0])
    raise ValueError(f"block_tables[{i}, {j}] = {int(block_tables[i, j])} is not a block of the pool "
                     f"(0..{num_blocks - 1})")


def check_block_size(block_size: int, block_n: int = BLOCK_N) -> None:
    """The kernel reads the cache in chunks of block_n token positions and finds each one's block by
    division, so a chunk must lie in whole blocks or a block in whole chunks."""
    if block_n % block_size and block_size % block_n:
        raise ValueError(f"block_n = {block_n} and block_size = {block_size} must divide one another: the Triton "
                         f"paged kernel reads the cache in chunks of {block_n} tokens, so the block size must divide "
                         f"{block_n} or be a multiple of it")


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float | None = None,
                           block_n: int = BLOCK_N, num_warps: int = 4, num_stages: int = 3,
                           check: bool = True, num_splits: int | None = None) -> torch.Tensor:
    """softmax(q K^T * scale) V for each sequence's first context_lens[b] cached tokens.

    `check=False` skips check_block_tables (one small reduction and a device-to-host sync per call)
    where the caller built the tables itself and knows they are valid (the serving engine does), and
    in timing loops after one checked call.

    `num_splits`: programs per (sequence, K/V head), each over a range of the context, merged by a
    second kernel (split-KV, see the module docstring). None (the default) chooses with
    choose_num_splits from the shape and the GPU's SM count (measured never slower than unsplit on an
    H200); 1 is the unsplit kernel; a number forces that many splits.

    `block_n` (tokens per inner step) must be at least 16: the kernel's two products are tl.dot
    calls, whose inner dimension the GPU compiler requires to be >= 16."""
    require_triton("the Triton paged decode kernel")
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, heads, head_dim), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must both be (num_blocks, block_size, kv_heads, head_dim), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    b, h, d = q.shape
    _, block_size, h_kv, d_k = k_cache.shape
    if d_k != d:
        raise ValueError(f"q has head_dim {d} but the cache holds head_dim {d_k}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if h % h_kv:
        raise ValueError(f"kv_heads = {h_kv} must divide heads = {h}")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise TypeError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    check_kernel_dtype(q, "paged_attention_decode")    # bf16 refused below compute capability 8.0 (a T4)
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise TypeError("block_tables and context_lens must be int32")
    if block_tables.shape[0] != b or context_lens.shape != (b,):
        raise ValueError(f"block_tables must be (batch={b}, max_blocks) and context_lens (batch,), got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1):
        raise ValueError(f"num_splits must be None (choose from the shape) or an int >= 1, got {num_splits!r}")
    if not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16 (tl.dot needs an inner dimension >= 16), got {block_n!r}")
    check_block_size(block_size, block_n)
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens)}
    if len(devices) > 1:
        raise ValueError(f"q, k_cache, v_cache, block_tables and context_lens must be on one device, got "
                         f"{sorted(map(str, devices))}")
    if check:
        check_block_tables(block_tables, context_lens, k_cache.shape[0], block_size)
    if num_splits is None:
        # the longest context the tables allow: an upper bound known without a device-to-host sync
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else None
        num_splits = choose_num_splits(b, h_kv, block_tables.shape[1] * block_size, sms, block_n)
    return _paged_decode_op(q, k_cache, v_cache, block_tables, context_lens, float(scale or 1.0 / math.sqrt(d)),
                            num_splits, block_n, num_warps, num_stages)


def _paged_decode_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, scale: float, num_splits: int, block_n: int, num_warps: int,
                         num_stages: int) -> torch.Tensor:
    """The kernel launches, arguments checked by paged_attention_decode. Registered below as the custom
    operator ``llmsys_lab::paged_decode``, so that ``torch.compile`` sees one opaque operator with a known
    output (its fake implementation) instead of tracing into Triton's launcher: a compiled step keeps the
    kernel and fuses what is around it."""
    b, h, d = q.shape
    _, block_size, h_kv, _ = k_cache.shape
    q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    block_tables = block_tables.contiguous()
    out = torch.empty_like(q)
    group = h // h_kv
    if num_splits > 1:
        part = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)    # (B, H, S, D)
        lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)        # (B, H, S)
    else:
        part = lse = out                                  # not read: the kernel writes `out` directly
    _paged_decode_kernel[(b, h_kv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, lse, scale, h,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, IEEE=q.dtype == torch.float32, NUM_SPLITS=num_splits, num_warps=num_warps,
        num_stages=num_stages)
    if num_splits > 1:
        _merge_splits_kernel[(b, h)](part, lse, out, h, out.stride(0), out.stride(1), NUM_SPLITS=num_splits,
                                     SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=d)
    return out


def _paged_decode_fake(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, block_n, num_warps,
                       num_stages):
    return torch.empty_like(q, memory_format=torch.contiguous_format)      # what the launch returns: (B, H, D)


if hasattr(torch.ops.llmsys_lab, "paged_decode"):       # this file executed again in one process: keep the op
    _paged_decode_op = torch.ops.llmsys_lab.paged_decode
else:
    _paged_decode_op = torch.library.custom_op("llmsys_lab::paged_decode", _paged_decode_launch, mutates_args=())
    _paged_decode_op.register_fake(_paged_decode_fake)


def merge_splits_reference(part: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The PyTorch spec of the merge kernel, as lesson 06 derives it: fold the S partials with
    merge_stats. part (B, H, S, D) outputs each normalised by its own sum, lse (B, H, S) = m + log l.
    A partial (o_s, lse_s) is the stats (m = lse_s, l = 1) with numerator o_s."""
    from llmsys_lab.flash import merge_stats

    m, l = lse[..., 0], torch.ones_like(lse[..., 0])
    num = part[..., 0, :].clone()
    for s in range(1, lse.shape[-1]):
        m_new, l = merge_stats(m, l, lse[..., s], torch.ones_like(l))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        num = (torch.exp(m - m_safe)[..., None] * num
               + torch.exp(lse[..., s] - m_safe)[..., None] * part[..., s, :])
        l = torch.where(torch.isnan(l), torch.zeros_like(l), l)
        m = m_new
    return num / torch.where(l > 0, l, torch.ones_like(l))[..., None]


def paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale=None) -> torch.Tensor:
    """The PyTorch spec: gather each sequence's K/V through its block table, then attend."""
    b, h, d = q.shape
    block_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    for i in range(b):
        n = int(context_lens[i])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        blocks = block_tables[i].long()[pos // block_size]
        k = k_cache[blocks, pos % block_size].float()               # (n, H_kv, D)
        v = v_cache[blocks, pos % block_size].float()
        k = k.repeat_interleave(h // h_kv, dim=1).transpose(0, 1)   # (H, n, D)
        v = v.repeat_interleave(h // h_kv, dim=1).transpose(0, 1)
        w = torch.softmax((q[i].float()[:, None, :] @ k.transpose(1, 2))[:, 0] * (scale or d ** -0.5), dim=-1)
        out[i] = (w[:, None, :] @ v)[:, 0].to(q.dtype)
    return out
