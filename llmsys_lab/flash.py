"""FlashAttention in plain PyTorch, for lesson 06: the ideas before the kernel.

* ``standard_attention``: Algorithm 0 of the lecture, three steps that each write an N x N matrix;
  ``attention_fp32_intermediates``: the same with fp32 intermediates (Golden et al.'s baseline).
* ``hbm_traffic``: the bytes each approach moves through GPU memory.
* ``block_stats``, ``merge_stats``, ``online_softmax``: the safe and the online softmax, the
  two-block merge exactly as derived in the lecture, then any number of blocks.
* ``flash_attention_torch``: the tiled algorithm with running max and sum, readable, with an
  optional trace of every (query block, key block) step for the tiling widget.
* ``peak_memory``: measured peak CUDA memory of a function.

The Triton kernel (``llmsys_lab.kernels.flash_attention``) computes the same thing, fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .attention import repeat_kv
from .validate import ConfigError


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---- Algorithm 0 --------------------------------------------------------------------------
def standard_attention(q, k, v, causal: bool = False, scale: float | None = None):
    """The lecture's Algorithm 0: S = QK^T, P = softmax(S), O = PV, each written out in full.

    q (B, H, M, d), k and v (B, H_kv, N, d) with H a multiple of H_kv (GQA). The conventions of
    the flash kernel: a causal mask aligned to the bottom right (query i sees keys j <= i + N - M),
    and a row that sees no key gives 0.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = (repeat_kv(t, q.shape[-3] // k.shape[-3]) for t in (k, v))
    s = (q @ k.transpose(-1, -2)) * scale                        # step 1: S (N x N) to HBM
    if causal:
        m, n = s.shape[-2:]
        s = s.masked_fill(torch.ones(m, n, dtype=torch.bool, device=s.device).tril(n - m).logical_not(),
                          float("-inf"))
    p = torch.softmax(s, dim=-1)                                  # step 2: read S, write P
    if causal and s.shape[-2] > s.shape[-1]:
        p = torch.nan_to_num(p, nan=0.0)                          # rows that see no key
    return p @ v                                                  # step 3: read P and V, write O


def attention_fp32_intermediates(q, k, v, causal: bool = False, scale: float | None = None):
    """Attention on low-precision inputs with S, the softmax and PV in fp32, the output rounded back.

    The "baseline attention" of Golden et al. (lecture 004): its intermediates are more precise than
    both the flash kernel's (P rounded to the input dtype for the PV matmul) and Algorithm 0 run in
    bf16 (S and P rounded to bf16 in HBM), which is why the paper finds flash deviating more.
    """
    return standard_attention(q.float(), k.float(), v.float(), causal=causal, scale=scale).to(q.dtype)


@dataclass
class Traffic:
    reads: float
    writes: float

    @property
    def total(self) -> float:
        return self.reads + self.writes


def hbm_traffic(n: int, d: int, bytes_per_el: int = 2, block_m: int | None = None) -> Traffic:
    """Bytes moved through HBM for one head of attention over N tokens of head dim d.

    Standard (block_m None): step 1 reads Q, K and writes S; step 2 reads S, writes P; step 3
    reads P, V and writes O. Flash (block_m given): Q read once, K and V read once per query
    block (N / block_m times), O written once; S and P never leave the chip.
    """
    nd, nn = n * d * bytes_per_el, n * n * bytes_per_el
    if block_m is None:
        return Traffic(reads=2 * nd + nn + nn + nd, writes=nn + nn + nd)
    passes = math.ceil(n / block_m)
    return Traffic(reads=nd + 2 * nd * passes, writes=nd)


# ---- softmax: safe, two blocks, online ------------------------------------------------------
def naive_softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x)
    return e / e.sum(-1, keepdim=True)


def block_stats(x: torch.Tensor):
    """(m(x), l(x)) of the lecture: the max and the sum of exp(x - m(x)) over the last dim."""
    m = x.max(-1).values
    return m, torch.exp(x - m[..., None]).sum(-1)


def merge_stats(m1, l1, m2, l2):
    """The lecture's two-block merge: m = max(m1, m2); l = e^(m1 - m) l1 + e^(m2 - m) l2."""
    m = torch.maximum(m1, m2)
    return m, torch.exp(m1 - m) * l1 + torch.exp(m2 - m) * l2


def online_softmax(x: torch.Tensor, block: int):
    """Softmax over the last dim, reading x one block at a time; returns (softmax, [(m, l) after each block])."""
    require(block > 0, f"block must be positive, got {block}")
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype)
    l = torch.zeros(x.shape[:-1], dtype=x.dtype)
    history = []
    for start in range(0, x.shape[-1], block):
        mb, lb = block_stats(x[..., start:start + block])
        m, l = merge_stats(m, l, mb, lb) if start else (mb, lb)
        history.append((m.clone(), l.clone()))
    return torch.exp(x - m[..., None]) / l[..., None], history


