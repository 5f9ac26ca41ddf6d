"""The MoE layer against transformers' sparse MoE blocks, dispatch paths, capacity, losses, model."""
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from llmsys_lab.moe import (MoE, MoEConfig, capacity, capacity_mask, load_balancing_loss, load_stats, mixtral_from_hf,
                            moe_llama, route, router_logits_of, router_z_loss)
from llmsys_lab.configs import ModelConfig
from llmsys_lab.validate import ConfigError, ShapeError

H, I, E = 16, 24, 8


def mixtral_config(**kw):
    base = dict(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                sliding_window=None)
    return MixtralConfig(**{**base, **kw})


def qwen_config(**kw):
    base = dict(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=20, num_experts=E,
                num_experts_per_tok=2, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64)
    return Qwen2MoeConfig(**{**base, **kw})


def random_init(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def compare_with_block(hf_block, hf_cfg, dispatch, tokens=(3, 7)):
    random_init(hf_block)
    ours = MoE(MoEConfig.from_hf(hf_cfg).replace(dispatch=dispatch)).load_hf_block(hf_block)
    x = torch.randn(*tokens, H, generator=torch.Generator().manual_seed(1))
    r = torch.randn(*tokens, H, generator=torch.Generator().manual_seed(2))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = hf_block(xa), ours(xb)
    (ya * r).sum().backward()
    (yb * r).sum().backward()
    out = {"forward": (ya - yb).abs().max().item(), "input_grad": (xa.grad - xb.grad).abs().max().item(),
           "router_grad": (hf_block.gate.weight.grad - ours.gate.weight.grad).abs().max().item()}
    gate_up = torch.cat([torch.stack([m.gate_proj.weight.grad for m in ours.experts]),
                         torch.stack([m.up_proj.weight.grad for m in ours.experts])], dim=1)
    out["experts_grad"] = max((hf_block.experts.gate_up_proj.grad - gate_up).abs().max().item(),
                              (hf_block.experts.down_proj.grad
                               - torch.stack([m.down_proj.weight.grad for m in ours.experts])).abs().max().item())
    if hasattr(hf_block, "shared_expert"):
        out["shared_grad"] = max((hf_block.shared_expert_gate.weight.grad
                                  - ours.shared_expert_gate.weight.grad).abs().max().item(),
                                 (hf_block.shared_expert.up_proj.weight.grad
                                  - ours.shared_expert.up_proj.weight.grad).abs().max().item())
    return out, ours


@pytest.mark.parametrize("dispatch", ["loop", "sorted"])
def test_equals_mixtral_block_forward_and_gradients(dispatch):
    cfg = mixtral_config()
    errs, ours = compare_with_block(MixtralSparseMoeBlock(cfg), cfg, dispatch)
    assert max(errs.values()) < 1e-5, errs
    # the slide: the k weights of every token are renormalised to sum to 1
    assert torch.allclose(ours.last_routing.weights.sum(-1), torch.ones(21))


@pytest.mark.parametrize("dispatch", ["loop", "sorted"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_equals_qwen2_moe_block_with_shared_expert(dispatch, norm_topk_prob):
    cfg = qwen_config(norm_topk_prob=norm_topk_prob)
    errs, ours = compare_with_block(Qwen2MoeSparseMoeBlock(cfg), cfg, dispatch)
    assert set(errs) >= {"shared_grad"} and max(errs.values()) < 1e-5, errs
    sums = ours.last_routing.weights.sum(-1)
    # Qwen2-MoE's default: the top-k probabilities as they are, summing to less than 1
    assert (torch.allclose(sums, torch.ones_like(sums)) if norm_topk_prob else bool((sums < 0.999).all()))


def test_the_conventions_really_differ():
    """Same weights, the other convention: the outputs differ (the tests above can tell them apart)."""
    cfg = qwen_config()
    block = random_init(Qwen2MoeSparseMoeBlock(cfg))
    x = torch.randn(2, 5, H)
    wrong = MoE(MoEConfig.from_hf(cfg).replace(norm_topk_prob=True)).load_hf_block(block)
    assert (wrong(x) - block(x)).abs().max() > 1e-3


def test_three_token_shapes_and_top1():
    cfg = MoEConfig(H, I, E, top_k=1)
    torch.manual_seed(0)
    moe = MoE(cfg)
    x = torch.randn(37, H)
    assert torch.allclose(moe(x, "loop"), moe(x, "sorted"), atol=1e-6)
    assert torch.allclose(moe(x.view(1, 37, H), "sorted").view(37, H), moe(x, "loop"), atol=1e-6)
    # top-1 renormalised: weight 1, the output is exactly the chosen expert's
    e = moe.last_routing.experts[0, 0]
    assert torch.allclose(moe(x[:1]), moe.experts[e](x[:1]), atol=1e-6)


def test_capacity_drops_later_tokens_and_they_pass_the_residual_unchanged():
    cfg = MoEConfig(H, I, 4, top_k=1, capacity_factor=1.0)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[2, 0] = 10.0             # every token with x[0] > 0 prefers expert 2
    x = torch.randn(16, H)
    x[:, 0] = 1.0                                # all 16 tokens want expert 2, capacity = 16 * 1 / 4 = 4
    assert capacity(16, 4, 1, 1.0) == 4
    for dispatch in ("loop", "sorted"):
        y = moe(x, dispatch)
        kept = moe.last_routing.kept[:, 0]
        assert kept.tolist() == [True] * 4 + [False] * 12          # first come, first served
        assert torch.equal(y[4:], torch.zeros(12, H))              # dropped: zero expert output ...
        h = x + y                                                  # ... so the residual carries x unchanged
        assert torch.equal(h[4:], x[4:])
        assert torch.allclose(y[:4], moe.experts[2](x[:4]), atol=1e-6)
    stats = load_stats(moe.last_routing, 4)
    assert stats["routed"] == [0, 0, 16, 0] and stats["kept"] == [0, 0, 4, 0] and stats["dropped"][2] == 12
    assert stats["tokens_fully_dropped"] == 12 and stats["imbalance"] == 4.0


def test_capacity_mask_counts_first_choices_before_second():
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])
    assert capacity_mask(experts, 2, 2).tolist() == [[True, True], [True, True], [False, False]]
    assert capacity_mask(experts, 2, 1).tolist() == [[True, True], [False, False], [False, False]]


def test_no_capacity_limit_drops_nothing_and_a_large_factor_changes_nothing():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(H, I, E))
    x = torch.randn(40, H)
    y = moe(x)
    big = MoE(moe.config.replace(capacity_factor=float(E)))
    big.load_state_dict(moe.state_dict())
    assert torch.equal(big(x), y) and bool(big.last_routing.kept.all())


