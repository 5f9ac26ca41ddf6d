"""Grouped GEMM for Mixture-of-Experts: one kernel launch multiplies every expert's slice of tokens.

After sorting the (token, expert) assignments by expert (``llmsys_lab.moe.sort_by_expert``), the rows
of x for expert g are one contiguous slice ``x[offsets[g]:offsets[g+1]]``, and expert g's weight is
``w[g]`` (nn.Linear layout: out x in). The "sorted" dispatch runs E separate matmuls; this kernel runs
them all in one launch. The host lays out a *tile schedule*: for every expert, one tile per BLOCK_M rows
(an expert with no tokens gets no tile), so each program knows its expert and first row without
searching. Program (t, n) computes rows of tile t times columns [n BLOCK_N, (n+1) BLOCK_N) of
``w[g]^T``, looping over the inner dimension in BLOCK_K steps; rows past the slice's end are masked.

Forward only (inference): training would need the two transposed grouped products for dx and dW.
"""
from __future__ import annotations

import torch
from llmsys_lab._runtime import require_triton
from llmsys_lab.kernels._triton import tl, triton  # Triton, or a stand-in that raises TritonUnavailable


@triton.jit
def _grouped_gemm_kernel(x_ptr, w_ptr, y_ptr, tile_group_ptr, tile_row_ptr, offsets_ptr,
                         N, K, stride_xm, stride_wg, stride_wn, stride_ym,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr):
    t = tl.program_id(0)                                   # which tile of rows (one expert's)
    pid_n = tl.program_id(1)                               # which block of output columns
    g = tl.load(tile_group_ptr + t)                        # the tile's expert
    row0 = tl.load(tile_row_ptr + t)                       # its first row in the sorted x
    row_end = tl.load(offsets_ptr + g + 1)                 # where the expert's slice ends
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + g.to(tl.int64) * stride_wg
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        a = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :],
                    mask=(rows[:, None] < row_end) & (kk[None, :] < K), other=0.0)            # (BM, BK)
        b = tl.load(w_base + cols[None, :] * stride_wn + kk[:, None],
                    mask=(cols[None, :] < N) & (kk[:, None] < K), other=0.0)                 # (BK, BN) = w[g]^T
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < row_end) & (cols[None, :] < N))


def tile_schedule(counts: torch.Tensor, block_m: int):
    """(tile -> expert, tile -> first row, offsets): ceil(count_g / block_m) tiles for expert g."""
    counts = counts.to(torch.int64)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64, device=counts.device)
    offsets[1:] = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m                                      # (E,)
    group = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    row = offsets[group] + (torch.arange(len(group), device=counts.device) - first_tile[group]) * block_m
    return group.to(torch.int32), row.to(torch.int32), offsets.to(torch.int32)


# Tile shapes (block_m, block_n, block_k, num_warps, num_stages). On a GPU: 128 x 128 output tiles with
# 64-wide K steps and 8 warps, the usual shape for bf16 tensor-core GEMMs on Hopper/Ampere (each
# loaded byte of x and w is reused 128 times; 3 stages of the two input tiles take 96 KB of shared
# memory). The first version's 64 x 64 x 32 tiles with 4 warps ran at ~100 TFLOP/s on an H200, a
# third of cuBLAS on the same slices (benchmarks/moe.py). On a CPU (the interpreter) small tiles
# keep the tests fast.
GPU_TILES = (128, 128, 64, 8, 3)
CPU_TILES = (64, 64, 32, 4, 2)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, block_m: int | None = None,
                 block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None) -> torch.Tensor:
    """y[rows of group g] = x[rows of group g] @ w[g]^T. x: (M, K) grouped by g, w: (G, N, K), counts: (G,).
    Tile sizes left as None take GPU_TILES on a GPU and CPU_TILES elsewhere."""
    require_triton("the Triton grouped-GEMM kernel")
    for name, t in (("x", x), ("w", w), ("counts", counts)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"x must be (rows, K) and w (groups, N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[2]:
        raise ValueError(f"x has K = {x.shape[1]} columns but w has K = {w.shape[2]}")
    if counts.shape != (w.shape[0],) or counts.dtype.is_floating_point:
        raise ValueError(f"counts must hold {w.shape[0]} integer row counts (one per group), "
                         f"got shape {tuple(counts.shape)} {counts.dtype}")
    if int(counts.sum()) != x.shape[0] or bool((counts < 0).any()):
        raise ValueError(f"counts must be >= 0 and sum to the {x.shape[0]} rows of x, got sum {int(counts.sum())}")
    if x.dtype != w.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x and w must share a float16, bfloat16 or float32 dtype, got {x.dtype} and {w.dtype}")
    from ..validate import ConfigError, is_int

    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        # tl.arange needs a power of two, tl.dot tiles of at least 16
        if v is not None and not (is_int(v) and v >= 16 and v & (v - 1) == 0):
            raise ConfigError(f"{name} must be a power of two >= 16, got {v!r}")
    for name, v in (("num_warps", num_warps), ("num_stages", num_stages)):
        if v is not None and not (is_int(v) and v >= 1):
            raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
    given = (block_m, block_n, block_k, num_warps, num_stages)
    block_m, block_n, block_k, num_warps, num_stages = (
        a if a is not None else d for a, d in zip(given, GPU_TILES if x.is_cuda else CPU_TILES))
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    group, row, offsets = tile_schedule(counts.to(x.device), block_m)
    if len(group) == 0:
        return y
    grid = (len(group), triton.cdiv(w.shape[1], block_n))
    _grouped_gemm_kernel[grid](x, w, y, group, row, offsets, w.shape[1], x.shape[1],
                               x.stride(0), w.stride(0), w.stride(1), y.stride(0),
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                               PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                               num_warps=num_warps, num_stages=num_stages)
    return y


def grouped_gemm_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The PyTorch spec: one matmul per group's slice."""
    outs = [xg @ w[g].T for g, xg in enumerate(x.split(counts.tolist()))]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


def grouped_swiglu_triton(xs: torch.Tensor, counts: torch.Tensor, gate_w, up_w, down_w, **blocks) -> torch.Tensor:
    """The experts' SwiGLU on rows grouped by expert, its three products through the grouped kernel."""
    h = torch.nn.functional.silu(grouped_gemm(xs, gate_w, counts, **blocks)) * grouped_gemm(xs, up_w, counts, **blocks)
    return grouped_gemm(h, down_w, counts, **blocks)
