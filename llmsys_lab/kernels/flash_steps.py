"""Lesson 06 builds the FlashAttention forward kernel in four steps; these are the steps.

Each kernel is one query block (BLOCK_M rows) of one (batch, head) per program, fp32 on CPU
(the interpreter) or any float dtype on a GPU. Each step adds one idea to the previous one:

1. ``step1_one_block``: all N keys fit in one tile: load Q, K, V, softmax the (BLOCK_M x N) scores.
2. ``step2_loop``: loop over K/V tiles with a running max m and running sum l (online softmax).
3. ``step3_causal``: a causal mask on the tile that crosses the diagonal, and *no work at all*
   for tiles above it (they are skipped, not masked: half the FLOPs).
4. ``step4_ragged``: sequence lengths that are not multiples of the tile: masked loads and
   masked scores on the last tile.

``llmsys_lab/kernels/flash_attention.py`` is step 4 made fast (exp2, unmasked fast path, tensor-memory
loads on Hopper) plus GQA, differing query/key lengths and the backward pass.
"""
from __future__ import annotations

import math

import torch
from llmsys_lab._runtime import require_triton
from llmsys_lab.kernels._triton import tl, triton  # Triton, or a stand-in that raises TritonUnavailable


@triton.jit
def step1_one_block(q_ptr, k_ptr, v_ptr, o_ptr, scale, N: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    bh, pid = tl.program_id(1), tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, N)
    d = tl.arange(0, D)
    base = bh * N * D                                   # q, k, v, o are contiguous (B*H, N, D)
    q = tl.load(q_ptr + base + rows[:, None] * D + d[None, :])
    k = tl.load(k_ptr + base + cols[:, None] * D + d[None, :])
    v = tl.load(v_ptr + base + cols[:, None] * D + d[None, :])
    s = tl.dot(q, tl.trans(k)) * scale                  # (BLOCK_M, N): the whole row of scores
    p = tl.exp(s - tl.max(s, 1)[:, None])               # safe softmax: subtract the row max
    p = p / tl.sum(p, 1)[:, None]
    tl.store(o_ptr + base + rows[:, None] * D + d[None, :], tl.dot(p, v))


@triton.jit
def step2_loop(q_ptr, k_ptr, v_ptr, o_ptr, scale, N: tl.constexpr, D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, pid = tl.program_id(1), tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    base = bh * N * D
    q = tl.load(q_ptr + base + rows[:, None] * D + d[None, :])
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of each row
    l = tl.zeros((BLOCK_M,), tl.float32)                # running sum of exp(s - m)
    acc = tl.zeros((BLOCK_M, D), tl.float32)            # running, unnormalised output
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + base + cols[:, None] * D + d[None, :])
        v = tl.load(v_ptr + base + cols[:, None] * D + d[None, :])
        s = tl.dot(q, tl.trans(k)) * scale
        m_new = tl.maximum(m, tl.max(s, 1))             # the lecture's m(x) = max(m(x1), m(x2))
        alpha = tl.exp(m - m_new)                       # e^(m_old - m_new): rescales the past
        p = tl.exp(s - m_new[:, None])
        l = alpha * l + tl.sum(p, 1)                    # l(x) = e^(m1-m) l(x1) + e^(m2-m) l(x2)
        acc = alpha[:, None] * acc + tl.dot(p.to(v.dtype), v)
        m = m_new
    tl.store(o_ptr + base + rows[:, None] * D + d[None, :], acc / l[:, None])


@triton.jit
def step3_causal(q_ptr, k_ptr, v_ptr, o_ptr, tiles_ptr, scale, N: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, pid = tl.program_id(1), tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    base = bh * N * D
    q = tl.load(q_ptr + base + rows[:, None] * D + d[None, :])
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    # the block's last row sees keys 0 .. (pid+1)*BLOCK_M - 1: later tiles are never loaded
    hi = (pid + 1) * BLOCK_M
    count = 0
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + base + cols[:, None] * D + d[None, :])
        v = tl.load(v_ptr + base + cols[:, None] * D + d[None, :])
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))   # row i sees keys j <= i
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = alpha * l + tl.sum(p, 1)
        acc = alpha[:, None] * acc + tl.dot(p.to(v.dtype), v)
        m = m_new
        count += 1
    tl.store(o_ptr + base + rows[:, None] * D + d[None, :], acc / l[:, None])
    tl.store(tiles_ptr + bh * tl.num_programs(0) + pid, count)          # tiles this program computed


@triton.jit
def step4_ragged(q_ptr, k_ptr, v_ptr, o_ptr, scale, n_ctx, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    bh, pid = tl.program_id(1), tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    base = bh * n_ctx * D
    row_ok = rows < n_ctx                               # the last query block may be partial
    q = tl.load(q_ptr + base + rows[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    hi = tl.minimum((pid + 1) * BLOCK_M, n_ctx) if CAUSAL else n_ctx
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_ctx                           # ... and so may the last key tile
        k = tl.load(k_ptr + base + cols[:, None] * D + d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + base + cols[:, None] * D + d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))            # a missing key gets probability 0
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = alpha * l + tl.sum(p, 1)
        acc = alpha[:, None] * acc + tl.dot(p.to(v.dtype), v)
        m = m_new
    tl.store(o_ptr + base + rows[:, None] * D + d[None, :], acc / l[:, None], mask=row_ok[:, None])


def run_step(step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
             block_m: int = 32, block_n: int = 32):
    """Launch step 1..4 on contiguous (B, H, N, D) fp32 tensors; returns O (and, for step 3, the
    number of K/V tiles each program computed)."""
    require_triton("the FlashAttention step kernels")
    if step not in (1, 2, 3, 4):
        raise ValueError(f"step must be 1, 2, 3 or 4, got {step}")
    if not (q.shape == k.shape == v.shape) or q.dim() != 4:
        raise ValueError(f"the step kernels take q, k, v of one shape (B, H, N, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, n, d = q.shape
    if step < 4 and n % block_m or step < 4 and n % block_n:
        raise ValueError(f"steps 1-3 need N ({n}) to be a multiple of the tiles ({block_m}, {block_n}): "
                         "step 4 lifts that")
    if step == 1 and n > 128:
        raise ValueError(f"step 1 holds all N = {n} keys in one tile: keep N <= 128")
    q, k, v = (t.contiguous() for t in (q, k, v))
    o = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d)
    grid = (triton.cdiv(n, block_m), b * h)
    if step == 1:
        step1_one_block[grid](q, k, v, o, scale, N=n, D=d, BLOCK_M=block_m)
    elif step == 2:
        step2_loop[grid](q, k, v, o, scale, N=n, D=d, BLOCK_M=block_m, BLOCK_N=block_n)
    elif step == 3:
        tiles = torch.zeros(b * h, grid[0], dtype=torch.int32, device=q.device)
        step3_causal[grid](q, k, v, o, tiles, scale, N=n, D=d, BLOCK_M=block_m, BLOCK_N=block_n)
        return o, tiles
    else:
        step4_ragged[grid](q, k, v, o, scale, n, D=d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal))
    return o


def kernel_source(kernel) -> str:
    """The Python source of a @triton.jit kernel (compiled or interpreted)."""
    import inspect

    return inspect.getsource(getattr(kernel, "fn", kernel))
