"""Model shapes shipped with the kit (no download needed), from the models' published configs."""
from __future__ import annotations

import difflib

from .configs import ModelConfig
from .validate import ConfigError

_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in [
    ModelConfig(name="llama-2-7b", hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008, **_LLAMA2),
    ModelConfig(name="llama-2-13b", hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13824, **_LLAMA2),
    ModelConfig(name="llama-2-70b", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                intermediate_size=28672, **_LLAMA2),
    ModelConfig(name="llama-3-8b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                rms_norm_eps=1e-5, rope_theta=500000.0),
    ModelConfig(name="mistral-7b", arch="mistral", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5),
    ModelConfig(name="opt-13b", arch="opt", hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=20480,
                vocab_size=50272, max_position_embeddings=2048, norm="layernorm", activation="relu", bias=True,
                positions="learned", position_offset=2, tie_word_embeddings=True),
    ModelConfig(name="gpt2", arch="gpt2", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                vocab_size=50257, max_position_embeddings=1024, norm="layernorm", activation="gelu", bias=True,
                positions="learned", tie_word_embeddings=True, rms_norm_eps=1e-5),
    # The kit's own small Llama-style model (trained on Shakespeare for the serving lessons).
    ModelConfig(name="llmsys-tiny", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                intermediate_size=688, vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=True),
]}


def get_preset(name: str) -> ModelConfig:
    """A preset by name (case-insensitive); unknown names get a list and a suggestion."""
    key = name.lower()
    if key in PRESETS:
        return PRESETS[key]
    close = difflib.get_close_matches(key, PRESETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown model preset {name!r}.{hint} Known presets: {', '.join(PRESETS)}")


def resolve_preset(name: str):
    """A dense preset (``ModelConfig``) or an MoE preset (``estimators.moe.MoEModelConfig``) by name,
    case-insensitive; an unknown name gets both lists and a suggestion (the CLI's ``estimate``)."""
    from .estimators.moe import MOE_PRESETS

    key = name.lower()
    if key in PRESETS:
        return PRESETS[key]
    if key in MOE_PRESETS:
        return MOE_PRESETS[key]
    close = difflib.get_close_matches(key, [*PRESETS, *MOE_PRESETS], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown model preset {name!r}.{hint} Known presets: {', '.join(PRESETS)}; "
                      f"MoE presets: {', '.join(MOE_PRESETS)}")
