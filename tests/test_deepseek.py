"""Lesson 12: DeepSeek-V3's pieces in the kit, each checked against transformers' DeepSeek-V3."""
import pytest
import torch

from llmsys_lab.deepseek import (DEEPSEEK_V3, MLA, LatentKVCache, MLAConfig, DeepSeekV3Shape, attention_variants,
                                 forward_flops_per_token,
                                 hf_param_count, kv_bytes_per_token, max_batch, param_breakdown)
from llmsys_lab.deepseek.balancing import calibrate_bias, dispatch_bytes, imbalance, tiny_moe_model, train_balancing
from llmsys_lab.deepseek.mla import hf_cache_kwargs
from llmsys_lab.deepseek.serving import mtp_speedup
from llmsys_lab.estimators.memory import kv_bytes_per_token as kit_kv_bytes
from llmsys_lab.kv_cache import CacheError
from llmsys_lab.moe import MoE, MoEConfig, route, update_selection_bias
from llmsys_lab.validate import ConfigError, ShapeError

SMALL = MLAConfig(hidden_size=64, num_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=6)


def hf_attention(cfg: MLAConfig, seed=0):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    hf_cfg = cfg.to_hf()
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    attn = DeepseekV3Attention(hf_cfg, layer_idx=0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))   # norms near 1, not exactly
    return attn, DeepseekV3RotaryEmbedding(hf_cfg)


def hf_forward(attn, rope, x, start=0):
    pos = torch.arange(start, start + x.shape[1])[None]
    return attn(x, position_embeddings=rope(x, pos), attention_mask=None)[0]


@pytest.mark.parametrize("cfg", [SMALL, SMALL.__class__(**{**SMALL.__dict__, "q_lora_rank": None}),
                                 SMALL.__class__(**{**SMALL.__dict__, "rope_interleave": False})],
                         ids=["q_lora", "plain_q", "halves_rope"])
