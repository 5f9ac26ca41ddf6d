"""Residual add + RMSNorm fused into one Triton kernel: the pre-norm block's glue, in one pass.

A LLaMA block runs ``h = x + residual`` and then ``RMSNorm(h)`` twice per layer (before attention and
before the MLP). Both are elementwise or row reductions: no matmul, so their speed is set by the bytes
they move through HBM, not by FLOPs (lesson 06's operator classes). As separate PyTorch operators
(``llmsys_lab.layers.RMSNorm`` computes its statistics in fp32), a 2-byte (fp16/bf16) input takes nine
kernel launches: ``x + residual``, ``h.float()``, ``pow(2)``, ``mean``, ``+ eps``, ``rsqrt``, ``*``,
``.to(dtype)``, ``* weight``. Counted per element of the hidden vector, every intermediate going through
HBM (``benchmarks/fusion.py``'s EAGER_OPS; ``+ eps`` and ``rsqrt`` work on one number per row):

  add 2 + 2 read, 2 write = 6; float() 2 + 4 = 6; pow 4 + 4 = 8; mean 4; scale 4 + 4 = 8;
  .to(dtype) 4 + 2 = 6; * weight 2 + 2 = 4                                           -> 42 bytes

The fused kernel keeps one row in registers: it reads x and residual once, writes ``new_residual`` (the
next block needs it) and ``normed`` once: 2 reads + 2 writes = 8 bytes per element (``bytes_moved``), one
launch, about 5x less traffic (in fp32 the casts are no-ops: 7 launches, 40 bytes against 16, 2.5x).
Where the op is memory-bound (many rows), time follows bytes; with few rows the launches dominate.
``benchmarks/fusion.py`` measures it against eager and ``torch.compile`` (which fuses the same way).

Semantics are exactly the kit's (``llmsys_lab.layers.RMSNorm``): ``h = x + residual`` rounded to the
input dtype (that is what the residual stream stores), statistics in fp32 from the rounded ``h``,
eps inside the square root, the normalised row rounded to the input dtype *before* it is multiplied by
the weight, and the product in the promoted dtype of input and weight.
"""
from __future__ import annotations

import torch
from llmsys_lab._runtime import check_kernel_dtype, require_triton, triton_mode
from llmsys_lab.kernels._triton import tl, triton  # Triton, or a stand-in that raises TritonUnavailable

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The widest row kept whole in registers (one pass). Wider rows (no LLM has them: Llama-3-405B's hidden
# size is 16384) take the chunked path, which re-reads new_residual once for the second pass.
MAX_BLOCK = 16384


@triton.jit
def _fused_add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
                              stride_x, stride_r, stride_o, stride_n, n_cols, eps,
                              BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)              # one program per row (token)
    x_row = x_ptr + row * stride_x
    r_row = res_ptr + row * stride_r
    o_row = out_ptr + row * stride_o
    n_row = new_res_ptr + row * stride_n
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)                   # BLOCK >= n_cols: the whole row in registers
        mask = cols < n_cols                         # the tail past n_cols is padding (loads 0: adds 0 to sum h^2)
        x = tl.load(x_row + cols, mask=mask, other=0.0)
        r = tl.load(r_row + cols, mask=mask, other=0.0)
        # the residual stream is stored in the input dtype: round h as `x + residual` does in PyTorch,
        # and take the statistics from the rounded value, as the unfused RMSNorm(h) would
        h = (x.to(tl.float32) + r.to(tl.float32)).to(new_res_ptr.dtype.element_ty)
        tl.store(n_row + cols, h, mask=mask)         # write 1 of 2
        h = h.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)       # fp32 accumulation
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)     # weight: tiny, stays in L2
        y = (h * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32) * w    # round like .to(x.dtype), then * weight
        tl.store(o_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)   # write 2 of 2
    else:
        # a row too wide for registers: pass 1 adds, stores h and sums h^2 chunk by chunk; pass 2 reads h back
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0)
            r = tl.load(r_row + cols, mask=mask, other=0.0)
            h = (x.to(tl.float32) + r.to(tl.float32)).to(new_res_ptr.dtype.element_ty)
            tl.store(n_row + cols, h, mask=mask)
            h = h.to(tl.float32)
            acc += h * h
        inv_rms = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            h = tl.load(n_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            y = (h * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32) * w
            tl.store(o_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_inputs(x, residual, weight, eps) -> None:
    for name, t in (("x", x), ("residual", residual), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., hidden), got a 0-d tensor")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype} (the residual stream has one dtype), "
                        f"got {residual.dtype}")
    hidden = x.shape[-1]
    if hidden == 0:
        raise ValueError("x has hidden size 0: the RMS of an empty row is undefined")
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be (hidden,) = ({hidden},), got {tuple(weight.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    devices = {t.device for t in (x, residual, weight)}
    if len(devices) > 1:
        raise ValueError(f"x, residual and weight must be on one device, got {sorted(map(str, devices))}")


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) with new_residual = x + residual and normed = RMSNorm(new_residual) * weight.

    x, residual: (..., hidden), same shape and dtype (fp16, bf16 or fp32); weight: (hidden,). One Triton
    program per row reads x and residual once and writes both outputs once. `normed` has the dtype of
    ``weight * x`` (as the kit's RMSNorm); `new_residual` has x's dtype. Both are new contiguous tensors.
    """
    require_triton("the fused add + RMSNorm kernel")
    _check_inputs(x, residual, weight, eps)
    check_kernel_dtype(x, "fused_add_rmsnorm")       # bf16 refused below compute capability 8.0 (a T4)
    check_kernel_dtype(weight, "fused_add_rmsnorm")
    if not x.is_cuda and triton_mode() != "interpreter":
        raise ValueError(f"x is on {x.device}, but Triton compiles for the GPU here: move the tensors to CUDA "
                         "(or set TRITON_INTERPRET=1 before importing llmsys_lab to run the interpreter)")
    hidden = x.shape[-1]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    x2 = x.reshape(-1, hidden)                       # (rows, hidden): a view when x's rows are evenly strided
    r2 = residual.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    w = weight.contiguous()
    rows = x2.shape[0]
    normed = torch.empty(rows, hidden, dtype=out_dtype, device=x.device)
    new_residual = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    if rows:
        block = min(triton.next_power_of_2(hidden), MAX_BLOCK)
        num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
        _fused_add_rmsnorm_kernel[(rows,)](
            x2, r2, w, normed, new_residual, x2.stride(0), r2.stride(0), normed.stride(0),
            new_residual.stride(0), hidden, float(eps), BLOCK=block, ONE_PASS=block >= hidden,
            num_warps=num_warps)
    return normed.reshape(x.shape), new_residual.reshape(x.shape)


def fused_add_rmsnorm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch spec, written as the unfused operators: the add, then llmsys_lab.layers.RMSNorm's forward."""
    _check_inputs(x, residual, weight, eps)
    h = x + residual                                              # rounded to x's dtype: the residual stream
    h32 = h.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


def bytes_moved(rows: int, hidden: int, dtype: torch.dtype, weight_dtype: torch.dtype | None = None) -> int:
    """HBM bytes the fused kernel must move: read x and residual, write new_residual and normed (the
    weight, read by every row, is counted once: it stays in cache). The floor any implementation has."""
    e = torch.empty((), dtype=dtype).element_size()
    w = torch.empty((), dtype=weight_dtype or dtype).element_size()
    out = torch.empty((), dtype=torch.promote_types(dtype, weight_dtype or dtype)).element_size()
    return rows * hidden * (3 * e + out) + hidden * w