def test_load_balancing_loss_equals_transformers():
    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(30, E, generator=g) * 2 for _ in range(3))
    for k in (1, 2):
        ref = load_balancing_loss_func(layers, E, k)
        assert torch.allclose(load_balancing_loss(layers, k, E), ref, atol=1e-6)
    # uniform router: f_i = k/E, P_i = 1/E -> loss = k (its minimum); one-hot routing to one expert is E
    assert torch.allclose(load_balancing_loss(torch.zeros(10, E), 1), torch.tensor(1.0))
    skew = torch.zeros(10, E)
    skew[:, 3] = 100.0
    assert torch.allclose(load_balancing_loss(skew, 1), torch.tensor(float(E)))


def test_router_z_loss_is_st_moe_and_penalises_large_logits():
    logits = torch.randn(20, E)
    ref = (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()
    assert torch.allclose(router_z_loss(logits), ref)
    assert router_z_loss(10 * logits) > router_z_loss(logits)


def test_losses_have_gradients_for_the_router():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(H, I, E))
    moe(torch.randn(12, H))
    (load_balancing_loss(moe.last_routing.logits, 2) + 1e-3 * router_z_loss(moe.last_routing.logits)).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_moe_llama_equals_transformers_mixtral():
    torch.manual_seed(0)
    hf = MixtralForCausalLM(mixtral_config(rope_theta=10000.0)).eval()
    random_init(hf, seed=3)
    with torch.no_grad():                        # keep the logits in a sane range
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
    ours = mixtral_from_hf(hf)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    out = hf(ids, output_router_logits=True)
    logits = ours(ids)
    assert (out.logits - logits).abs().max() < 1e-4
    mine = router_logits_of(ours)
    assert len(mine) == 2 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(mine, out.router_logits))
    assert torch.allclose(load_balancing_loss(mine, 2), load_balancing_loss_func(out.router_logits, E, 2), atol=1e-6)
    assert torch.allclose(load_balancing_loss(mine, 2), out.aux_loss, atol=1e-6)      # what the model adds to its loss


