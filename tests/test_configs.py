import pytest

from llmsys_lab.configs import ModelConfig
from llmsys_lab.validate import ConfigError

BASE = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=100)


def test_defaults_fill_kv_heads_and_head_dim():
    cfg = ModelConfig(**BASE)
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16 and cfg.gqa_group_size == 1


def test_round_trip_through_transformers():
    cfg = ModelConfig(**BASE, num_kv_heads=2, rope_theta=5e5, tie_word_embeddings=True)
    back = ModelConfig.from_hf(cfg.to_hf(), name="custom")
    assert back == cfg


@pytest.mark.parametrize("change,msg", [
    (dict(num_kv_heads=3), "num_kv_heads = 3 must divide num_heads = 4"),
    (dict(hidden_size=66), "hidden_size = 66 is not divisible by num_heads = 4"),
    (dict(num_layers=0), r"ModelConfig.num_layers must be a positive int, got 0"),
    (dict(vocab_size=1.5), r"ModelConfig.vocab_size must be a positive int, got 1.5"),
    (dict(norm="batchnorm"), "ModelConfig.norm must be 'rmsnorm' or 'layernorm'"),
    (dict(activation="tanh"), "ModelConfig.activation must be"),
])
def test_bad_fields_are_named(change, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig(**{**BASE, **change})


def test_from_hf_keeps_llama_biases_and_refuses_a_mix():
    """attention_bias / mlp_bias change the parameter count (0.48% for Llama-2-7B's shape): kept, or refused."""
    import pytest
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llmsys_lab.configs import ModelConfig
    from llmsys_lab.estimators import param_count
    from llmsys_lab.validate import ConfigError

    hf = LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=512, vocab_size=1000, attention_bias=True, mlp_bias=True)
    cfg = ModelConfig.from_hf(hf)
    assert cfg.bias
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    back = cfg.to_hf()
    assert back.attention_bias and back.mlp_bias
    with pytest.raises(ConfigError, match="attention_bias=True but mlp_bias=False"):
        ModelConfig.from_hf(LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=512, vocab_size=1000, attention_bias=True))
