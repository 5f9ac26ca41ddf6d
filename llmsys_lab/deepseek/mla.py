"""Multi-head latent attention (MLA): DeepSeek-V2/V3's attention, whose KV cache is one small latent.

Per token t, with hidden state h_t (DeepSeek-V3 technical report, section 2.1.1, equations 1-11):

    c_t^KV = RMSNorm(W^DKV h_t)                 the compressed latent, d_c = 512 numbers   (cached)
    k_t^R  = RoPE(W^KR h_t)                     one decoupled RoPE key shared by all heads (cached)
    [k_t,i^C ; v_t,i^C] = W^UKV_i c_t^KV        per-head key and value, up-projected from the latent
    k_t,i = [k_t,i^C ; k_t^R]
    c_t^Q = RMSNorm(W^DQ h_t),  [q_t,i^C ; q_t,i^R] = [W^UQ_i ; RoPE(W^QR_i)] c_t^Q

Only c^KV and k^R are cached: (d_c + d_h^R) = 576 numbers per token and layer, against
2 n_h d_h = 32,768 for multi-head attention of the same 128 heads of 128.

The *absorbed* decode never builds the per-head keys and values: q_i^C . k_t,i^C = q_i^C . W^UK_i c_t
= (W^UK_i^T q_i^C) . c_t, so the query is moved into the latent space once per head and step, scores
are taken against the cached latents directly; likewise sum_t p_t W^UV_i c_t = W^UV_i (sum_t p_t c_t),
so the probabilities average latents and one up-projection per head follows.

Parameter names are transformers' (``DeepseekV3Attention``), so its state dict loads as it is; tests
compare forward outputs and gradients with it on random weights. RoPE: the default rotary embedding
(no YaRN scaling), applied to interleaved pairs as DeepSeek does (``rope_interleave=True``) or to the
two halves (False).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kv_cache import CacheError
from ..layers import RMSNorm
from ..validate import ConfigError, ShapeError, check_tensor


@dataclass(frozen=True)
class MLAConfig:
    """Shape of one MLA layer. Defaults: DeepSeek-V3's published configuration."""

    hidden_size: int = 7168
    num_heads: int = 128
    q_lora_rank: int | None = 1536         # d_c' (None: a plain q_proj, as DeepSeek-V2-Lite)
    kv_lora_rank: int = 512                # d_c: the cached latent
    qk_nope_head_dim: int = 128            # d_h: the part of a head's query/key without position
    qk_rope_head_dim: int = 64             # d_h^R: the decoupled RoPE key (cached, shared by the heads)
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    rope_interleave: bool = True
    attention_bias: bool = False

    def __post_init__(self):
        for f in ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"MLAConfig.{f} must be a positive int, got {v!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ConfigError(f"MLAConfig.q_lora_rank must be a positive int or None, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"MLAConfig.qk_rope_head_dim = {self.qk_rope_head_dim} must be even for RoPE")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Numbers cached per token and layer: the latent plus the RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def from_hf(cls, hf) -> "MLAConfig":
        """From a transformers ``DeepseekV3Config`` (default RoPE only: YaRN's scaling is not built here)."""
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"MLAConfig supports the default rotary embedding, the config asks for "
                              f"rope_type={rope.get('rope_type')!r} (DeepSeek-V3's 128K-context YaRN)")
        return cls(hf.hidden_size, hf.num_attention_heads, hf.q_lora_rank, hf.kv_lora_rank, hf.qk_nope_head_dim,
                   hf.qk_rope_head_dim, hf.v_head_dim, float(rope.get("rope_theta", 10000.0)), hf.rms_norm_eps,
                   bool(hf.rope_interleave), bool(hf.attention_bias))

    def to_hf(self, **extra):
        """A transformers ``DeepseekV3Config`` with this attention (one dense layer unless `extra` says otherwise)."""
        from transformers import DeepseekV3Config

        kw = dict(hidden_size=self.hidden_size, num_attention_heads=self.num_heads, num_key_value_heads=self.num_heads,
                  q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
                  qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim, rms_norm_eps=self.rms_norm_eps,
                  rope_interleave=self.rope_interleave, attention_bias=self.attention_bias,
                  rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                  num_hidden_layers=1, first_k_dense_replace=1, intermediate_size=4 * self.hidden_size,
                  vocab_size=256, num_mtp_layers=0)
        kw.update(extra)
        return DeepseekV3Config(**kw)


