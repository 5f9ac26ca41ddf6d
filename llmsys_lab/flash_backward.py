"""FlashAttention as a PyTorch ``autograd.Function`` (lesson 06): the forward saves O and L, the
backward recomputes P from L. The same equations as the Triton kernel's backward, tile by tile.

Forward (per query block i, over key blocks j): the online softmax of ``flash.flash_attention_torch``,
and at the end the log-sum-exp of every row, L_i = m_i + log(l_i). The M x N matrix P is never
kept: only O (M x d) and L (M numbers per head) are saved for the backward pass.

Backward, with D_i = rowsum(dO_i * O_i) (= rowsum(P_ij * dP_ij), computed once per row):

    S_ij  = Q_i K_j^T * scale            (recomputed)
    P_ij  = exp(S_ij - L_i)              (recomputed from L: no max, no sum needed again)
    dV_j += P_ij^T dO_i
    dP_ij = dO_i V_j^T
    dS_ij = P_ij * (dP_ij - D_i)         (the softmax's Jacobian, row by row)
    dQ_i += dS_ij K_j * scale
    dK_j += dS_ij^T Q_i * scale

Shapes: q (..., M, d), k and v (..., N, d) with the same leading dims (batch, heads); L has shape
(..., M), e.g. (batch, heads, queries). Causal masks are bottom-right aligned (query i sees keys
j <= i + N - M) and a row that sees no key gives O = 0, L = -inf and zero gradients, as the kernel.
Accumulates in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math

import torch

from .attention import repeat_kv
from .validate import ConfigError, ShapeError, check_int, check_same, check_tensor


def _check(q, k, v, block_m, block_n):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name)
        if t.dim() < 2:
            raise ShapeError(f"{name} must have at least 2 dims (..., tokens, head_dim), got shape {tuple(t.shape)}")
    check_same({"q": q, "k": k, "v": v}, "dtype")
    check_same({"q": q, "k": k, "v": v}, "device")
    if k.shape != v.shape:
        raise ShapeError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share the leading dims and head_dim "
                         "(repeat K/V heads first for GQA: flash_attention_autograd does)")
    check_int(block_m, "block_m", minimum=1)
    check_int(block_n, "block_n", minimum=1)


def _tile_mask(i0, rows, j0, cols, diag, device):
    """True where query row i0 + a may not see key j0 + b (causal, bottom-right aligned)."""
    r = torch.arange(i0, i0 + rows, device=device)
    c = torch.arange(j0, j0 + cols, device=device)
    return c[None, :] > r[:, None] + diag


def flash_forward_torch(q, k, v, causal: bool = False, scale: float | None = None,
                        block_m: int = 64, block_n: int = 64):
    """Tiled forward: returns (O, L), O in the inputs' dtype, L (..., M) in the accumulation dtype."""
    _check(q, k, v, block_m, block_n)
    *lead, m_len, d = q.shape
    n_len = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    diag = n_len - m_len
    out = torch.empty_like(q)
    lse = torch.empty((*lead, m_len), dtype=acc, device=q.device)
    for i0 in range(0, m_len, block_m):
        qi = q[..., i0:i0 + block_m, :].to(acc)
        rows = qi.shape[-2]
        m = torch.full((*lead, rows), float("-inf"), dtype=acc, device=q.device)
        l = torch.zeros_like(m)
        o = torch.zeros((*lead, rows, d), dtype=acc, device=q.device)
        for j0 in range(0, n_len, block_n):
            if causal and j0 > i0 + rows - 1 + diag:
                break                                               # this and later tiles: all masked
            kj, vj = k[..., j0:j0 + block_n, :].to(acc), v[..., j0:j0 + block_n, :].to(acc)
            s = qi @ kj.transpose(-1, -2) * scale
            if causal:
                s = s.masked_fill(_tile_mask(i0, rows, j0, kj.shape[-2], diag, q.device), float("-inf"))
            m_new = torch.maximum(m, s.max(-1).values)
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = alpha * l + p.sum(-1)
            o = alpha[..., None] * o + p @ vj
            m = m_new
        seen = l > 0
        out[..., i0:i0 + rows, :] = (o / torch.where(seen, l, torch.ones_like(l))[..., None]).to(q.dtype)
        lse[..., i0:i0 + rows] = torch.where(seen, m + torch.log(torch.where(seen, l, torch.ones_like(l))),
                                             torch.full_like(l, float("-inf")))
    return out, lse