@pytest.mark.parametrize("kw, msg", [
    (dict(top_k=9), "top_k = 9 is more than num_experts = 8"),
    (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
    (dict(capacity_factor=-1.0), "capacity_factor must be > 0"),
    (dict(num_experts=0), "num_experts must be a positive int"),
    (dict(dispatch="fast"), "dispatch must be one of"),
    (dict(shared_expert_size=-1), "shared_expert_size"),
])
def test_bad_config_is_named(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        MoEConfig(**{**dict(hidden_size=H, intermediate_size=I, num_experts=E), **kw})


def test_bad_input_is_named():
    moe = MoE(MoEConfig(H, I, E))
    with pytest.raises(ShapeError, match="x has 5 features"):
        moe(torch.randn(3, 5))
    with pytest.raises(ConfigError, match="dispatch must be one of"):
        moe(torch.randn(3, H), "fast")
    with pytest.raises(ConfigError, match="top_k = 9 is more than the 8 experts"):
        route(torch.randn(3, H), moe.gate.weight, 9)
    with pytest.raises(ConfigError, match="top_k = 9"):
        load_balancing_loss(torch.randn(3, E), 9)
    with pytest.raises(ShapeError, match="num_experts says 4"):
        load_balancing_loss(torch.randn(3, E), 2, 4)
    with pytest.raises(ConfigError, match="hidden_size = 8 but the model's is 16"):
        moe_llama(ModelConfig(16, 1, 4, 32, 64), MoEConfig(8, I, E))
    with pytest.raises(ConfigError, match="sliding window"):
        mixtral_from_hf(MixtralForCausalLM(mixtral_config(sliding_window=4, num_hidden_layers=1)))


# ---- estimators ------------------------------------------------------------------------------
from llmsys_lab.estimators.flop_counter import count_model_flops  # noqa: E402
from llmsys_lab.estimators.moe import (MOE_PRESETS, MoEModelConfig, dense_vs_moe, format_dense_vs_moe,  # noqa: E402
                                       moe_forward_flops, moe_param_breakdown)


@pytest.mark.parametrize("name", list(MOE_PRESETS))
def test_moe_param_counts_equal_transformers_meta_models(name):
    from transformers import AutoModelForCausalLM

    cfg = MOE_PRESETS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg.to_hf())
    parts = moe_param_breakdown(cfg)
    assert parts["total"] == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert experts == cfg.base.num_layers * cfg.moe.num_experts * 3 * cfg.moe.hidden_size * cfg.moe.intermediate_size
    active_expert_params = experts * cfg.moe.top_k // cfg.moe.num_experts
    assert parts["active"] == parts["total"] - experts + active_expert_params


def test_mixtral_8x7b_known_counts():
    parts = moe_param_breakdown(MOE_PRESETS["mixtral-8x7b"])
    assert parts["total"] == 46_702_792_704                   # "47B" on the model card
    assert round(parts["active"] / 1e9, 1) == 12.9            # "uses 13B active parameters per token"


SMALL = {
    "mixtral": MoEModelConfig(ModelConfig(16, 2, 4, 32, 64, num_kv_heads=2, max_position_embeddings=64),
                              MoEConfig(16, 24, 8, 2), arch="mixtral"),
    "qwen2_moe": MoEModelConfig(ModelConfig(16, 2, 4, 32, 64, num_kv_heads=2, max_position_embeddings=64),
                                MoEConfig(16, 12, 6, 3, norm_topk_prob=False, shared_expert_size=20),
                                qkv_bias=True, arch="qwen2_moe"),
}


@pytest.mark.parametrize("arch", list(SMALL))
def test_moe_matmul_flops_equal_flop_counter_mode_on_a_real_model(arch):
    from transformers import AutoModelForCausalLM

    cfg = SMALL[arch]
    torch.manual_seed(0)
    # transformers 5 runs the experts through a grouped-matmul custom op by default, which FlopCounterMode
    # does not see; its "eager" experts loop uses plain matmuls, and the FLOPs are the same
    model = AutoModelForCausalLM.from_config(cfg.to_hf(), attn_implementation="eager",
                                             experts_implementation="eager").eval()
    assert sum(p.numel() for p in model.parameters()) == moe_param_breakdown(cfg)["total"]
    ids = torch.randint(0, 64, (2, 7))
    counted = count_model_flops(model, ids)
    assert counted["model"] == moe_forward_flops(cfg, 2, 7, matmul_only=True)


def test_dense_vs_moe_is_the_slides_argument():
    table = dense_vs_moe(MOE_PRESETS["mixtral-8x7b"])
    r = table["ratio"]
    # same compute per token (the router adds 2hE per layer: under 0.1%), ~3.6x the parameters and memory
    assert 1.0 < r["forward_flops_per_token"] < 1.001
    assert r["active_params"] == pytest.approx(1.0, abs=1e-3)
    assert 3.5 < r["params"] < 3.7 and r["weight_GB"] == pytest.approx(r["params"])
    # the MLP parameters grow by exactly E/k = 4 (plus the router)
    assert r["mlp_params"] == pytest.approx(4.0, rel=1e-3)
    assert "forward_flops_per_token" in format_dense_vs_moe(table)


def test_moe_model_config_bad_input():
    base = ModelConfig(16, 2, 4, 32, 64)
    with pytest.raises(ConfigError, match="moe.hidden_size = 8 but base.hidden_size = 16"):
        MoEModelConfig(base, MoEConfig(8, 24, 8))
    with pytest.raises(ConfigError, match="Qwen2-MoE has a shared expert"):
        MoEModelConfig(base, MoEConfig(16, 24, 8), arch="qwen2_moe")
    with pytest.raises(ConfigError, match="arch must be"):
        MoEModelConfig(base, MoEConfig(16, 24, 8), arch="deepseek")


# ---- the Triton grouped GEMM (interpreter on a CPU) ------------------------------------------
from llmsys_lab.kernels.moe_grouped_gemm import grouped_gemm, grouped_gemm_reference, tile_schedule  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_gemm_matches_per_group_matmuls(device, dtype):
    counts = torch.tensor([5, 0, 17, 1, 0, 9])                  # empty groups, partial tiles
    g = torch.Generator().manual_seed(0)
    x = torch.randn(int(counts.sum()), 24, generator=g).to(device, dtype)
    w = torch.randn(6, 20, 24, generator=g).to(device, dtype)
    y = grouped_gemm(x, w, counts, block_m=16, block_n=16, block_k=16)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), grouped_gemm_reference(x.float(), w.float(), counts), atol=tol, rtol=tol)


