"""Self-attention, from the lecture's formula to multi-head and grouped-query attention.

    SelfAttention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

Three forms of the same function, each checked against the others and against
``torch.nn.functional.scaled_dot_product_attention`` in the tests:

* ``attention_decomposed``: one query at a time, as on the slide "A closer look at
  self-attention": scores s_i = q k_i^T / sqrt(d), then h = sum_i softmax(s)_i v_i.
* ``attention_matrix``: all queries at once with matrix products.
* ``scaled_dot_product_attention``: batched over (B, H), with a causal mask, an extra
  mask, and grouped-query attention (fewer K/V heads than query heads).

Causal masks are aligned to the bottom right: query i of T_q sits at position
T_k - T_q + i and sees keys 0..T_k - T_q + i. For T_q == T_k this is the usual lower
triangle; for one new token against a cache of T_k keys it sees them all (lesson 03).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .validate import ShapeError, check_heads, check_same, check_size, check_tensor


def causal_mask(t_q: int, t_k: int | None = None, device=None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True where a query may attend to a key."""
    t_k = t_q if t_k is None else t_k
    if t_k < t_q:
        raise ShapeError(f"causal attention needs t_k >= t_q, got t_q = {t_q}, t_k = {t_k}")
    q_pos = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)
    k_pos = torch.arange(t_k, device=device)[None, :]
    return k_pos <= q_pos


def additive_mask(allowed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The lecture's M: 0 where attention is allowed, -inf where it is masked."""
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, float("-inf"))


def _check_qkv_2d(q, k, v) -> None:
    check_tensor(q, "Q", "T D")
    check_tensor(k, "K", "S D")
    check_tensor(v, "V", "S D")
    check_same({"Q": q, "K": k, "V": v}, "dtype")
    check_size(k, "K", 1, "D", q.shape[1])
    check_size(v, "V", 0, "S", k.shape[0])


def attention_decomposed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         causal: bool = False) -> torch.Tensor:
    """One query row at a time: h_t = sum_i softmax(s)_i v_i with s_i = q_t k_i^T / sqrt(d).

    q: (T, D), k, v: (S, D). With causal=True the masked keys are never touched:
    row t only computes the scores it needs ("skip the computation").
    """
    _check_qkv_2d(q, k, v)
    t_q, d = q.shape
    t_k = k.shape[0]
    if causal and t_k < t_q:
        raise ShapeError(f"causal attention needs S >= T, got T = {t_q}, S = {t_k}")
    out = torch.empty(t_q, v.shape[1], dtype=q.dtype, device=q.device)
    for t in range(t_q):
        last = t_k - t_q + t + 1 if causal else t_k      # keys this query may see
        s = (k[:last] @ q[t]) / math.sqrt(d)             # (last,) scores
        w = torch.exp(s - s.max())                       # safe softmax: subtract the max
        out[t] = (w / w.sum()) @ v[:last]                # weighted average of values
    return out


