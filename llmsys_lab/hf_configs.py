"""Conversions between ModelConfig and the transformers configs of OPT and GPT-2.

Llama-family conversions live in ``configs.py``; these two architectures differ enough
(LayerNorm, learned positions, biases, a two-matrix MLP, tied embeddings) to get their own
small functions.
"""
from __future__ import annotations

from .validate import ConfigError


def from_opt_or_gpt2(cls, hf, name=None):
    if hf.model_type == "opt":
        if getattr(hf, "word_embed_proj_dim", hf.hidden_size) != hf.hidden_size:
            raise ConfigError("OPT configs with word_embed_proj_dim != hidden_size (OPT-350m) are not supported")
        return cls(arch="opt", hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
                   num_heads=hf.num_attention_heads, intermediate_size=hf.ffn_dim, vocab_size=hf.vocab_size,
                   max_position_embeddings=hf.max_position_embeddings, norm="layernorm",
                   activation=hf.activation_function if hf.activation_function in ("relu", "gelu") else "relu",
                   bias=bool(getattr(hf, "enable_bias", True)), positions="learned", position_offset=2,
                   tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
                   name=name or getattr(hf, "name_or_path", "") or "opt")
    return cls(arch="gpt2", hidden_size=hf.n_embd, num_layers=hf.n_layer, num_heads=hf.n_head,
               intermediate_size=hf.n_inner or 4 * hf.n_embd, vocab_size=hf.vocab_size,
               max_position_embeddings=hf.n_positions, norm="layernorm", activation="gelu", bias=True,
               positions="learned", tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
               rms_norm_eps=hf.layer_norm_epsilon, name=name or getattr(hf, "name_or_path", "") or "gpt2")


def to_opt_or_gpt2(cfg):
    if cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ConfigError(f"{cfg.arch} has plain multi-head attention: needs num_kv_heads == num_heads "
                          "and head_dim == hidden_size / num_heads")
    if cfg.arch == "opt":
        from transformers import OPTConfig

        return OPTConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, ffn_dim=cfg.intermediate_size,
                         vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
                         word_embed_proj_dim=cfg.hidden_size, activation_function=cfg.activation,
                         enable_bias=cfg.bias, do_layer_norm_before=True,
                         tie_word_embeddings=cfg.tie_word_embeddings)
    from transformers import GPT2Config

    return GPT2Config(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                      n_inner=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                      n_positions=cfg.max_position_embeddings, layer_norm_epsilon=cfg.rms_norm_eps,
                      tie_word_embeddings=cfg.tie_word_embeddings)
