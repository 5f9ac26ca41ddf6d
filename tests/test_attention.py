"""Attention: the lecture's decomposed and matrix forms, against PyTorch's SDPA."""
import pytest
import torch
import torch.nn.functional as F

from llmsys_lab.attention import (MultiHeadAttention, additive_mask, attention_decomposed,
                                  attention_matrix, causal_mask, repeat_kv,
                                  scaled_dot_product_attention)
from llmsys_lab.validate import ConfigError, ShapeError


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t_q,t_k", [(6, 6), (1, 9), (3, 7)])
def test_decomposed_equals_matrix_form(causal, t_q, t_k):
    g = torch.Generator().manual_seed(t_q * 10 + t_k)
    q, k, v = (torch.randn(n, 16, generator=g, dtype=torch.float64) for n in (t_q, t_k, t_k))
    torch.testing.assert_close(attention_decomposed(q, k, v, causal), attention_matrix(q, k, v, causal))


def test_matrix_form_equals_sdpa_single_head():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 10, 32, dtype=torch.float64).unbind(0)
    for causal in (False, True):
        ref = F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None], is_causal=causal)[0, 0]
        torch.testing.assert_close(attention_matrix(q, k, v, causal), ref)


def test_causal_mask_is_lower_triangle_and_bottom_right_aligned():
    assert torch.equal(causal_mask(4), torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    m = causal_mask(2, 5)  # two new queries at positions 3 and 4 of 5 keys
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]
    am = additive_mask(causal_mask(3))
    assert am[0, 1] == float("-inf") and am[1, 0] == 0


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_batched_attention_matches_sdpa_with_gqa(device, heads, kv_heads, causal):
    torch.manual_seed(heads + kv_heads)
    b, t, d = 2, 13, 16
    q = torch.randn(b, heads, t, d, device=device)
    k = torch.randn(b, kv_heads, t, d, device=device)
    v = torch.randn(b, kv_heads, t, d, device=device)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, causal=causal), ref,
                               atol=2e-5, rtol=2e-5)


def test_boolean_and_additive_masks_match_sdpa():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    allowed = torch.rand(5, 5) > 0.3
    allowed[:, 0] = True   # every row sees at least one key
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask=allowed), ref)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask=additive_mask(allowed)), ref)


def test_fully_masked_row_gives_zeros_not_nan():
    q, k, v = torch.randn(3, 1, 1, 3, 4).unbind(0)
    allowed = torch.ones(3, 3, dtype=torch.bool)
    allowed[1] = False
    out = scaled_dot_product_attention(q, k, v, mask=allowed)
    assert not torch.isnan(out).any() and torch.all(out[0, 0, 1] == 0)


def test_repeat_kv_shares_each_kv_head_with_a_group_of_query_heads():
    x = torch.arange(2 * 3).float().view(1, 2, 3, 1)
    r = repeat_kv(x, 3)
    assert r.shape == (1, 6, 3, 1)
    assert torch.equal(r[0, 0], r[0, 2]) and torch.equal(r[0, 3], x[0, 1])


def test_weights_rows_sum_to_one_and_causal_upper_triangle_is_zero():
    q, k, v = torch.randn(3, 1, 2, 6, 8).unbind(0)
    _, w = scaled_dot_product_attention(q, k, v, causal=True, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 6))
    assert torch.all(w[..., torch.triu_indices(6, 6, 1)[0], torch.triu_indices(6, 6, 1)[1]] == 0)


def test_multihead_module_equals_per_head_attention_and_sdpa():
    torch.manual_seed(2)
    mha = MultiHeadAttention(hidden_size=32, num_heads=4, num_kv_heads=2).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    out = mha(x, causal=True)
    q = mha.q_proj(x).view(2, 5, 4, 8).transpose(1, 2)
    k = mha.k_proj(x).view(2, 5, 2, 8).transpose(1, 2)
    v = mha.v_proj(x).view(2, 5, 2, 8).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, mha.o_proj(ref.transpose(1, 2).reshape(2, 5, 32)))
    # head 0 by the lecture's decomposed form
    torch.testing.assert_close(ref[1, 0], attention_decomposed(q[1, 0], k[1, 0], v[1, 0], causal=True))


# ---- bad input ----------------------------------------------------------------------------

def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match="num_kv_heads = 3 must divide num_heads = 8"):
        MultiHeadAttention(64, num_heads=8, num_kv_heads=3)
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 3, 4, 16)
    with pytest.raises(ConfigError, match="num_kv_heads = 3 must divide query heads = 8"):
        scaled_dot_product_attention(q, k, k)


def test_hidden_size_not_divisible_by_heads():
    with pytest.raises(ShapeError, match="hidden_size = 30 is not divisible by num_heads = 4"):
        MultiHeadAttention(30, num_heads=4)


@pytest.mark.parametrize("shapes,msg", [
    (((4, 16), (1, 2, 4, 16), (1, 2, 4, 16)), r"q must have 4 dims \(B, H, T, D\), got shape \(4, 16\)"),
    (((1, 2, 4, 16), (1, 2, 4, 8), (1, 2, 4, 8)), r"k has D = 8 .* expected 16"),
    (((2, 2, 4, 16), (1, 2, 4, 16), (1, 2, 4, 16)), r"k has B = 1 .* expected 2"),
    (((1, 2, 4, 16), (1, 2, 4, 16), (1, 2, 5, 16)), r"k and v must have the same shape"),
])
def test_wrong_shapes_are_named(shapes, msg):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ShapeError, match=msg):
        scaled_dot_product_attention(q, k, v)


def test_wrong_dtypes_are_named():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="q, k and v must have the same dtype, got q: torch.float32, k: torch.float16"):
        scaled_dot_product_attention(q, q.half(), q)
    with pytest.raises(TypeError, match="floating-point dtype, got torch.int64"):
        scaled_dot_product_attention(q.long(), q, q)
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        attention_matrix([[1.0]], q[0, 0], q[0, 0])
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the weights are torch.float32"):
        mha(torch.randn(1, 3, 8, dtype=torch.float64))
    with pytest.raises(ShapeError, match="x has hidden = 6"):
        mha(torch.randn(1, 3, 6))


def test_causal_needs_at_least_as_many_keys_as_queries():
    with pytest.raises(ShapeError, match="t_k >= t_q"):
        causal_mask(5, 3)
    q, k = torch.randn(5, 4), torch.randn(3, 4)
    with pytest.raises(ShapeError, match="S >= T"):
        attention_decomposed(q, k, k, causal=True)