def test_mla_equals_transformers_forward_and_gradients(cfg):
    attn, rope = hf_attention(cfg)
    mine = MLA(cfg).load_hf(attn)
    x = torch.randn(2, 7, cfg.hidden_size, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ref, out = hf_forward(attn, rope, x), mine(x2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(attn.named_parameters(), mine.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_mla_differs_from_transformers_when_a_weight_differs():
    attn, rope = hf_attention(SMALL)
    mine = MLA(SMALL).load_hf(attn)
    with torch.no_grad():
        mine.kv_b_proj.weight[0, 0] += 0.5
    x = torch.randn(1, 5, SMALL.hidden_size)
    assert (mine(x) - hf_forward(attn, rope, x)).abs().max() > 1e-3


@pytest.mark.parametrize("absorbed", [False, True])
def test_latent_cache_decode_equals_full_forward_and_transformers_cache(absorbed):
    from transformers import DynamicCache

    attn, rope = hf_attention(SMALL, seed=1)
    mine = MLA(SMALL).load_hf(attn).eval()
    x = torch.randn(2, 9, SMALL.hidden_size)
    with torch.no_grad():
        full = mine(x)
        cache = LatentKVCache.for_config(SMALL, num_layers=1, batch=2, max_len=16)
        steps = [mine(x[:, :5], cache)] + [mine(x[:, t:t + 1], cache, absorbed=absorbed) for t in range(5, 9)]
        hf_cache = DynamicCache(config=SMALL.to_hf())
        pos = lambda a, b: rope(x, torch.arange(a, b)[None])  # noqa: E731
        kw = hf_cache_kwargs(attn, hf_cache)
        hf_steps = [attn(x[:, :5], position_embeddings=pos(0, 5), attention_mask=None, **kw)[0]]
        hf_steps += [attn(x[:, t:t + 1], position_embeddings=pos(t, t + 1), attention_mask=None, **kw)[0]
                     for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), torch.cat(hf_steps, 1), atol=1e-5, rtol=1e-5)
    # the cache holds exactly the latent and the RoPE key: what transformers' cache holds, and nothing per head
    torch.testing.assert_close(cache.latent[0, :, :9], hf_cache.layers[0].keys[:, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache.k_rope[0, :, :9], hf_cache.layers[0].values[:, 0], atol=1e-6, rtol=1e-6)
    assert cache.bytes_per_token() == (16 + 4) * 4


def test_absorbed_prefill_equals_materialised_and_never_expands(monkeypatch):
    mine = MLA(SMALL)
    x = torch.randn(2, 6, SMALL.hidden_size)
    ref = mine(x)
    called = []
    monkeypatch.setattr(mine, "expand", lambda *a: called.append(1))
    torch.testing.assert_close(mine(x, absorbed=True), ref, atol=1e-5, rtol=1e-5)
    assert not called, "the absorbed path must not up-project the cached latents"


def test_cache_bad_input_errors():
    cache = LatentKVCache(1, 2, 16, 4, max_len=4)
    with pytest.raises(ShapeError, match="latents of 16"):
        cache.update(0, torch.zeros(2, 1, 15), torch.zeros(2, 1, 4))
    with pytest.raises(CacheError, match="batch of 3"):
        cache.update(0, torch.zeros(3, 1, 16), torch.zeros(3, 1, 4))
    with pytest.raises(CacheError, match="full"):
        cache.update(0, torch.zeros(2, 5, 16), torch.zeros(2, 5, 4))
    with pytest.raises(CacheError, match="layer"):
        cache.update(1, torch.zeros(2, 1, 16), torch.zeros(2, 1, 4))
    with pytest.raises(CacheError, match="max_len"):
        LatentKVCache(1, 2, 16, 4, max_len=0)
    with pytest.raises(ConfigError, match="even"):
        MLAConfig(qk_rope_head_dim=63)
    with pytest.raises(ShapeError, match="expects 64"):
        MLA(SMALL)(torch.zeros(1, 2, 63))


def test_counts_equal_transformers_meta_model_for_v3_and_a_variant():
    for shape in (DEEPSEEK_V3, DEEPSEEK_V3.replace(first_dense=1, num_layers=5, vocab_size=1000)):
        p, hf = param_breakdown(shape), hf_param_count(shape)
        assert p["total"] == hf["parameters"]
        assert p["routed_experts"] == hf["routed_experts"]
        assert p["selection_bias_buffer"] == hf["selection_bias_buffer"]
    p = param_breakdown(DEEPSEEK_V3)
    assert p["total"] == 671_026_404_352                        # the report's "671B"
    assert round(p["active"] / 1e9) == 38 and round((p["active"] - p["embedding"]) / 1e9) == 37
    assert round((p["total"] + p["mtp_checkpoint"]) / 1e9) == 684    # the model card's 685B (671B + 14B MTP)


def test_active_count_equals_the_parameters_one_token_touches():
    """Build a small real model, route one token, and count the parameters whose gradient is non-zero."""
    from transformers import DeepseekV3ForCausalLM

    shape = DeepSeekV3Shape(vocab_size=50, hidden_size=32, num_layers=3, first_dense=1, dense_intermediate=48,
                            mla=MLAConfig(32, 2, 16, 8, 8, 4, 8),
                            moe=MoEConfig(32, 16, 8, 2, shared_expert_size=16, score="sigmoid", num_groups=2,
                                          topk_groups=1, shared_expert_gated=False, selection_bias=True),
                            num_mtp=0)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(shape.to_hf())
    model(torch.tensor([[3]])).logits.sum().backward()
    touched = 0
    for name, p in model.named_parameters():
        if "experts.gate_up_proj" in name or "experts.down_proj" in name:        # (E, ., .): the experts used
            touched += int((p.grad != 0).flatten(1).any(1).sum()) * p[0].numel()
        elif "embed_tokens" in name:                                             # the token's row
            touched += int((p.grad != 0).any(1).sum()) * p.shape[1]
        else:                                                                    # used in full
            assert p.grad is not None, name
            touched += p.numel()
    embedding_rows_unused = (shape.vocab_size - 1) * shape.hidden_size
    assert touched == param_breakdown(shape)["active"] - embedding_rows_unused
    assert touched < param_breakdown(shape)["total"] - embedding_rows_unused


def test_kv_bytes_mla_vs_mha_gqa_mqa():
    v = attention_variants(DEEPSEEK_V3)
    mla = kv_bytes_per_token(DEEPSEEK_V3, "bf16")
    assert mla == 61 * 576 * 2
    assert kit_kv_bytes(v["MHA"], "bf16") == 2 * 61 * 128 * 128 * 2
    assert kit_kv_bytes(v["MQA"], "bf16") < mla < kit_kv_bytes(v["GQA-8"], "bf16")
    node = 8 * 141e9
    assert max_batch(DEEPSEEK_V3, 141e9, 32768, devices=8) > 3 * max_batch(
        DEEPSEEK_V3, 141e9, 32768, devices=8, kv_per_token=kit_kv_bytes(v["GQA-8"], "bf16"))
    with pytest.raises(ConfigError, match="do not fit"):
        max_batch(DEEPSEEK_V3, node / 8, 4096, devices=1)


def test_moe_routes_like_transformers_deepseek_v3_moe():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_cfg = DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                              n_shared_experts=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                              num_hidden_layers=1, vocab_size=50)
    torch.manual_seed(0)
    block = DeepseekV3MoE(hf_cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.gate.e_score_correction_bias.normal_(0, 0.1)
    mine = MoE(MoEConfig.from_hf(hf_cfg)).load_hf_block(block)
    x = torch.randn(2, 9, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ref, out = block(x), mine(x2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)
    # node-limited: every token's experts lie in at most topk_group = 2 of the 4 groups
    groups = mine.last_routing.experts // 4
    assert max(len(set(row.tolist())) for row in groups) <= 2


def test_selection_bias_changes_the_choice_not_the_weights():
    torch.manual_seed(0)
    x, w = torch.randn(50, 8), torch.randn(4, 8)
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0])
    r = route(x, w, 1, norm_topk_prob=False, score="sigmoid", bias=bias)
    assert (r.experts == 0).all()
    torch.testing.assert_close(r.weights[:, 0], torch.sigmoid(x @ w.T)[:, 0])
    with pytest.raises(ShapeError, match="one per expert"):
        route(x, w, 1, bias=torch.zeros(3))
    with pytest.raises(ConfigError, match="not divisible by num_groups"):
        MoEConfig(8, 8, 6, 2, num_groups=4)
    with pytest.raises(ConfigError, match="rate"):
        update_selection_bias(torch.zeros(4), r.experts, -1.0)


def test_bias_update_moves_toward_balance():
    bias = torch.zeros(4)
    load = update_selection_bias(bias, torch.tensor([[0, 1], [0, 2], [0, 1]]), 0.1)
    assert load.tolist() == [3, 2, 1, 0]
    torch.testing.assert_close(bias, torch.tensor([-0.1, -0.1, 0.1, 0.1]))


# one_thread: tests/conftest.py (every test runs on one intra-op thread)
def test_bias_balancing_reduces_imbalance_on_the_tiny_moe(one_thread):
    """The bundled tiny MoE, weights frozen: only the selection bias moves, and the load evens out."""
    g = torch.Generator().manual_seed(0)
    batches = torch.randint(0, 4096, (4, 8, 32), generator=g)
    model = tiny_moe_model(selection_bias=True).eval()
    trace = calibrate_bias(model, batches, rate=0.01, rounds=40)
    assert sum(trace[-8:]) / 8 < trace[0] - 0.15, trace
    with pytest.raises(ConfigError, match="selection_bias=True"):
        calibrate_bias(tiny_moe_model(selection_bias=False), batches, 0.01, 1)


def test_train_balancing_runs_each_strategy_and_checks_input(one_thread):
    g = torch.Generator().manual_seed(0)
    batches = torch.randint(0, 4096, (2, 2, 16), generator=g)
    for strategy in ("none", "aux_loss", "bias"):
        log = train_balancing(batches, strategy, 2, start="checkpoint", eval_batch=batches[0])
        assert len(log["loss"]) == len(log["imbalance"]) == 2 and log["eval_loss"] > 0
    model = log["model"]
    assert any(m.e_score_correction_bias.abs().sum() > 0 for m in model.modules() if isinstance(m, MoE))
    with pytest.raises(ConfigError, match="strategy"):
        train_balancing(batches, "magic", 1)
    with pytest.raises(ConfigError, match="token ids"):
        train_balancing(batches + 5000, "none", 1)


def test_imbalance_and_node_limited_dispatch():
    assert imbalance(torch.tensor([[0, 1], [2, 3]]), 4) == 1.0
    assert imbalance(torch.tensor([[0, 1], [0, 1]]), 4) == 2.0
    free = dispatch_bytes(256, 8, 8, None, tokens=2000)
    limited = dispatch_bytes(256, 8, 8, 4, tokens=2000)
    assert limited["max_nodes_per_token"] <= 4 < free["max_nodes_per_token"]
    assert limited["bytes_per_token_dedup"] < free["bytes_per_token_dedup"] < free["bytes_per_token_per_expert"]


def test_mtp_speedup_near_the_reported_one():
    r = mtp_speedup(0.85, DEEPSEEK_V3)
    assert 0 < r["c"] < 0.05 and 1.75 < r["speedup"] < 1.85      # the report: 1.8x TPS


def test_flops_per_token_equal_flop_counter_on_a_small_transformers_model():
    """One token through transformers' DeepSeek-V3 (the experts' eager loop, so every matmul is counted):
    FlopCounterMode's matmul FLOPs equal the estimator's (2 x the activated matmul parameters + attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import DeepseekV3ForCausalLM

    mla = MLAConfig(32, 2, 16, 8, 8, 4, 8)
    shape = DeepSeekV3Shape(vocab_size=50, hidden_size=32, num_layers=3, first_dense=1, dense_intermediate=48, mla=mla,
                            moe=MoEConfig(32, 16, 8, 2, shared_expert_size=16, score="sigmoid", num_groups=2,
                                          topk_groups=1, shared_expert_gated=False, selection_bias=True), num_mtp=0)
    hf_cfg = shape.to_hf()
    hf_cfg._attn_implementation, hf_cfg._experts_implementation = "eager", "eager"
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.tensor([[3]]))
    f = forward_flops_per_token(shape, context=1)          # the token attends to itself
    assert counter.get_total_flops() == f["total"]
    with pytest.raises(ConfigError, match="context"):
        forward_flops_per_token(shape, context=-1)


def test_bad_shapes_and_serving_inputs_are_refused():
    from llmsys_lab.deepseek.serving import disaggregated, gpu_weight_bytes
    from llmsys_lab.estimators.roofline import get_gpu

    with pytest.raises(ConfigError, match="first_dense"):
        DEEPSEEK_V3.replace(first_dense=62)
    with pytest.raises(ConfigError, match="hidden_size"):
        DEEPSEEK_V3.replace(hidden_size=4096)
    with pytest.raises(ConfigError, match="ep = 3"):
        gpu_weight_bytes(DEEPSEEK_V3, 4, 3)
    with pytest.raises(ConfigError, match="mfu"):
        disaggregated(DEEPSEEK_V3, get_gpu("H100-SXM"), mfu=1.5)
    with pytest.raises(ConfigError, match="seq_len"):
        max_batch(DEEPSEEK_V3, 141e9, 0, devices=8)
    from transformers import LlamaConfig

    with pytest.raises(ConfigError, match="deepseek_v3"):
        DeepSeekV3Shape.from_hf(LlamaConfig())
    with pytest.raises(ConfigError, match="rope_type"):
        MLAConfig.from_hf(MLAConfig().to_hf(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0,
                                                              "original_max_position_embeddings": 4096}))


def test_shape_round_trips_through_the_transformers_config():
    assert DeepSeekV3Shape.from_hf(DEEPSEEK_V3.to_hf(), name="deepseek-v3") == DEEPSEEK_V3


def test_hf_cache_kwargs_names_the_keyword_this_transformers_takes():
    """An unknown keyword would vanish into the module's **kwargs and the cache would silently not be used."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    attn, _ = hf_attention(SMALL, seed=1)
    [(name, value)] = hf_cache_kwargs(attn, "the cache").items()
    assert value == "the cache" and name in __import__("inspect").signature(DeepseekV3Attention.forward).parameters

    class NoCache(torch.nn.Module):
        def forward(self, x, **kwargs):
            return x
    with pytest.raises(TypeError, match="NoCache.forward takes none of cache / past_key_values"):
        hf_cache_kwargs(NoCache(), None)
