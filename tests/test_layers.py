"""The kit's blocks against transformers' Llama layers with copied random weights."""
import pytest
import torch
from transformers.models.llama import modeling_llama as hf

from llmsys_lab.attention import additive_mask, causal_mask
from llmsys_lab.configs import ModelConfig
from llmsys_lab.layers import (LlamaBlock, OriginalTransformerBlock, RMSNorm, RotaryEmbedding,
                               SwiGLU, sinusoidal_positions)

CONFIGS = {
    "mha": ModelConfig(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=160, vocab_size=101),
    "gqa": ModelConfig(hidden_size=96, num_layers=1, num_heads=6, num_kv_heads=2, intermediate_size=200,
                       vocab_size=101, rope_theta=500000.0),
    "mqa": ModelConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=1, head_dim=32,
                       intermediate_size=96, vocab_size=101),
}


def hf_layer_and_block(cfg: ModelConfig, attn_impl: str):
    hf_cfg = cfg.to_hf()
    hf_cfg._attn_implementation = attn_impl
    torch.manual_seed(0)
    layer = hf.LlamaDecoderLayer(hf_cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in layer.parameters():     # norms start at 1: randomise them too
            p.normal_(0, 0.2)
    block = LlamaBlock(cfg).eval()
    block.load_state_dict(layer.state_dict(), strict=True)
    return hf_cfg, layer, block


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_llama_block_matches_transformers_decoder_layer(name, attn_impl):
    cfg = CONFIGS[name]
    hf_cfg, layer, block = hf_layer_and_block(cfg, attn_impl)
    b, t = 3, 11
    x = torch.randn(b, t, cfg.hidden_size)
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = hf.LlamaRotaryEmbedding(hf_cfg)(x, pos)
    mask = additive_mask(causal_mask(t))[None, None].expand(b, 1, t, t)
    with torch.no_grad():
        ref = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        ref = ref[0] if isinstance(ref, tuple) else ref
        out = block(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rope_matches_transformers_and_is_relative():
    cfg = CONFIGS["gqa"]
    rot = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
    x = torch.randn(1, 2, 9, cfg.head_dim)
    pos = torch.arange(9)
    cos, sin = hf.LlamaRotaryEmbedding(cfg.to_hf())(x, pos[None])
    ref, _ = hf.apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(rot(x, pos), ref)
    # <R(m) q, R(n) k> depends only on m - n
    q, k = torch.randn(2, cfg.head_dim, dtype=torch.float64).unbind(0)
    rot64 = RotaryEmbedding(cfg.head_dim)
    def score(m, n):
        qm = rot64(q.view(1, 1, 1, -1), torch.tensor([m]))
        kn = rot64(k.view(1, 1, 1, -1), torch.tensor([n]))
        return (qm * kn).sum().item()
    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_rmsnorm_matches_formula_and_transformers():
    x = torch.randn(4, 32)
    norm = RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    ref = hf.LlamaRMSNorm(32, eps=1e-6)
    ref.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x), ref(x))
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(norm(x), x / rms * norm.weight)


def test_swiglu_matches_formula():
    mlp = SwiGLU(16, 40)
    x = torch.randn(3, 16)
    g, u = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    torch.testing.assert_close(mlp(x), (g * torch.sigmoid(g) * u) @ mlp.down_proj.weight.T)


def test_original_block_is_post_norm_and_causal():
    torch.manual_seed(0)
    blk = OriginalTransformerBlock(hidden_size=32, num_heads=4, ffn_size=64).eval()
    x = torch.randn(2, 6, 32)
    y = blk(x)
    # the last operation is a LayerNorm (default affine 1/0): every row has mean 0, std 1
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    # causal: changing the last token leaves earlier outputs unchanged
    x2 = x.clone()
    x2[:, -1] += 1
    torch.testing.assert_close(blk(x2)[:, :-1], y[:, :-1])
    assert not torch.allclose(blk(x2)[:, -1], y[:, -1])


def test_sinusoidal_positions_formula():
    pe = sinusoidal_positions(50, 16)
    assert pe.shape == (50, 16)
    p, i = 7, 3
    assert pe[p, 2 * i].item() == pytest.approx(torch.sin(torch.tensor(p / 10000 ** (2 * i / 16))).item(), abs=1e-6)
    assert pe[p, 2 * i + 1].item() == pytest.approx(torch.cos(torch.tensor(p / 10000 ** (2 * i / 16))).item(), abs=1e-6)


def test_rope_needs_even_head_dim():
    with pytest.raises(ValueError, match="even head_dim, got 7"):
        RotaryEmbedding(7)
