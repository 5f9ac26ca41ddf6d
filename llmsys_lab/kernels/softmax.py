"""Row-wise safe softmax in Triton: the smallest kernel in the kit.

It is the first step towards FlashAttention (lesson 06): each program loads one row,
subtracts the row max (so exp never overflows), exponentiates, and divides by the sum.
The doctor runs it as a smoke test, which shows whether kernels run compiled on a GPU
or through the Triton interpreter on a CPU.
"""
from __future__ import annotations

import torch
from llmsys_lab._runtime import require_triton
from llmsys_lab.kernels._triton import tl, triton  # Triton, or a stand-in that raises TritonUnavailable


@triton.jit
def _softmax_kernel(out_ptr, in_ptr, in_row_stride, out_row_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)                       # one program per row
    cols = tl.arange(0, BLOCK)                   # BLOCK >= n_cols: the whole row in registers
    in_mask = cols < n_cols                      # the tail past n_cols is padding
    x = tl.load(in_ptr + row * in_row_stride + cols, mask=in_mask, other=-float("inf"))
    x = x.to(tl.float32)                         # accumulate in fp32 whatever the input dtype
    x = x - tl.max(x, axis=0)                    # safe softmax: the largest exponent is exp(0) = 1
    num = tl.exp(x)                              # padding: exp(-inf) = 0, so it adds nothing
    y = num / tl.sum(num, axis=0)
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=in_mask)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim of a 2-D tensor (fp16, bf16 or fp32)."""
    require_triton("the Triton softmax kernel")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, cols), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("x has 0 columns: softmax over an empty row is undefined")
    x = x.contiguous()
    out = torch.empty_like(x)
    block = triton.next_power_of_2(x.shape[1])
    _softmax_kernel[(x.shape[0],)](out, x, x.stride(0), out.stride(0), x.shape[1], BLOCK=block)
    return out


def softmax_reference(x: torch.Tensor) -> torch.Tensor:
    """The PyTorch spec the kernel is checked against."""
    return torch.softmax(x.float(), dim=-1).to(x.dtype)