def attention_matrix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     causal: bool = False, return_weights: bool = False):
    """softmax(Q K^T / sqrt(d) - M) V for q: (T, D), k, v: (S, D)."""
    _check_qkv_2d(q, k, v)
    scores = q @ k.transpose(0, 1) / math.sqrt(q.shape[-1])        # (T, S)
    if causal:
        scores = scores + additive_mask(causal_mask(q.shape[0], k.shape[0], q.device), q.dtype)
    weights = torch.softmax(scores, dim=-1)
    out = weights @ v
    return (out, weights) if return_weights else out


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * n_rep, S, D): each K/V head serves n_rep query heads."""
    if n_rep == 1:
        return x
    b, h_kv, s, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_rep, s, d).reshape(b, h_kv * n_rep, s, d)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 causal: bool = False, mask: torch.Tensor | None = None,
                                 scale: float | None = None, return_weights: bool = False):
    """Batched attention with optional causal mask, boolean/additive mask and GQA.

    q: (B, H, T, D); k, v: (B, H_kv, S, D) with H_kv dividing H (GQA; H_kv = 1 is MQA).
    mask: broadcastable to (B, H, T, S); bool (True = attend) or additive float.
    Returns (B, H, T, D), and the (B, H, T, S) weights if return_weights.
    """
    check_tensor(q, "q", "B H T D")
    check_tensor(k, "k", "B H_kv S D")
    check_tensor(v, "v", "B H_kv S D")
    check_same({"q": q, "k": k, "v": v}, "dtype")
    check_same({"q": q, "k": k, "v": v}, "device")
    if k.shape != v.shape:
        raise ShapeError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    check_size(k, "k", 0, "B", q.shape[0])
    check_size(k, "k", 3, "D", q.shape[3])
    check_heads(q.shape[1], k.shape[1], "query heads")
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    v = repeat_kv(v, q.shape[1] // v.shape[1])

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale                     # (B, H, T, S)
    if causal:
        scores = scores + additive_mask(causal_mask(q.shape[2], k.shape[2], q.device), q.dtype)
    if mask is not None:
        scores = scores + (additive_mask(mask, q.dtype) if mask.dtype == torch.bool else mask)
    weights = torch.softmax(scores, dim=-1)
    # A row with every key masked has weights NaN (0/0); it attends to nothing, so output 0.
    weights = torch.nan_to_num(weights, nan=0.0)
    out = weights @ v                                              # (B, H, T, D)
    return (out, weights) if return_weights else out


class MultiHeadAttention(nn.Module):
    """Q/K/V projections, per-head attention (MHA, GQA or MQA), output projection.

    Parameter names follow Hugging Face's Llama (q_proj, k_proj, v_proj, o_proj), so a
    transformers checkpoint loads with a plain ``load_state_dict``.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, rope=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_heads(num_heads, num_kv_heads)
        if head_dim is None:
            if hidden_size % num_heads:
                raise ShapeError(f"hidden_size = {hidden_size} is not divisible by num_heads = {num_heads}; "
                                 "pass head_dim explicitly")
            head_dim = hidden_size // num_heads
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = (
            hidden_size, num_heads, num_kv_heads, head_dim)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.rope = rope

    def split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n_heads, self.head_dim).transpose(1, 2)    # (B, H, T, D)

    def forward(self, x: torch.Tensor, causal: bool = True, positions: torch.Tensor | None = None,
                return_weights: bool = False, mask: torch.Tensor | None = None, kv_cache=None,
                layer_idx: int = 0, rotary: tuple | None = None):
        """x: (B, T, hidden). positions: (T,) or (B, T) for RoPE. mask: bool, broadcastable to
        (B, H, T, S), True where a query may attend (e.g. key padding). kv_cache: keys and values
        of earlier tokens; this call appends the new ones and attends to all of them. rotary: RoPE's
        (cos, sin) for these positions, when the caller computed them once for every layer."""
        check_tensor(x, "x", "B T hidden")
        check_size(x, "x", 2, "hidden", self.hidden_size)
        if x.dtype != self.q_proj.weight.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the weights are {self.q_proj.weight.dtype}")
        q = self.split_heads(self.q_proj(x), self.num_heads)
        k = self.split_heads(self.k_proj(x), self.num_kv_heads)
        v = self.split_heads(self.v_proj(x), self.num_kv_heads)
        if self.rope is not None:
            if rotary is not None:
                cos, sin = rotary
            else:
                if positions is None:
                    start = kv_cache.seq_len if kv_cache is not None else 0
                    positions = torch.arange(start, start + x.shape[1], device=x.device)
                cos, sin = self.rope.cos_sin(positions)      # one rotation for q and k
            q, k = self.rope.rotate(q, cos, sin), self.rope.rotate(k, cos, sin)
        weights = None
        if kv_cache is None:
            out, weights = scaled_dot_product_attention(q, k, v, causal=causal, mask=mask, return_weights=True)
        elif return_weights or not hasattr(kv_cache, "attend"):
            # the weights need the padded (B, H, T, S) layout: append and attend here (also for a
            # cache object that only has update(), as the lesson-03 exercise builds)
            k, v = kv_cache.update(layer_idx, k, v)
            out, weights = scaled_dot_product_attention(q, k, v, causal=causal, mask=mask, return_weights=True)
        else:
            # the KV interface (llmsys_lab/forward_batch.py): the cache or batch layout stores the new
            # K/V and attends (Q is never cached: only the new queries are needed)
            out = kv_cache.attend(layer_idx, q, k, v, causal=causal, mask=mask)
        b, h, t, d = out.shape
        out = self.o_proj(out.transpose(1, 2).reshape(b, t, h * d))      # concat heads, project
        return (out, weights) if return_weights else out