# ---- rotary embedding on the decoupled key ---------------------------------------------------
def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float = 10000.0, dtype=torch.float32):
    """positions (T,) -> cos, sin of shape (T, dim // 2): one angle per pair of features."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """x (..., T, d); cos, sin (T, d/2). Interleaved: pairs (x0, x1), (x2, x3), ... are rotated and the
    result is written as [all first members ; all second members] (as transformers does, so that q and
    k, rotated alike, give the same dot products). Not interleaved: the pairs are (x_j, x_{j + d/2})."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---- the cache -------------------------------------------------------------------------------
class LatentKVCache:
    """Contiguous MLA cache: per layer, the latent c^KV (B, max_len, d_c) and the RoPE key (B, max_len, d_h^R).

    Why not the kit's paged cache (``PagedKVCache``)? Its pool holds a K and a V tensor of the same
    (kv_heads, head_dim) shape per token; MLA caches *one* vector per token (d_c + d_h^R = 576 numbers
    for DeepSeek-V3) of two parts of different widths, and no V at all. Fitting it would waste a V pool as
    large as the K pool or split one vector over "K" and "V"; a latent paged pool is a separate layout
    (what FlashMLA serves with blocks of 64 tokens), left as an exercise.
    """

    def __init__(self, num_layers: int, batch: int, kv_lora_rank: int, rope_dim: int, max_len: int,
                 dtype=torch.float32, device="cpu"):
        for name, v in (("num_layers", num_layers), ("batch", batch), ("kv_lora_rank", kv_lora_rank),
                        ("rope_dim", rope_dim), ("max_len", max_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CacheError(f"{name} must be a positive int, got {v!r}")
        self.latent = torch.zeros(num_layers, batch, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(num_layers, batch, max_len, rope_dim, dtype=dtype, device=device)
        self.lengths = [0] * num_layers

    @classmethod
    def for_config(cls, cfg: MLAConfig, num_layers: int, batch: int, max_len: int, dtype=torch.float32,
                   device="cpu") -> "LatentKVCache":
        return cls(num_layers, batch, cfg.kv_lora_rank, cfg.qk_rope_head_dim, max_len, dtype, device)

    @property
    def batch(self) -> int:
        return self.latent.shape[1]

    @property
    def max_len(self) -> int:
        return self.latent.shape[2]

    def length(self, layer: int) -> int:
        return self.lengths[layer]

    @property
    def seq_len(self) -> int:
        return self.lengths[-1]

    def bytes_per_token(self) -> int:
        """Bytes one token takes, all layers: (d_c + d_h^R) x layers x element size."""
        return (self.latent.shape[3] + self.k_rope.shape[3]) * self.latent.shape[0] * self.latent.element_size()

    def nbytes(self) -> int:
        return self.latent.numel() * self.latent.element_size() + self.k_rope.numel() * self.k_rope.element_size()

    def update(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor):
        """Append latent (B, T, d_c) and k_rope (B, T, d_h^R) at `layer`; return everything cached there."""
        if not isinstance(layer, int) or not 0 <= layer < len(self.lengths):
            raise CacheError(f"layer must be an int in [0, {len(self.lengths)}), got {layer!r}")
        check_tensor(latent, "latent", "B T d_c")
        check_tensor(k_rope, "k_rope", "B T d_rope")
        if latent.shape[0] != self.batch or k_rope.shape[0] != self.batch:
            raise CacheError(f"this cache holds {self.batch} sequences, got a batch of {latent.shape[0]}")
        if latent.shape[2] != self.latent.shape[3] or k_rope.shape[2] != self.k_rope.shape[3]:
            raise ShapeError(f"the cache holds latents of {self.latent.shape[3]} and RoPE keys of "
                             f"{self.k_rope.shape[3]}, got {latent.shape[2]} and {k_rope.shape[2]}")
        if latent.shape[1] != k_rope.shape[1]:
            raise ShapeError(f"latent has {latent.shape[1]} tokens but k_rope has {k_rope.shape[1]}")
        if latent.dtype != self.latent.dtype or latent.device != self.latent.device:
            raise CacheError(f"the cache holds {self.latent.dtype} on {self.latent.device}, got {latent.dtype} "
                             f"on {latent.device}")
        start, t = self.lengths[layer], latent.shape[1]
        if start + t > self.max_len:
            raise CacheError(f"the cache is full: {start} + {t} tokens > max_len = {self.max_len}")
        self.latent[layer, :, start:start + t] = latent
        self.k_rope[layer, :, start:start + t] = k_rope
        self.lengths[layer] = start + t
        return self.latent[layer, :, :start + t], self.k_rope[layer, :, :start + t]


# ---- the layer -------------------------------------------------------------------------------
def _causal(s: int, t: int, device) -> torch.Tensor:
    """(s, t) bool: query i (the last s of t positions) sees keys 0 .. t - s + i."""
    return torch.arange(t, device=device)[None, :] <= torch.arange(s, device=device)[:, None] + (t - s)


class MLA(nn.Module):
    """Multi-head latent attention. ``forward(x, cache=None, layer=0, absorbed=False)``.

    absorbed=False: up-project every cached latent to per-head K and V (B, H, T, d) and attend (what
    training and prefill do; transformers' path). absorbed=True: attend in the latent space
    (``absorbed_attention``), the per-head K and V never exist. Both give the same output.
    """

    def __init__(self, config: MLAConfig):
        super().__init__()
        c = self.config = config
        h, n = c.hidden_size, c.num_heads
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(h, n * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, c.q_lora_rank, bias=c.attention_bias)           # W^DQ
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, n * c.qk_head_dim, bias=False)       # W^UQ, W^QR
        self.kv_a_proj_with_mqa = nn.Linear(h, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, n * (c.qk_nope_head_dim + c.v_head_dim), bias=False)  # W^UKV
        self.o_proj = nn.Linear(n * c.v_head_dim, h, bias=c.attention_bias)
        self.scale = c.qk_head_dim ** -0.5

    # -- pieces ------------------------------------------------------------------------------
    def queries(self, x: torch.Tensor, cos, sin):
        """x (B, S, h) -> q_nope (B, H, S, d_h), q_rope (B, H, S, d_h^R) (RoPE applied)."""
        c = self.config
        b, s, _ = x.shape
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, c.num_heads, c.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin, c.rope_interleave)

    def latents(self, x: torch.Tensor, cos, sin):
        """x (B, S, h) -> what is cached: latent (B, S, d_c) (normed) and k_rope (B, S, d_h^R) (RoPE applied)."""
        c = self.config
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(latent), apply_rope(k_rope, cos, sin, c.rope_interleave)

    def up_weights(self):
        """W^UK (H, d_h, d_c) and W^UV (H, d_v, d_c): kv_b_proj's weight split per head."""
        c = self.config
        w = self.kv_b_proj.weight.view(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, :c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]

    def expand(self, latent: torch.Tensor, k_rope: torch.Tensor):
        """The materialised path: latents (B, T, d_c), k_rope (B, T, d_h^R) -> K (B, H, T, d_h + d_h^R), V (B, H, T, d_v)."""
        c = self.config
        b, t, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, t, c.num_heads, c.qk_nope_head_dim + c.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(-1, c.num_heads, -1, -1)], dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, cache: LatentKVCache | None = None, layer: int = 0,
                absorbed: bool = False) -> torch.Tensor:
        check_tensor(x, "x", "B S h")
        c = self.config
        if x.shape[-1] != c.hidden_size:
            raise ShapeError(f"x has {x.shape[-1]} features, the MLA layer expects {c.hidden_size}")
        b, s, _ = x.shape
        past = cache.length(layer) if cache is not None else 0
        cos, sin = rope_cos_sin(torch.arange(past, past + s, device=x.device), c.qk_rope_head_dim, c.rope_theta,
                                x.dtype)
        q_nope, q_rope = self.queries(x, cos, sin)
        latent, k_rope = self.latents(x, cos, sin)
        if cache is not None:
            latent, k_rope = cache.update(layer, latent, k_rope)                  # (B, T, d_c), (B, T, d_h^R)
        if absorbed:
            out = absorbed_attention(q_nope, q_rope, latent, k_rope, *self.up_weights(), self.scale)
        else:
            k, v = self.expand(latent, k_rope)
            q = torch.cat([q_nope, q_rope], dim=-1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal(s, k.shape[2], x.device),
                                                 scale=self.scale)                  # (B, H, S, d_v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, c.num_heads * c.v_head_dim))

    def load_hf(self, hf_attention) -> "MLA":
        """Copy a transformers ``DeepseekV3Attention`` (same parameter names)."""
        self.load_state_dict(hf_attention.state_dict(), strict=True)
        return self