def test_tile_schedule_covers_each_slice_once():
    group, row, offsets = tile_schedule(torch.tensor([5, 0, 17]), 8)
    assert group.tolist() == [0, 2, 2, 2] and row.tolist() == [0, 5, 13, 21] and offsets.tolist() == [0, 5, 5, 22]


def test_triton_dispatch_equals_sorted_and_is_forward_only(device):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(H, I, E, shared_expert_size=16)).to(device)     # the kernel runs where Triton compiles
    x = torch.randn(29, H, device=device)
    with torch.no_grad():
        assert torch.allclose(moe(x, "triton"), moe(x, "sorted"), atol=1e-4)
    with pytest.raises(ConfigError, match="forward-only"):
        moe(x, "triton")


@pytest.mark.parametrize("args, err, msg", [
    ((torch.randn(4, 8), torch.randn(2, 6, 7), torch.tensor([2, 2])), ValueError, "K = 8 columns but w has K = 7"),
    ((torch.randn(4, 8), torch.randn(2, 6, 8), torch.tensor([2, 1])), ValueError, "sum to the 4 rows"),
    ((torch.randn(4, 8), torch.randn(2, 6, 8), torch.tensor([2., 2.])), ValueError, "integer row counts"),
    ((torch.randn(4, 8), torch.randn(2, 6, 8).half(), torch.tensor([2, 2])), TypeError, "share a float16"),
    ((torch.randn(4, 8, 1), torch.randn(2, 6, 8), torch.tensor([2, 2])), ValueError, "x must be"),
])
def test_grouped_gemm_bad_input(args, err, msg):
    with pytest.raises(err, match=msg):
        grouped_gemm(*args)


def test_a_token_that_loses_one_choice_keeps_the_other_at_its_weight():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(H, I, E, top_k=2, capacity_factor=0.25))   # capacity ceil(0.25 * 12 * 2 / 8) = 1
    x = torch.randn(12, H)
    for dispatch in ("loop", "sorted"):
        y = moe(x, dispatch)
        r = moe.last_routing
        partial = torch.where(r.kept.sum(-1) == 1)[0]
        assert len(partial) > 0
        n = int(partial[0])
        j = int(torch.where(r.kept[n])[0])
        expected = r.weights[n, j] * moe.experts[int(r.experts[n, j])](x[n:n + 1])[0]
        assert torch.allclose(y[n], expected, atol=1e-6)
