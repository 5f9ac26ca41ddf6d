"""The fused residual add + RMSNorm kernel: compiled on a GPU, through the Triton interpreter on a CPU.

Checked against its PyTorch spec and against the kit's RMSNorm module applied to x + residual (the
unfused code path a LLaMA block runs). The interpreter rounds fp32 -> bf16 by truncation (a GPU rounds
to nearest even), so on a CPU bf16 is checked to within one bf16 step; on a GPU it must match exactly
for the add and to rounding for the normalised output.
"""
import pytest
import torch

from llmsys_lab.kernels.fused_norm import (MAX_BLOCK, bytes_moved, fused_add_rmsnorm,
                                           fused_add_rmsnorm_reference)
from llmsys_lab.layers import RMSNorm

pytestmark = pytest.mark.interpreter          # on a CPU these kernels run in the Triton interpreter

GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# tolerance of the normalised output: fp32 1/sqrt and summation order; a half dtype's last bit
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make(shape, dtype, device, seed=0, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).to(device)
    r = torch.randn(shape, generator=g).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(weight_dtype or dtype).to(device)
    return x, r, w


def check_against_reference(x, r, w, eps=1e-6):
    normed, new_res = fused_add_rmsnorm(x, r, w, eps)
    ref_normed, ref_res = fused_add_rmsnorm_reference(x, r, w, eps)
    assert normed.dtype == ref_normed.dtype and new_res.dtype == ref_res.dtype
    assert normed.shape == x.shape and new_res.shape == x.shape
    tol = TOL[normed.dtype] if x.dtype != torch.bfloat16 else TOL[torch.bfloat16]
    if x.dtype == torch.bfloat16 and not x.is_cuda:         # interpreter: truncation instead of rounding
        torch.testing.assert_close(new_res, ref_res, atol=0, rtol=2 ** -7)
        tol = 2 * tol
    else:
        assert torch.equal(new_res, ref_res), "x + residual must be the same as PyTorch's add"
    torch.testing.assert_close(normed, ref_normed, atol=tol, rtol=tol)
    return normed, new_res


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (2, 3, 64), (4, 1000)])
def test_matches_reference(device, dtype, shape):
    check_against_reference(*make(shape, dtype, device, seed=shape[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else []))
def test_matches_the_kits_rmsnorm_module(device, dtype):
    """The unfused path of a LLaMA block: h = x + residual; RMSNorm(h) with the kit's module."""
    x, r, w = make((3, 7, 96), dtype, device, seed=1)
    norm = RMSNorm(96, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        h = x + r
        want = norm(h)
    normed, new_res = fused_add_rmsnorm(x, r, norm.weight.detach(), norm.eps)
    assert torch.equal(new_res, h)
    torch.testing.assert_close(normed, want, atol=TOL[dtype], rtol=TOL[dtype])


def test_reference_is_the_kits_rmsnorm_exactly():
    """The spec is the kit's module, bit for bit, including an fp32 weight on bf16 activations (fp32 out)."""
    for dtype, wdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                          (torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
        x, r, w = make((4, 48), dtype, "cpu", seed=2, weight_dtype=wdtype)
        norm = RMSNorm(48, eps=1e-5).to(wdtype)
        with torch.no_grad():
            norm.weight.copy_(w)
            normed, h = fused_add_rmsnorm_reference(x, r, w, 1e-5)
            assert torch.equal(h, x + r)
            assert torch.equal(normed, norm(x + r)) and normed.dtype == norm(x + r).dtype


def test_fp32_weight_on_half_activations_gives_fp32_like_the_module(device):
    x, r, w = make((3, 40), torch.float16, device, seed=3, weight_dtype=torch.float32)
    normed, new_res = check_against_reference(x, r, w)
    assert normed.dtype == torch.float32 and new_res.dtype == torch.float16


def test_strided_rows_and_eps(device):
    x, r, w = make((6, 80), torch.float32, device, seed=4)
    check_against_reference(x[::2, :40], r[1::2, 40:], w[:40], eps=0.5)   # rows strided, eps large enough to show


def test_rows_wider_than_one_block_take_the_chunked_path(device, monkeypatch):
    """A hidden size over MAX_BLOCK is done in chunks; shrink the block to test it at interpreter speed."""
    import llmsys_lab.kernels.fused_norm as fused

    monkeypatch.setattr(fused, "MAX_BLOCK", 16)
    check_against_reference(*make((3, 50), torch.float32, device, seed=5))   # 4 chunks, the last one ragged
    assert MAX_BLOCK >= 8192


def test_no_rows(device):
    x, r, w = make((0, 32), torch.float32, device)
    normed, new_res = fused_add_rmsnorm(x, r, w)
    assert normed.shape == new_res.shape == (0, 32)


def test_bytes_moved_is_two_reads_and_two_writes():
    assert bytes_moved(10, 64, torch.bfloat16) == 10 * 64 * 2 * 4 + 64 * 2
    assert bytes_moved(1, 8, torch.float16, torch.float32) == 8 * (3 * 2 + 4) + 8 * 4


@pytest.mark.parametrize("args,err,msg", [
    (((2, 8), (2, 9), (8,)), ValueError, r"residual must have x's shape \(2, 8\), got \(2, 9\)"),
    (((2, 8), (2, 8), (9,)), ValueError, r"weight must be \(hidden,\) = \(8,\), got \(9,\)"),
    (((2, 8), (2, 8), (2, 8)), ValueError, r"weight must be \(hidden,\) = \(8,\), got \(2, 8\)"),
    (((2, 0), (2, 0), (0,)), ValueError, "hidden size 0"),
    (((), (), (1,)), ValueError, "at least one dimension"),
])
def test_bad_shapes(args, err, msg):
    x, r, w = (torch.randn(s) for s in args)
    for fn in (fused_add_rmsnorm, fused_add_rmsnorm_reference):
        with pytest.raises(err, match=msg):
            fn(x, r, w)


def test_bad_dtypes_types_eps_and_devices():
    x, r, w = torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32, got torch.int32"):
        fused_add_rmsnorm(x.int(), r, w)
    with pytest.raises(TypeError, match="residual must have x's dtype torch.float32.*got torch.float16"):
        fused_add_rmsnorm(x, r.half(), w)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        fused_add_rmsnorm(x, r, [1.0] * 8)
    with pytest.raises(ValueError, match="eps must be a number >= 0, got -1"):
        fused_add_rmsnorm(x, r, w, eps=-1)
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        fused_add_rmsnorm(x, r, w, eps=float("nan"))
    meta = torch.ones(8, device="meta")
    with pytest.raises(ValueError, match=r"must be on one device, got \['cpu', 'meta'\]"):
        fused_add_rmsnorm(x, r, meta)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="a CPU tensor on a GPU machine: only a GPU machine compiles Triton")
def test_cpu_tensors_on_a_gpu_machine_are_refused():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="x is on cpu, but Triton compiles for the GPU"):
        fused_add_rmsnorm(x, x, torch.ones(8))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="LLM-sized rows compiled: too slow for the interpreter")
@pytest.mark.parametrize("hidden", [1024, 4096, 5120, 8192, 20000])
def test_llm_sized_rows_on_the_gpu(hidden):
    check_against_reference(*make((33, hidden), torch.bfloat16, "cuda", seed=hidden))


def test_without_triton_the_reference_runs_and_the_kernel_names_the_fix():
    """macOS / native Windows: the module imports, the PyTorch spec works, the kernel raises TritonUnavailable."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    blocker = Path(__file__).resolve().parent / "no_triton_site"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    code = """
import torch, llmsys_lab
from llmsys_lab._runtime import TritonUnavailable
from llmsys_lab.kernels.fused_norm import fused_add_rmsnorm, fused_add_rmsnorm_reference
x = torch.randn(2, 8)
print(llmsys_lab.triton_mode(), tuple(fused_add_rmsnorm_reference(x, x, torch.ones(8))[0].shape))
try:
    fused_add_rmsnorm(x, x, torch.ones(8))
except TritonUnavailable as err:
    print("TritonUnavailable", "pip install triton" in str(err))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["unavailable (2, 8)", "TritonUnavailable True"]
