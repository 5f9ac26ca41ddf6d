"""Assignment 06 (FlashAttention), probe side: the student's kernel launched by the assignment's own launcher
(written again here, so no launcher of the notebook's is trusted), and the PyTorch parts called with a watch on
the ops they run. No reference answers here."""
from __future__ import annotations

FORBIDDEN_OPS = ("scaled_dot_product_attention", "_scaled_dot_product", "_flash_attention", "_efficient_attention")


def _watch(fn, name, widest=None):
    """fn, run under a TorchDispatchMode that refuses PyTorch's fused attention ops and (widest=(S, block_n)) any
    matrix product producing all S scores of a row at once where a block of block_n keys was asked for."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    products = ("mm", "bmm", "matmul", "baddbmm", "addmm", "einsum")

    class Watch(TorchDispatchMode):
        hit = None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            op = func.overloadpacket.__name__
            if Watch.hit is None and any(f in op for f in FORBIDDEN_OPS):
                Watch.hit = f"{name} ran torch's {op}: write the attention yourself"
            if Watch.hit is None and widest is not None and op in products and isinstance(out, torch.Tensor):
                s, block = widest
                if s > block and out.dim() >= 1 and out.shape[-1] == s:
                    Watch.hit = (f"{name} computed a product with all {s} scores of a row at once (block_n={block}): "
                                 "compute one block of keys at a time")
            return out

    def run(*args, **kwargs):
        with Watch():
            value = fn(*args, **kwargs)
        if Watch.hit:
            raise RuntimeError(Watch.hit)
        return value
    return run


def drive_merge(fn, name, ns):
    """merge(m1, l1, o1, m2, l2, o2) -> (m, l, o) stacked as one flat float64 tensor."""
    import torch

    def run(*stats):
        got = _watch(fn, name)(*stats)
        if not isinstance(got, tuple) or len(got) != 3 or not all(isinstance(x, torch.Tensor) for x in got):
            raise TypeError(f"{name} must return a tuple (m, l, o) of tensors")
        shapes = (stats[0].shape, stats[1].shape, stats[2].shape)
        for what, x, shape in zip("mlo", got, shapes):
            if x.shape != shape:
                raise ValueError(f"{name}'s {what} has shape {tuple(x.shape)}, expected {tuple(shape)}")
        return torch.cat([x.detach().double().reshape(-1) for x in got])
    return run


def drive_online(fn, name, ns):
    """online_attention(q, k, v, block_n), refused if it forms all S scores of a row at once."""
    def run(q, k, v, block_n):
        return _watch(fn, name, widest=(k.shape[2], block_n))(q, k, v, block_n=block_n)
    return run


def drive_flash(kernel, name, ns):
    """The assignment's launcher, run here: the student's @triton.jit kernel on (B*H, T, D) contiguous tensors,
    a (cdiv(T, BLOCK_M), B*H) grid. Returns (out, lse) as one flat tensor (out first)."""
    import math

    import torch
    import triton

    import llmsys_lab
    from llmsys_lab.grading.probe import _student_triton_kernel

    kernel = _student_triton_kernel(kernel, name)
    device = llmsys_lab.default_device()

    def launch(q, k, v, causal, block_m, block_n):
        B, H, T, D = q.shape
        q, k, v = (x.to(device).contiguous() for x in (q, k, v))
        out = torch.full_like(q, float("nan"))
        lse = torch.full((B, H, T), float("nan"), dtype=torch.float32, device=device)
        grid = (triton.cdiv(T, block_m), B * H)
        kernel[grid](q, k, v, out, lse, T, 1.0 / math.sqrt(D), CAUSAL=bool(causal), D=D, BLOCK_M=int(block_m),
                     BLOCK_N=int(block_n))
        return torch.cat([out.float().cpu().reshape(-1), lse.cpu().reshape(-1)])
    return launch
