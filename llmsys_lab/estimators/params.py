"""Parameter counts, by component, for any ModelConfig.

Exact, not approximate: tests check each preset against the transformers model built from
the same config (e.g. Llama-2-7B: 6,738,415,616).
"""
from __future__ import annotations

from ..configs import ModelConfig


def param_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per component: embedding, positions, attention, mlp, norms, lm_head, total."""
    h, d, L = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    # W_Q (h x n d), W_K and W_V (h x n_kv d), W_O (n d x h)
    attention = h * q_out + 2 * h * kv_out + q_out * h
    if cfg.bias:
        attention += q_out + 2 * kv_out + h
    i = cfg.intermediate_size
    if cfg.activation == "swiglu":          # gate, up: h x i; down: i x h
        mlp = 3 * h * i + (2 * i + h if cfg.bias else 0)
    else:                                   # up: h x i; down: i x h
        mlp = 2 * h * i + (i + h if cfg.bias else 0)
    norm = h if cfg.norm == "rmsnorm" else 2 * h        # gamma (+ beta for LayerNorm)
    parts = {
        "embedding": cfg.vocab_size * h,
        "positions": (cfg.max_position_embeddings + cfg.position_offset) * h if cfg.positions == "learned" else 0,
        "attention": L * attention,
        "mlp": L * mlp,
        "norms": (2 * L + 1) * norm,                     # two per block, one final
        "lm_head": 0 if cfg.tie_word_embeddings else cfg.vocab_size * h,
    }
    parts["total"] = sum(parts.values())
    return parts


def param_count(cfg: ModelConfig) -> int:
    return param_breakdown(cfg)["total"]
