"""FlashAttention in Triton: forward and backward, causal or not, GQA, any length, fp16/bf16/fp32.

The idea (lesson 06, lecture 004). Standard attention writes S = QK^T and P = softmax(S), both
N x N, to GPU memory (HBM) and reads them back. FlashAttention never materialises them:

* **Tiling.** One program owns a block of BLOCK_M query rows. It streams the keys and values
  through on-chip memory BLOCK_N rows at a time; S and P exist only for one (BLOCK_M x BLOCK_N)
  tile, in registers.
* **Online softmax.** Each row keeps a running max ``m`` and a running sum ``l`` of exponentials.
  When a new tile raises the max, what was accumulated so far is rescaled by exp(m_old - m_new):
  exactly the two-block merge derived in the lecture, applied once per tile.
* **Recomputation.** The forward saves only O and the log-sum-exp L = m + log(l) of every row.
  The backward recomputes each tile's probabilities as exp(S - L) instead of reading P.

Conventions
-----------
Layout (batch, heads, seq, head_dim), as ``torch.nn.functional.scaled_dot_product_attention``.
q has H heads, k and v have H_kv heads (H a multiple of H_kv: grouped-query attention; query
head h reads K/V head h // (H / H_kv)). The query and key lengths M and N may differ. With
``causal=True`` the mask is aligned to the **bottom right**: query i sees keys j <= i + (N - M),
so the last query sees every key (a chunk of new tokens attending to a cache). This is
``torch.nn.attention.bias.causal_lower_right``; it equals SDPA's ``is_causal=True`` when M == N.
A query row that sees no key at all (causal with M > N) gets output 0 and gradient 0, not NaN.

Exponentials use exp2 with the softmax scale folded into log2(e): exp(x) = exp2(x * log2 e);
the GPU's exp2 is one instruction, and the scale costs nothing extra.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from llmsys_lab._runtime import check_kernel_dtype, gpu_capability, require_triton
from llmsys_lab.kernels._triton import tl, triton  # Triton, or a stand-in that raises TritonUnavailable

# The same function in plain PyTorch (the full score matrix, the kernel's conventions): upcast the
# inputs to float64 for a reference, or keep their dtype for Algorithm 0 in that precision.
from llmsys_lab.flash import standard_attention as reference_attention  # noqa: E402,F401

LOG2E = 1.4426950408889634          # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453            # ln(2):  log(x) == log2(x) * LN2
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ============================================================================================
# Forward
# ============================================================================================
@triton.jit
def _load_rows(ptrs, rows, n_rows, d_ok, MASKED: tl.constexpr, D_MASK: tl.constexpr):
    """Load a (rows x head dim) tile. Masks cost instructions, so only a MASKED tile (one that may
    run past the last row) checks rows, and only a padded head dim (D_MASK) checks columns."""
    if MASKED:
        ok = rows[:, None] < n_rows
        if D_MASK:
            ok = ok & d_ok
        tile = tl.load(ptrs, mask=ok, other=0.0)
    elif D_MASK:
        tile = tl.load(ptrs, mask=d_ok, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, k_desc, v_desc, b, kvh, stride_kn, stride_vn,
               offs_m, offs_n, offs_d, lo, hi, n_ctx_k, diag, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, D_MASK: tl.constexpr,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Fold the K/V tiles [lo, hi) into (acc, l, m) with the online softmax.

    MASKED=False is the fast path for tiles every row of the block sees completely: no mask,
    no bounds checks. MASKED=True handles the causal diagonal and the ragged last tile.
    """
    if not USE_TMA:
        k_ptrs += lo * stride_kn
        v_ptrs += lo * stride_vn
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if USE_TMA:
            # Hopper's copy engine (TMA) moves the whole tile to shared memory asynchronously;
            # rows past the end of the keys (and columns past HEAD_DIM) arrive as zeros
            k = k_desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, D_PAD)
            v = v_desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, D_PAD)
        else:
            k = _load_rows(k_ptrs, cols, n_ctx_k, d_ok, MASKED, D_MASK)
            v = _load_rows(v_ptrs, cols, n_ctx_k, d_ok, MASKED, D_MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            # the key must exist; causal (bottom-right): row i sees key j iff j <= i + diag
            keep = cols[None, :] < n_ctx_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(keep, s, float("-inf"))
        # online softmax in log2 units: m is the running max of s * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if MASKED:
            # a row that has seen no key yet keeps m = -inf; subtract 0 instead so that
            # exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(s * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)                        # rescales the old partial sums
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
        if not USE_TMA:
            # (with descriptors no pointer tiles exist: they would cost registers in every iteration)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _query_block(n_heads, GROUP: tl.constexpr, REVERSE: tl.constexpr):
    """Which query block, batch, query head and K/V head this program owns (grid: query blocks x B*H)."""
    pid_m = tl.program_id(0)
    if REVERSE:
        # causal: the last query blocks have the most tiles; start them first so the
        # short ones fill the gaps at the end instead of leaving a long tail
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    h = bh % n_heads
    return pid_m, bh, bh // n_heads, h, h // GROUP


@triton.jit
def _key_tiles(start_m, n_ctx_q, n_ctx_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which key tiles the query block starting at start_m needs, and which of them need a mask.

    Returns (diag, full, hi): keys [0, full) are seen by every row of the block (no mask), keys
    [full, hi) cross the causal diagonal or the ragged end of the keys (masked); diag is the
    bottom-right alignment offset (row i sees key j iff j <= i + diag)."""
    diag = n_ctx_k - n_ctx_q
    if CAUSAL:
        # the block's first row sees keys < start_m + diag + 1: tiles wholly below that are unmasked
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + diag, n_ctx_k), 0)      # last row's horizon
        full = tl.maximum(tl.minimum(start_m + diag + 1, hi), 0)
    else:
        hi = n_ctx_k
        full = n_ctx_k
    # rounded down to whole tiles even when n_ctx_k is a multiple of BLOCK_N: measured on an H200,
    # the software pipeliner then schedules the forward loop better (8-10% faster at head dim 128)
    full = (full // BLOCK_N) * BLOCK_N
    return diag, full, hi


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, q_desc, k_desc, v_desc, o_desc, lse_ptr, qk_scale,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                n_heads, n_ctx_q, n_ctx_k,
                GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                REVERSE: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    pid_m, bh, b, h, kvh = _query_block(n_heads, GROUP, REVERSE)
    D_MASK: tl.constexpr = D_PAD != HEAD_DIM

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    q_ok = (offs_m[:, None] < n_ctx_q) & (offs_d[None, :] < HEAD_DIM)
    if USE_TMA:
        # the descriptors (built once on the host) cover the whole (batch, heads, seq, head_dim)
        # tensors; a tile is addressed by its (b, h, row, 0) corner, out-of-range rows read as 0
        q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, D_PAD)
    else:
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)
    if USE_TMA:
        k_ptrs = k_base                     # unused: tiles come through k_desc / v_desc
        v_ptrs = v_base
    else:
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)

    diag, full, hi = _key_tiles(start_m, n_ctx_q, n_ctx_k, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, k_desc, v_desc, b, kvh, stride_kn, stride_vn,
                               offs_m, offs_n, offs_d, 0, full, n_ctx_k, diag, qk_scale,
                               False, CAUSAL, BLOCK_N, D_MASK, HEAD_DIM, D_PAD, PRECISION, USE_TMA)
    # tiles crossing the diagonal (causal) or the ragged end of the keys: masked
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, k_desc, v_desc, b, kvh, stride_kn, stride_vn,
                               offs_m, offs_n, offs_d, full, hi, n_ctx_k, diag, qk_scale,
                               True, CAUSAL, BLOCK_N, D_MASK, HEAD_DIM, D_PAD, PRECISION, USE_TMA)

    # rows that saw no key: l = 0 -> output 0, and L = +inf so the backward's exp2(s - L) is 0
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    if USE_TMA:
        # a TMA store drops the rows and columns that fall outside the tensor
        o_desc.store([b, h, start_m, 0], out.to(o_desc.dtype).reshape(1, 1, BLOCK_M, D_PAD))
    else:
        o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=q_ok)
    tl.store(lse_ptr + bh.to(tl.int64) * n_ctx_q + offs_m, lse, mask=offs_m < n_ctx_q)


# ============================================================================================
# Backward
# ============================================================================================
@triton.jit
def _bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, stride_ob, stride_oh, stride_om,
                      stride_dob, stride_doh, stride_dom, n_heads, n_ctx_q,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id  (= sum_j P_ij dP_ij, the softmax backward's row term)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    ok = (offs_m[:, None] < n_ctx_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(do_ptr + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * n_ctx_q + offs_m, delta, mask=offs_m < n_ctx_q)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qm, stride_dom,
                    offs_m, offs_n, offs_d, lo, hi, n_ctx_q, diag, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, D_MASK: tl.constexpr,
                    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate one K/V block's dK, dV over the query tiles [lo, hi), working transposed:
    sT = K Q^T is (BLOCK_N, BLOCK_M), so the sums over queries are plain tile matmuls."""
    q_ptrs += lo * stride_qm
    do_ptrs += lo * stride_dom
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(q_ptrs, rows, n_ctx_q, d_ok, MASKED, D_MASK)
        do = _load_rows(do_ptrs, rows, n_ctx_q, d_ok, MASKED, D_MASK)
        if MASKED:
            # rows past the end get L = +inf: their recomputed probabilities are 0
            lse = tl.load(lse_ptr + rows, mask=rows < n_ctx_q, other=float("inf"))
            delta = tl.load(delta_ptr + rows, mask=rows < n_ctx_q, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])         # recomputed P^T, from the saved L
        if MASKED and CAUSAL:
            pT = tl.where(offs_n[:, None] <= rows[None, :] + diag, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)     # dV += P^T dO
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)             # (dO V^T)^T
        dsT = pT * (dpT - delta[None, :])                        # softmax backward
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)      # dK += dS^T Q
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, qk_scale, sm_scale,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                     n_heads, n_kv_heads, n_ctx_q, n_ctx_k,
                     GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, PRECISION: tl.constexpr):
    """One program: one block of BLOCK_N keys of one K/V head; loops over every query that
    sees them, in every query head of its group (GQA), so dK and dV need no atomics."""
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // n_kv_heads
    kvh = bkv % n_kv_heads
    D_MASK: tl.constexpr = D_PAD != HEAD_DIM
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    kv_ok = (offs_n[:, None] < n_ctx_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)

    diag = n_ctx_k - n_ctx_q
    if CAUSAL:
        # query i sees key j iff i >= j - diag: queries before start_n - diag see none of this block,
        # queries from start_n + BLOCK_N - 1 - diag on see all of it
        lo = tl.maximum(start_n - diag, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), n_ctx_q)
        mid = tl.minimum(((mid + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, ((n_ctx_q + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
        mid = tl.maximum(mid, lo)
    else:
        lo = 0
        mid = 0
    if EVEN_M:
        full_hi = n_ctx_q
    else:
        full_hi = (n_ctx_q // BLOCK_M) * BLOCK_M
    full_hi = tl.maximum(full_hi, mid)
    end = ((n_ctx_q + BLOCK_M - 1) // BLOCK_M) * BLOCK_M

    for g in range(GROUP):
        h = kvh * GROUP + g
        bh = b * n_heads + h
        q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh \
            + offs_m[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = do_ptr + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh \
            + offs_m[:, None] * stride_dom + offs_d[None, :]
        lse_row = lse_ptr + bh.to(tl.int64) * n_ctx_q
        delta_row = delta_ptr + bh.to(tl.int64) * n_ctx_q
        # the diagonal tiles (causal): masked
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_row, delta_row, stride_qm, stride_dom,
                                 offs_m, offs_n, offs_d, lo, mid, n_ctx_q, diag, qk_scale,
                                 True, CAUSAL, BLOCK_M, D_MASK, HEAD_DIM, PRECISION)
        # tiles every query of which sees the whole key block: unmasked fast path
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_row, delta_row, stride_qm, stride_dom,
                                 offs_m, offs_n, offs_d, mid, full_hi, n_ctx_q, diag, qk_scale,
                                 False, CAUSAL, BLOCK_M, D_MASK, HEAD_DIM, PRECISION)
        # the ragged last query tile
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_row, delta_row, stride_qm, stride_dom,
                                 offs_m, offs_n, offs_d, full_hi, end, n_ctx_q, diag, qk_scale,
                                 True, CAUSAL, BLOCK_M, D_MASK, HEAD_DIM, PRECISION)

    dk = dk * sm_scale                              # S = scale * Q K^T, so dK = scale * dS^T Q
    tl.store(dk_ptr + b.to(tl.int64) * stride_dkb + kvh.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptr + b.to(tl.int64) * stride_dvb + kvh.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
                  offs_m, offs_n, offs_d, lo, hi, n_ctx_k, diag, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, D_MASK: tl.constexpr,
                  HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    k_ptrs += lo * stride_kn
    v_ptrs += lo * stride_vn
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_ptrs, cols, n_ctx_k, d_ok, MASKED, D_MASK)
        v = _load_rows(v_ptrs, cols, n_ctx_k, d_ok, MASKED, D_MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            keep = cols[None, :] < n_ctx_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(keep, p, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)       # dQ += dS K
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dqb, stride_dqh, stride_dqm,
                   n_heads, n_ctx_q, n_ctx_k,
                   GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   REVERSE: tl.constexpr, PRECISION: tl.constexpr):
    """One program: one block of BLOCK_M queries; loops over the keys it sees, like the forward."""
    pid_m, bh, b, h, kvh = _query_block(n_heads, GROUP, REVERSE)
    D_MASK: tl.constexpr = D_PAD != HEAD_DIM
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q_ok = (offs_m[:, None] < n_ctx_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)
    do = tl.load(do_ptr + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_ok, other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * n_ctx_q + offs_m, mask=offs_m < n_ctx_q, other=float("inf"))
    delta = tl.load(delta_ptr + bh.to(tl.int64) * n_ctx_q + offs_m, mask=offs_m < n_ctx_q, other=0.0)
    k_ptrs = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh \
        + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh \
        + offs_n[:, None] * stride_vn + offs_d[None, :]
    dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)

    diag, full, hi = _key_tiles(start_m, n_ctx_q, n_ctx_k, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
                       offs_m, offs_n, offs_d, 0, full, n_ctx_k, diag, qk_scale,
                       False, CAUSAL, BLOCK_N, D_MASK, HEAD_DIM, PRECISION)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
                       offs_m, offs_n, offs_d, full, hi, n_ctx_k, diag, qk_scale,
                       True, CAUSAL, BLOCK_N, D_MASK, HEAD_DIM, PRECISION)
    dq = dq * sm_scale
    tl.store(dq_ptr + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=q_ok)


# ============================================================================================
# Launch configuration
# ============================================================================================
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel (see benchmarks/flash_attention.py --tune)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Chosen by `benchmarks/flash_attention.py --tune` on an H200 (bf16); keyed by (padded head dim, causal).
def _table(by_dim: dict) -> dict:
    return {(d, causal): cfg for d, cfg in by_dim.items() for causal in (False, True)}


FWD_CONFIGS = _table({16: KernelConfig(128, 64, 4, 3), 32: KernelConfig(128, 64, 4, 3),
                      64: KernelConfig(128, 64, 8, 3), 128: KernelConfig(128, 128, 8, 3),
                      256: KernelConfig(64, 32, 4, 2)})
FWD_CONFIGS[(64, True)] = KernelConfig(128, 64, 8, 4)
# Causal attention over short sequences (up to SHORT_SEQ queries): few key tiles per query block and
# a large share of them on the masked diagonal; small tiles keep the GPU busy and waste less.
SHORT_SEQ = 2048
SHORT_FWD_CONFIGS = {(64, True): KernelConfig(64, 64, 4, 3), (128, True): KernelConfig(64, 64, 4, 3)}
DKDV_CONFIGS = _table({16: KernelConfig(64, 64, 4, 3), 32: KernelConfig(64, 64, 4, 3),
                       64: KernelConfig(64, 64, 4, 3), 128: KernelConfig(32, 64, 4, 3),
                       256: KernelConfig(32, 64, 8, 1)})
DKDV_CONFIGS[(128, True)] = KernelConfig(64, 128, 8, 3)
DQ_CONFIGS = _table({16: KernelConfig(128, 64, 4, 3), 32: KernelConfig(128, 64, 4, 3),
                     64: KernelConfig(128, 64, 8, 3), 128: KernelConfig(128, 64, 8, 3),
                     256: KernelConfig(64, 32, 8, 1)})
DQ_CONFIGS[(64, True)] = KernelConfig(64, 64, 4, 3)
# The interpreter runs one Python step per (program x tile): few, large-ish tiles are fastest,
# and pipelining/warps mean nothing there.
INTERPRETER_CONFIG = KernelConfig(32, 32, 4, 1)


def _config(table: dict, d_pad: int, causal: bool, dtype: torch.dtype,
            override: KernelConfig | None) -> KernelConfig:
    if override is not None:
        return override
    if _interpreting():
        return INTERPRETER_CONFIG
    cfg = table[(d_pad, bool(causal))]
    if dtype == torch.float32 and d_pad >= 128:
        # fp32 tiles are twice the bytes: halve the key tile to stay within shared memory
        cfg = KernelConfig(cfg.block_m, max(16, cfg.block_n // 2), cfg.num_warps, max(1, cfg.num_stages - 1))
    return cfg


# ============================================================================================
# Python API
# ============================================================================================
def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; flash_attention supports float16, bfloat16 and float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    bq, hq, m, d = q.shape
    bk, hk, n, dk = k.shape
    if bq != bk:
        raise ValueError(f"q has batch {bq} but k/v have batch {bk}")
    if d != dk:
        raise ValueError(f"q has head_dim {d} but k/v have head_dim {dk}")
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} is out of range: the kernel supports {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    if hk == 0 or hq % hk:
        raise ValueError(f"q has {hq} heads, k/v have {hk}: the query heads must be a multiple of the K/V heads (GQA)")
    if m == 0 or n == 0 or bq == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_kernel_dtype(q, "flash_attention")
    if q.device.type == "cpu" and not _interpreting():
        raise ValueError("q, k, v are CPU tensors but Triton is compiling for the GPU: "
                         "move them to cuda, or set TRITON_INTERPRET=1 before importing the kernel")


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    """The kernels index (b, h, s) with any strides but need head_dim contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_forward(q, k, v, causal: bool = False, scale: float | None = None, config: KernelConfig | None = None):
    """Forward only: returns (O, L) where L (batch, heads, M) is the natural log-sum-exp of each row
    (-inf for a row that sees no key)."""
    o, lse2 = _forward(q, k, v, causal, scale, config)
    return o, torch.where(torch.isinf(lse2), float("-inf"), lse2 * LN2)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products; tl.dot's default would round them to TF32 on GPUs
    return "ieee" if dtype == torch.float32 else "tf32"


def _can_use_tma(*tensors: torch.Tensor) -> bool:
    """Hopper or newer, compiled (not interpreted), and every tensor 16-byte aligned in its base and
    in every stride but the last, as the copy engine (TMA) requires."""
    if _interpreting() or tensors[0].device.type != "cuda" or os.environ.get("LLMSYS_FLASH_TMA", "1") == "0":
        return False
    if gpu_capability(tensors[0].device)[0] < 9:     # (LLMSYS_FORCE_ARCH=sm75/sm80 forces the older path)
        return False
    es = tensors[0].element_size()
    return all(t.data_ptr() % 16 == 0 and all((st * es) % 16 == 0 for st in t.stride()[:-1]) for t in tensors)


def _descriptor(t: torch.Tensor, rows: int, d_pad: int):
    """A TMA descriptor for a whole (batch, heads, seq, head_dim) tensor, built on the host once per
    call and passed by value: programs then load (rows x d_pad) tiles with no address arithmetic.
    Tiles may overhang the tensor (a ragged last block, a padded head dim): those parts read as
    zeros and are not written."""
    from triton.tools.tensor_descriptor import TensorDescriptor  # only reached with Triton, on Hopper

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, d_pad])


def _forward(q, k, v, causal, scale, config=None, tma=None):
    require_triton("the Triton FlashAttention kernel")
    _check_inputs(q, k, v)
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    b, h, m, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    d_pad = max(16, triton.next_power_of_2(d))
    table = SHORT_FWD_CONFIGS if m <= SHORT_SEQ and (d_pad, bool(causal)) in SHORT_FWD_CONFIGS else FWD_CONFIGS
    cfg = _config(table, d_pad, causal, q.dtype, config)
    precision = _precision(q.dtype)
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, m), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg.block_m), b * h)
    use_tma = _can_use_tma(q, k, v, o) if tma is None else tma
    descs = ((_descriptor(q, cfg.block_m, d_pad), _descriptor(k, cfg.block_n, d_pad),
              _descriptor(v, cfg.block_n, d_pad), _descriptor(o, cfg.block_m, d_pad)) if use_tma
             else (None, None, None, None))
    _fwd_kernel[grid](q, k, v, o, *descs, lse, scale * LOG2E,
                      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                      h, m, n,
                      GROUP=h // hk, CAUSAL=bool(causal), HEAD_DIM=d, D_PAD=d_pad,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      REVERSE=bool(causal), PRECISION=precision, USE_TMA=use_tma,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, lse


def _backward(do, q, k, v, o, lse, causal, scale, configs=(None, None)):
    require_triton("the Triton FlashAttention kernel")
    do = _rowmajor(do)
    b, h, m, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    d_pad = max(16, triton.next_power_of_2(d))
    precision = _precision(q.dtype)
    delta = torch.empty_like(lse)
    block = 64 if not _interpreting() else 32
    _bwd_delta_kernel[(triton.cdiv(m, block), b * h)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        h, m, HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    qk_scale = scale * LOG2E
    c = _config(DKDV_CONFIGS, d_pad, causal, q.dtype, configs[0])
    _bwd_dkdv_kernel[(triton.cdiv(n, c.block_n), b * hk)](
        q, k, v, do, lse, delta, dk, dv, qk_scale, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        h, hk, m, n, GROUP=h // hk, CAUSAL=bool(causal), HEAD_DIM=d, D_PAD=d_pad,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, EVEN_M=(m % c.block_m == 0), PRECISION=precision,
        num_warps=c.num_warps, num_stages=c.num_stages)
    c = _config(DQ_CONFIGS, d_pad, causal, q.dtype, configs[1])
    _bwd_dq_kernel[(triton.cdiv(m, c.block_m), b * h)](
        q, k, v, do, lse, delta, dq, qk_scale, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        h, m, n, GROUP=h // hk, CAUSAL=bool(causal), HEAD_DIM=d, D_PAD=d_pad,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, REVERSE=bool(causal),
        PRECISION=precision, num_warps=c.num_warps, num_stages=c.num_stages)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """autograd wrapper: saves Q, K, V, O and the log-sum-exp; the backward recomputes P tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = _forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(Q K^T * scale [+ causal mask]) V, differentiable in q, k and v.

    q (B, H, M, D), k and v (B, H_kv, N, D) with H % H_kv == 0; fp16, bf16 or fp32; 16 <= D <= 256.
    ``scale`` defaults to 1/sqrt(D). Causal masks are bottom-right aligned (see the module docstring).
    """
    return FlashAttention.apply(q, k, v, bool(causal), scale)


def attention_flops(batch: int, heads: int, m: int, n: int, head_dim: int, causal: bool = False,
                    backward: bool = False) -> float:
    """The usual convention: 4 B H M N D for the two matmuls (halved when causal, M == N), x2.5 backward."""
    flops = 4.0 * batch * heads * m * n * head_dim
    if causal:
        flops *= 0.5
    return flops * (2.5 if backward else 1.0)