# ---- the tiled algorithm ----------------------------------------------------------------------
@dataclass
class TileStep:
    """One step of the tiled loop: query block i met key block j."""
    q_block: int
    k_block: int
    skipped: bool                       # causal: the whole tile is above the diagonal
    masked: bool                        # the tile crosses the diagonal or the end of the keys
    m: list = field(default_factory=list)    # running max per query row after this step
    l: list = field(default_factory=list)    # running sum per query row after this step


def flash_attention_torch(q, k, v, causal: bool = False, block_m: int = 64, block_n: int = 64,
                          scale: float | None = None, trace: list | None = None):
    """Tiled attention with the online softmax (FlashAttention-2's loop order), in PyTorch.

    q (..., M, d), k and v (..., N, d). Never forms the M x N matrix: only (block_m x block_n)
    tiles. Causal masks are bottom-right aligned, as the Triton kernel's. If ``trace`` is a list,
    one TileStep per (query block, key block) pair is appended (running stats of batch 0, head 0).
    Accumulates in float32 (as the kernel does) and returns the inputs' dtype.
    """
    require(block_m > 0 and block_n > 0, f"block sizes must be positive, got {block_m}, {block_n}")
    *lead, m_len, d = q.shape
    n_len = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    diag = n_len - m_len
    for i0 in range(0, m_len, block_m):
        qi = q[..., i0:i0 + block_m, :]
        rows = torch.arange(i0, i0 + qi.shape[-2], device=q.device)
        m = torch.full((*lead, qi.shape[-2]), float("-inf"), dtype=acc_dtype, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros((*lead, qi.shape[-2], d), dtype=acc_dtype, device=q.device)
        for j0 in range(0, n_len, block_n):
            cols = torch.arange(j0, min(j0 + block_n, n_len), device=q.device)
            skipped = causal and j0 > rows[-1].item() + diag          # no row of the block sees any key
            masked = causal and not skipped and cols[-1].item() > rows[0].item() + diag
            if not skipped:
                s = (qi @ k[..., j0:j0 + block_n, :].transpose(-1, -2)).to(acc_dtype) * scale
                if masked:
                    s = s.masked_fill(cols[None, :] > rows[:, None] + diag, float("-inf"))
                m_new = torch.maximum(m, s.max(-1).values)
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = torch.exp(s - m_safe[..., None])                  # this tile's exponentials
                alpha = torch.exp(m - m_safe)                         # rescale what came before
                l = alpha * l + p.sum(-1)
                acc = alpha[..., None] * acc + (p.to(v.dtype) @ v[..., j0:j0 + block_n, :]).to(acc_dtype)
                m = m_new
            if trace is not None:
                idx = (0,) * len(lead)
                trace.append(TileStep(i0 // block_m, j0 // block_n, skipped, masked,
                                      m[idx].tolist(), l[idx].tolist()))
        out[..., i0:i0 + block_m, :] = (acc / torch.where(l == 0, torch.ones_like(l), l)[..., None]).to(q.dtype)
    return out


# ---- measured memory --------------------------------------------------------------------------
def peak_memory(fn, *args) -> int:
    """Peak CUDA memory allocated while fn(*args) runs, above what was allocated before (bytes)."""
    require(torch.cuda.is_available(), "peak_memory measures CUDA memory: it needs a GPU")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak
