"""Lesson 06's PyTorch FlashAttention autograd.Function: forward saving O and L, backward from L."""
import math

import pytest
import torch

from llmsys_lab.flash import standard_attention
from llmsys_lab.flash_backward import (FlashAttentionTorch, flash_attention_autograd, flash_backward_torch,
                                       flash_forward_torch)
from llmsys_lab.validate import ConfigError, ShapeError

# (M, N, block_m, block_n): blocks that do not divide the lengths; N > M; M > N (causal: rows that see no key)
CASES = [(32, 32, 16, 16), (37, 37, 16, 8), (20, 45, 8, 16), (45, 20, 16, 8)]


def make(b, h, m, n, d, dtype=torch.float32, seed=0, h_kv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, m, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, h_kv or h, n, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h_kv or h, n, d, generator=g, dtype=torch.float64).to(dtype)
    do = torch.randn(b, h, m, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, do


def reference(q, k, v, do, causal):
    """Algorithm 0 in float64 with autograd: O, L (log-sum-exp of the masked scores), dQ, dK, dV."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    o = standard_attention(q, k, v, causal=causal)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.double())
    kk = k.detach().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q.detach() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        m, n = s.shape[-2:]
        s = s.masked_fill(~torch.ones(m, n, dtype=torch.bool).tril(n - m), float("-inf"))
    return o.detach(), torch.logsumexp(s, -1), dq, dk, dv


def err(a, b):
    both_inf = torch.isinf(a.double()) & torch.isinf(b.double()) & (a.double().sign() == b.double().sign())
    return (a.double() - b.double()).masked_fill(both_inf, 0).abs().max().item()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_forward_lse_and_gradients_equal_the_reference_in_fp32(case, causal):
    m, n, bm, bn = case
    q, k, v, do = make(2, 3, m, n, 16)
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = flash_attention_autograd(q_, k_, v_, causal=causal, block_m=bm, block_n=bn, return_lse=True)
    dq, dk, dv = torch.autograd.grad(o, (q_, k_, v_), do)
    ro, rl, rdq, rdk, rdv = reference(q, k, v, do, causal)
    assert o.dtype == torch.float32 and lse.shape == (2, 3, m)
    assert err(o, ro) < 2e-6 and err(lse, rl) < 2e-6
    for mine, ref in ((dq, rdq), (dk, rdk), (dv, rdv)):
        assert err(mine, ref) < 2e-5
    if causal and m > n:                         # the first m - n rows see no key: O = 0, L = -inf, no gradient
        assert (o[..., : m - n, :] == 0).all() and torch.isneginf(lse[..., : m - n]).all()
        assert (dq[..., : m - n, :] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_in_float64(causal):
    q, k, v, _ = make(1, 1, 5, 7, 3, dtype=torch.float64)      # 5 and 7 rows in tiles of 2 and 3
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention_autograd(a, b, c, causal, block_m=2, block_n=3),
                                    (q, k, v))


def test_grouped_query_heads_sum_their_gradients():
    q, k, v, do = make(1, 4, 9, 9, 8, h_kv=2)
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
    o = flash_attention_autograd(q_, k_, v_, causal=True, block_m=4, block_n=4)
    grads = torch.autograd.grad(o, (q_, k_, v_), do)
    ro, _, *rgrads = reference(q, k, v, do, True)
    assert err(o, ro) < 2e-6 and all(err(a, b) < 2e-5 for a, b in zip(grads, rgrads))
    assert grads[1].shape == k.shape


def test_backward_uses_only_what_the_forward_saved():
    """The backward recomputes P from L: given O and L it needs no softmax statistics of its own."""
    q, k, v, do = make(1, 1, 12, 12, 8, dtype=torch.float64)
    o, lse = flash_forward_torch(q, k, v, causal=True, block_m=4, block_n=4)
    ro, rl, rdq, rdk, rdv = reference(q, k, v, do, True)
    assert err(o, ro) < 1e-12 and err(lse, rl) < 1e-12
    for mine, ref in zip(flash_backward_torch(q, k, v, o, lse, do, causal=True, block_m=5, block_n=3),
                         (rdq, rdk, rdv)):
        assert err(mine, ref) < 1e-12                           # any tiling of the backward: the same result


def test_a_loss_on_lse_is_refused():
    q, k, v, _ = make(1, 1, 4, 4, 4)
    q.requires_grad_()
    _, lse = FlashAttentionTorch.apply(q, k, v, False, None, 2, 2)
    with pytest.raises(RuntimeError, match="a loss that depends on L is not supported"):
        lse.sum().backward()


def test_bad_input_is_rejected_with_a_clear_message():
    q, k, v, _ = make(1, 2, 4, 4, 8)
    with pytest.raises(ConfigError, match="block_m must be an int >= 1"):
        flash_attention_autograd(q, k, v, block_m=0)
    with pytest.raises(ShapeError, match="k and v must have the same shape"):
        flash_attention_autograd(q, k, v[..., :3, :])
    with pytest.raises(TypeError, match="q, k and v must have the same dtype"):
        flash_attention_autograd(q, k.double(), v)
    with pytest.raises(ShapeError, match="K/V heads must divide the query heads"):
        flash_attention_autograd(torch.randn(1, 3, 4, 8), k, v)
    with pytest.raises(ConfigError, match="scale must be a finite number > 0"):
        flash_attention_autograd(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match="causal must be True or False"):
        flash_attention_autograd(q, k, v, causal="yes")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_the_triton_kernel_agrees_with_the_pytorch_function(causal):
    """The kernel's L and its forward and backward against this module (interpreter on a CPU)."""
    from llmsys_lab.kernels.flash_attention import flash_attention, flash_forward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, do = (t.to(device) for t in make(1, 2, 24, 40, 16, seed=3))
    o, lse = flash_forward(q, k, v, causal=causal)
    mo, ml = flash_forward_torch(q, k, v, causal=causal, block_m=16, block_n=16)
    assert err(o, mo) < 1e-5 and err(lse, ml) < 1e-5
    grads = []
    for fn in (lambda a, b, c: flash_attention(a, b, c, causal),
               lambda a, b, c: flash_attention_autograd(a, b, c, causal, block_m=16, block_n=16)):
        a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
        grads.append(torch.autograd.grad(fn(a, b, c), (a, b, c), do))
    for kernel, mine in zip(*grads):
        assert err(kernel, mine) < 1e-4