def flash_backward_torch(q, k, v, o, lse, do, causal: bool = False, scale: float | None = None,
                         block_m: int = 64, block_n: int = 64):
    """Tiled backward from the saved O and L: returns (dQ, dK, dV) in the inputs' dtype."""
    _check(q, k, v, block_m, block_n)
    *lead, m_len, d = q.shape
    n_len = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    acc = lse.dtype
    diag = n_len - m_len
    delta = (do.to(acc) * o.to(acc)).sum(-1)                          # D_i = rowsum(dO * O)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for i0 in range(0, m_len, block_m):
        qi, doi = q[..., i0:i0 + block_m, :].to(acc), do[..., i0:i0 + block_m, :].to(acc)
        rows = qi.shape[-2]
        li, di = lse[..., i0:i0 + rows], delta[..., i0:i0 + rows]
        li_safe = torch.where(torch.isinf(li), torch.zeros_like(li), li)
        for j0 in range(0, n_len, block_n):
            if causal and j0 > i0 + rows - 1 + diag:
                break
            kj, vj = k[..., j0:j0 + block_n, :].to(acc), v[..., j0:j0 + block_n, :].to(acc)
            s = qi @ kj.transpose(-1, -2) * scale
            p = torch.exp(s - li_safe[..., None])                    # P recomputed from L
            hidden = torch.isinf(li)[..., None].expand_as(p)          # rows that see no key
            if causal:
                hidden = hidden | _tile_mask(i0, rows, j0, kj.shape[-2], diag, q.device)
            p = p.masked_fill(hidden, 0.0)
            dv[..., j0:j0 + block_n, :] += p.transpose(-1, -2) @ doi
            dp = doi @ vj.transpose(-1, -2)
            ds = p * (dp - di[..., None])
            dq[..., i0:i0 + rows, :] += ds @ kj * scale
            dk[..., j0:j0 + block_n, :] += ds.transpose(-1, -2) @ qi * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttentionTorch(torch.autograd.Function):
    """Saves (Q, K, V, O, L) in the forward pass; the backward recomputes P tile by tile from L."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_m, block_n):
        o, lse = flash_forward_torch(q, k, v, causal, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.config = (causal, scale, block_m, block_n)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if dlse is not None and bool((dlse != 0).any()):
            raise RuntimeError("FlashAttentionTorch returns L for inspection (and for the backward pass); "
                               "a loss that depends on L is not supported")
        dq, dk, dv = flash_backward_torch(q, k, v, o, lse, do, *ctx.config)
        return dq, dk, dv, None, None, None, None


def flash_attention_autograd(q, k, v, causal: bool = False, scale: float | None = None,
                             block_m: int = 64, block_n: int = 64, return_lse: bool = False):
    """Differentiable tiled attention. q (B, H, M, d), k and v (B, H_kv, N, d) (GQA: K/V heads are
    repeated before the function, autograd sums their gradients back). Returns O, or (O, L) with L of
    shape (B, H, M) if return_lse."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ConfigError(f"scale must be a finite number > 0 or None, got {scale!r}")
    if q.dim() == 4 and k.dim() == 4 and k.shape[1] != q.shape[1]:
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ShapeError(f"q has {q.shape[1]} heads, k {k.shape[1]}: K/V heads must divide the query heads")
        k, v = (repeat_kv(t, q.shape[1] // k.shape[1]) for t in (k, v))
    o, lse = FlashAttentionTorch.apply(q, k, v, causal, scale, block_m, block_n)
    return (o, lse) if return_lse else o
