"""The Triton FlashAttention kernel (forward and backward) against a float64 reference.

Tolerance rule: the kernel's error against float64 attention may be at most 2x the error of
PyTorch's own attention (SDPA) computed in the same dtype, plus a floor of a few ulps of the
largest value (it matters only for fp32, where both errors are tiny). On CPU the kernels run in the Triton
interpreter at small shapes; on a GPU the same tests run compiled, at larger shapes, and bf16
is added (the interpreter's bf16 dot is not reliable).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from llmsys_lab.kernels.flash_attention import (KernelConfig, attention_flops, flash_attention, flash_forward,
                                                reference_attention)

pytestmark = pytest.mark.interpreter          # on a CPU these kernels run in the Triton interpreter

GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def make(device, dtype, b, h, h_kv, m, n, d, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, m, d, generator=g) * scale).to(device, dtype)
    k = (torch.randn(b, h_kv, n, d, generator=g) * scale).to(device, dtype)
    v = torch.randn(b, h_kv, n, d, generator=g).to(device, dtype)
    do = torch.randn(b, h, m, d, generator=g).to(device, dtype)
    return q, k, v, do


def causal_mask(m, n, device):
    """Bottom-right aligned: query i sees keys j <= i + (n - m)."""
    i = torch.arange(m, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return j <= i + (n - m)


def torch_same_dtype(q, k, v, causal):
    """PyTorch's own attention in the inputs' dtype: the yardstick for acceptable error."""
    mask = causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return torch.nan_to_num(out)        # SDPA gives NaN for rows that see no key; the kit gives 0


def grads(fn, q, k, v, do):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), do)]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_within_rule(q, k, v, do, causal):
    kit = grads(lambda a, b, c: flash_attention(a, b, c, causal), q, k, v, do)
    ref = grads(lambda a, b, c: reference_attention(a, b, c, causal),
                q.double(), k.double(), v.double(), do.double())
    yard = grads(lambda a, b, c: torch_same_dtype(a, b, c, causal), q, k, v, do)
    for name, x, r, y in zip(("O", "dQ", "dK", "dV"), kit, ref, yard):
        assert not torch.isnan(x).any(), f"{name} has NaN"
        floor = FLOOR[q.dtype] * max(1.0, r.abs().max().item())        # a few ulps of the largest value
        err, allowed = max_err(x, r), 2 * max_err(y, r) + floor
        assert err <= allowed, f"{name}: kernel error {err:.2e} > 2 x PyTorch's {max_err(y, r):.2e} + floor"


CASES_CPU = [  # b, h, h_kv, m, n, d
    (1, 2, 2, 64, 64, 32),      # plain
    (2, 4, 2, 48, 48, 16),      # GQA
    (1, 4, 1, 37, 37, 32),      # MQA, length not a multiple of the tile
    (1, 2, 2, 30, 75, 32),      # fewer queries than keys (a chunk against a cache)
    (1, 2, 1, 50, 20, 24),      # more queries than keys; head dim not a power of two
]
CASES_GPU = [
    (2, 8, 8, 1024, 1024, 64),
    (2, 8, 2, 1000, 1000, 128),     # GQA, ragged
    (1, 8, 2, 333, 1500, 96),       # chunk against a cache, head dim not a power of two
    (1, 2, 2, 512, 300, 256),       # the largest head dim; more queries than keys
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES_GPU if GPU else CASES_CPU, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_gradients_within_twice_pytorch_error(device, dtype, case, causal):
    q, k, v, do = make(device, dtype, *case)
    assert_within_rule(q, k, v, do, causal)


@pytest.mark.parametrize("seed", range(6))
def test_many_seeds_and_large_logits(device, seed):
    """Fresh inputs each time, scores up to ~+-60 (scale 3): the online softmax must not overflow."""
    dtype = torch.float16 if seed % 2 else torch.float32
    shape = (1, 2, 2, 45, 45, 32) if not GPU else (2, 4, 4, 777, 777, 64)
    q, k, v, do = make(device, dtype, *shape, seed=seed, scale=3.0)
    assert_within_rule(q, k, v, do, causal=bool(seed % 3 == 0))


def test_matches_sdpa_is_causal_when_lengths_equal(device):
    q, k, v, _ = make(device, torch.float32, 1, 2, 2, 40, 40, 32, seed=3)
    out = flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_rows_that_see_no_key_are_zero_with_zero_gradient(device):
    """Causal with more queries (40) than keys (10): the first 30 rows see nothing."""
    q, k, v, do = make(device, torch.float32, 1, 2, 2, 40, 10, 16, seed=4)
    out, dq, dk, dv = grads(lambda a, b, c: flash_attention(a, b, c, causal=True), q, k, v, do)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert torch.all(out[:, :, :30] == 0) and torch.all(dq[:, :, :30] == 0)
    assert out[:, :, 30:].abs().sum() > 0
    _, lse = flash_forward(q, k, v, causal=True)
    assert torch.all(lse[:, :, :30] == float("-inf")) and torch.isfinite(lse[:, :, 30:]).all()


def test_log_sum_exp_is_saved_exactly(device):
    q, k, v, _ = make(device, torch.float32, 1, 2, 2, 33, 50, 32, seed=5)
    _, lse = flash_forward(q, k, v, causal=False)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(32)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


def test_tensor_descriptor_path(device):
    """The forward's TMA path (used on Hopper GPUs) computes the same function; the interpreter runs it too."""
    from llmsys_lab.kernels.flash_attention import _forward
    q, k, v, _ = make(device, torch.float32, 1, 4, 2, 50, 70, 32, seed=9)
    for causal in (False, True):
        out, _ = _forward(q, k, v, causal, None, tma=True)
        assert max_err(out, reference_attention(q.double(), k.double(), v.double(), causal)) < 1e-5


