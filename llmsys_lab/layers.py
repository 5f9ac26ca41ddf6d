"""Transformer building blocks: the original (Vaswani et al.) block and the LLaMA block.

| piece               | Vaswani et al.  | LLaMA    |
| ------------------- | --------------- | -------- |
| norm position       | post            | pre      |
| norm type           | LayerNorm       | RMSNorm  |
| non-linearity       | ReLU            | SiLU (SwiGLU) |
| positional encoding | sinusoidal      | RoPE     |

Parameter names of ``LlamaBlock`` follow Hugging Face's ``LlamaDecoderLayer``
(input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
mlp.{gate,up,down}_proj), so its weights load with ``load_state_dict``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .attention import MultiHeadAttention
from .configs import ModelConfig
from .validate import ShapeError, check_tensor


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * gamma.

    The lecture writes x / (RMS(x) + eps); LLaMA (and this class) put eps inside the
    square root. The statistics are computed in float32 even for half inputs.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE: rotate pairs of q/k features by an angle proportional to the position.

    Feature pair (i, i + D/2) at position p is rotated by p * theta^(-2i/D). A dot product
    of a rotated q at position m and a rotated k at position n then depends only on m - n.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ShapeError(f"RoPE needs an even head_dim, got {head_dim}")
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor):
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)   # (T, D/2)
        emb = torch.cat((angles, angles), dim=-1)                                      # (T, D)
        return emb.cos(), emb.sin()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D), positions: (T,) or (B, T)."""
        return self.rotate(x, *self.cos_sin(positions))

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply precomputed cos/sin (from cos_sin) to x: reuse them across layers."""
        if cos.dim() == 3:                      # per-sequence positions (B, T, D)
            cos, sin = cos[:, None], sin[:, None]
        return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))


def sinusoidal_positions(num_positions: int, dim: int) -> torch.Tensor:
    """The original transformer's fixed encoding: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    pos = torch.arange(num_positions, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(num_positions, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


class SwiGLU(nn.Module):
    """down( Swish(x W_gate) * (x W_up) ), with Swish(z) = z * sigmoid(z) = SiLU."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-norm block: h = x + Attn(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadAttention(
            config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            rope=RotaryEmbedding(config.head_dim, config.rope_theta))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                kv_cache=None, layer_idx: int = 0, rotary: tuple | None = None) -> torch.Tensor:
        check_tensor(x, "x", "B T hidden")
        h = x + self.self_attn(self.input_layernorm(x), causal=True, positions=positions, mask=mask,
                               kv_cache=kv_cache, layer_idx=layer_idx, rotary=rotary)
        return h + self.mlp(self.post_attention_layernorm(h))


class OriginalTransformerBlock(nn.Module):
    """Post-norm block of Vaswani et al. (as on the lecture slide):

        Z = LayerNorm(X + SelfAttention(X))
        H = LayerNorm(ReLU(Z W1) W2 + Z)
    """

    def __init__(self, hidden_size: int, num_heads: int, ffn_size: int, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.attn = MultiHeadAttention(hidden_size, num_heads, bias=True)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.ffn = nn.Sequential(nn.Linear(hidden_size, ffn_size), nn.ReLU(), nn.Linear(ffn_size, hidden_size))
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x", "B T hidden")
        z = self.norm1(x + self.attn(x, causal=self.causal))
        return self.norm2(self.ffn(z) + z)
