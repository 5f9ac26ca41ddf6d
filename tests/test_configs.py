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