def test_custom_scale_and_tile_config(device):
    q, k, v, _ = make(device, torch.float32, 1, 2, 2, 40, 40, 32, seed=6)
    out, _ = flash_forward(q, k, v, scale=0.3, config=KernelConfig(16, 16, 4, 1))
    ref = reference_attention(q.double(), k.double(), v.double(), scale=0.3)
    assert max_err(out, ref) < 1e-5


def test_non_contiguous_inputs(device):
    """Q/K/V as views of a (batch, seq, heads, dim) projection, and a head_dim stride != 1."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 40, 3, 4, 32, generator=g).to(device)          # (b, s, qkv, h, d)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))          # strided views
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, causal=True)
    ref = reference_attention(q.double(), k.double(), v.double(), causal=True)
    assert max_err(out, ref) < 1e-5
    qt = q.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)   # head_dim stride != 1
    assert qt.stride(-1) != 1
    assert max_err(flash_attention(qt, k, v, causal=True), ref) < 1e-5


def test_gradients_flow_through_strided_views(device):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 24, 3, 2, 16, generator=g).to(device).requires_grad_()
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    flash_attention(q, k, v).sum().backward()
    x2 = x.detach().double().requires_grad_()
    q2, k2, v2 = (x2[:, :, i].transpose(1, 2) for i in range(3))
    reference_attention(q2, k2, v2).sum().backward()
    assert max_err(x.grad, x2.grad) < 1e-5


def test_flop_convention():
    assert attention_flops(1, 1, 1024, 1024, 64) == 4 * 1024 * 1024 * 64
    assert attention_flops(2, 3, 128, 128, 64, causal=True, backward=True) == 2.5 * 0.5 * 4 * 2 * 3 * 128 * 128 * 64


@pytest.mark.parametrize("make_args,err,msg", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be 4-D \(batch, heads, seq, head_dim\), got shape \(8, 16, 16\)"),
    (lambda q, k, v: (q, k[:, :, :4], v), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: (q, k.half(), v.half()), TypeError, "must share one dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "float16, bfloat16 and float32"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "dtype torch.int32"),
    (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), ValueError, "head_dim 8 is out of range: the kernel supports 16..256"),
    (lambda q, k, v: (torch.zeros(1, 2, 8, 512), torch.zeros(1, 2, 8, 512), torch.zeros(1, 2, 8, 512)), ValueError,
     "head_dim 512 is out of range"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, "q has head_dim 16 but k/v have head_dim 8"),
    (lambda q, k, v: (q[:, :, :, :], k[:, :3].repeat(1, 1, 1, 1), v[:, :3]), ValueError, "multiple of the K/V heads"),
    (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "q has batch 1 but k/v have batch 2"),
    (lambda q, k, v: (q, k.to("meta"), v.to("meta")), ValueError, "must be on one device"),
    (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "empty input"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor, got ndarray"),
])
def test_bad_input_is_rejected_with_a_clear_message(make_args, err, msg):
    q = torch.randn(1, 8, 16, 16)
    k = torch.randn(1, 4, 16, 16)
    v = torch.randn(1, 4, 16, 16)
    with pytest.raises(err, match=msg):
        flash_attention(*make_args(q, k, v))