def hf_cache_kwargs(hf_attention, cache) -> dict:
    """{name: cache} for a transformers attention module's forward: releases differ in the keyword
    (``cache`` in recent ones, ``past_key_values`` before); an unknown keyword would be swallowed by its
    ``**kwargs`` and the cache silently not used."""
    import inspect

    params = inspect.signature(hf_attention.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return {name: cache}
    raise TypeError(f"{type(hf_attention).__name__}.forward takes none of cache / past_key_values: "
                    "this transformers release is not supported here")


def absorbed_attention(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale: float) -> torch.Tensor:
    """Attention in the latent space; causal with the queries as the last S of T positions.

    q_nope (B, H, S, d_h), q_rope (B, H, S, d_r), latent (B, T, d_c), k_rope (B, T, d_r),
    w_uk (H, d_h, d_c), w_uv (H, d_v, d_c) -> (B, H, S, d_v). Never forms a (B, H, T, d) key or value.
    """
    q_lat = torch.einsum("bhsd,hdc->bhsc", q_nope, w_uk)                 # W^UK_i^T q_i: the query in latent space
    scores = (torch.einsum("bhsc,btc->bhst", q_lat, latent)
              + torch.einsum("bhsr,btr->bhst", q_rope, k_rope)) * scale  # (B, H, S, T)
    s, t = scores.shape[-2:]
    scores = scores.masked_fill(~_causal(s, t, scores.device), float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(latent.dtype)
    o_lat = torch.einsum("bhst,btc->bhsc", p, latent)                    # average of latents, per head
    return torch.einsum("bhsc,hvc->bhsv", o_lat, w_uv)                   # one up-projection per head


def absorbed_flops_per_token(cfg: MLAConfig, context: int) -> dict[str, int]:
    """Attention FLOPs of one decode token at `context` cached tokens, one layer: materialised vs absorbed.
    Materialised: up-project every cached latent (2 T d_c H (d_h + d_v)) then scores and PV.
    Absorbed: two per-head projections of the query/output (2 H d_c (d_h + d_v)) then scores on d_c + d_r."""
    H, dc, dn, dr, dv, T = (cfg.num_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                            cfg.v_head_dim, context)
    materialised = 2 * T * dc * H * (dn + dv) + 2 * H * T * (dn + dr) + 2 * H * T * dv
    absorbed = 2 * H * dc * (dn + dv) + 2 * H * T * (dc + dr) + 2 * H * T * dc
    return {"materialised": materialised, "absorbed": absorbed}


__all__ = ["MLAConfig", "MLA", "LatentKVCache", "absorbed_attention", "apply_rope", "rope_cos_sin",
           "absorbed_flops_per_token"]
