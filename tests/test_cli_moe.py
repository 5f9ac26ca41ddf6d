"""`python -m llmsys_lab estimate` with the MoE presets: total and active parameters against transformers'
own models (built on the meta device), FLOPs per token against the 2-FLOPs-per-active-weight rule, weight and
KV memory from the published shapes, and clear errors for what the MoE report does not estimate."""
import json

import pytest
import torch

from llmsys_lab.__main__ import main
from llmsys_lab.estimators.moe import MOE_PRESETS
from llmsys_lab.estimators.roofline import GPUS


def run(capsys, *args):
    code = main(["estimate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def hf_meta_model(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(MOE_PRESETS[name].to_hf())


@pytest.fixture(scope="module")
def mixtral_json(cli):
    out = cli("estimate", "mixtral-8x7b", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_mixtral_params_equal_transformers_model(mixtral_json):
    """Total = every parameter of transformers' MixtralForCausalLM; active = total minus the E - k experts a
    token does not run, counted from the real model's expert tensors."""
    hf = hf_meta_model("mixtral-8x7b")
    total = sum(p.numel() for p in hf.parameters())
    cfg = hf.config
    experts = sum(p.numel() for n, p in hf.named_parameters() if ".mlp.experts." in n)
    unused = experts * (cfg.num_local_experts - cfg.num_experts_per_tok) // cfg.num_local_experts
    p = mixtral_json["params"]
    assert p["total"] == total and p["active"] == total - unused
    assert round(p["total"] / 1e9, 1) == 46.7 and round(p["active"] / 1e9, 1) == 12.9   # Mixtral's paper: 47B / 13B
    assert mixtral_json["kind"] == "moe"
    assert mixtral_json["moe"]["num_experts"] == 8 and mixtral_json["moe"]["top_k"] == 2


def test_mixtral_memory_and_flops_per_token(mixtral_json):
    e = mixtral_json
    assert e["weights_bytes"] == 2 * e["params"]["total"]                    # bf16: every expert is stored
    assert e["active_weights_bytes"] == 2 * e["params"]["active"]
    assert e["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2                   # K and V, 32 layers, 8 K/V heads of 128
    assert e["kv_bytes_per_request"] == 4096 * e["kv_bytes_per_token"]
    assert e["max_batch_on_gpu"] == 0                                        # 87 GiB of weights > 80 GiB
    assert e["forward_flops_per_token"] == e["forward_flops"] / 4096
    assert sum(r["total"] for r in e["flop_table"]) == e["forward_flops"]
    # the slide's argument: a dense model of equal active compute (one SwiGLU of k * i) costs the same FLOPs
    # per token up to the router and the weighted combine (0.01%), with 3.6 times fewer parameters
    dense = e["dense_vs_moe"]
    assert dense["ratio"]["forward_flops_per_token"] == pytest.approx(1.0, rel=1e-3)
    assert dense["ratio"]["forward_flops_per_token"] > 1
    assert dense["ratio"]["params"] == pytest.approx(e["params"]["total"] / dense["dense"]["params"])
    assert set(e["not_estimated"]) and "parallel" in " ".join(e["not_estimated"])


def test_flops_per_token_follow_two_flops_per_active_weight(capsys):
    """One token, no context: a forward is 2 FLOPs per active weight it multiplies (all but the embedding
    lookup) plus element-wise work well under 1%."""
    for name in MOE_PRESETS:
        code, out, err = run(capsys, name, "--seq", "1", "--json")
        assert code == 0, err
        e = json.loads(out)
        matmul_weights = e["params"]["active"] - e["params"]["embedding"] - e["params"]["norms"]
        assert e["forward_flops_per_token"] == pytest.approx(2 * matmul_weights, rel=0.01), name


def test_qwen_moe_with_shared_expert_equals_transformers(capsys):
    code, out, err = run(capsys, "qwen1.5-moe-a2.7b", "--json", "--gpu", "H200", "--seq", "2048")
    assert code == 0, err
    e = json.loads(out)
    hf = hf_meta_model("qwen1.5-moe-a2.7b")
    assert e["params"]["total"] == sum(p.numel() for p in hf.parameters())
    assert round(e["params"]["total"] / 1e9, 1) == 14.3 and round(e["params"]["active"] / 1e9, 1) == 2.7   # "A2.7B"
    assert e["moe"]["shared_expert_size"] == 5632 and e["moe"]["norm_topk_prob"] is False
    kv = 2 * 24 * 16 * 128 * 2
    assert e["kv_bytes_per_token"] == kv
    assert e["max_batch_on_gpu"] == int((GPUS["H200"].memory - e["weights_bytes"]) // (kv * 2048))
    # a decode step of one sequence touches k experts per layer; a 2048-token prefill touches all of them
    assert e["experts_touched_per_layer"]["decode"] == pytest.approx(4)
    assert e["experts_touched_per_layer"]["prefill"] == pytest.approx(60)


def test_text_report_and_listing(capsys):
    code, out, err = run(capsys, "Mixtral-8x7B", "--gpu", "H200")       # names are case-insensitive
    assert code == 0, err
    for line in ("active / total = 0.276", "GFLOPs per token (active)", "all experts are stored",
                 "dense model of equal active compute", "not estimated for MoE presets"):
        assert line in out, line
    code, out, err = run(capsys, "--list")
    assert code == 0 and "MoE presets:" in out
    assert all(name in out for name in MOE_PRESETS) and "12.88 B active" in out


@pytest.mark.parametrize("flags", [("--tp", "2"), ("--pp", "2"), ("--dp", "4"), ("--zero", "1"),
                                   ("--micro-batches", "2")])
def test_parallel_flags_on_moe_preset_are_a_clear_error(capsys, flags):
    code, out, err = run(capsys, "mixtral-8x7b", *flags, "--json")
    assert code == 2 and out == ""
    assert "MoE preset" in err and "dense presets only" in err and "--tp/--pp/--dp" in err


def test_precision_on_moe_preset_is_a_clear_error(capsys):
    code, out, err = run(capsys, "qwen1.5-moe-a2.7b", "--precision", "fp32")
    assert code == 2 and "training memory" in err and "fp32" in err


def test_bad_preset_name_lists_dense_and_moe_presets(capsys):
    code, out, err = run(capsys, "mixtral-8x8b")
    assert code == 2 and out == ""
    assert "unknown model preset 'mixtral-8x8b'" in err and "Did you mean 'mixtral-8x7b'?" in err
    assert "llama-2-7b" in err and "qwen1.5-moe-a2.7b" in err


def test_dense_presets_keep_their_default_precision(capsys):
    code, out, err = run(capsys, "llama-2-7b", "--json", "--seq", "512")
    assert code == 0, err
    e = json.loads(out)
    assert e["precision"] == "mixed" and "kind" not in e


def test_expected_experts_touched_matches_sampled_uniform_routing():
    """E (1 - (1 - k/E)^B) against B tokens that each pick k distinct experts uniformly at random."""
    from llmsys_lab.estimators.moe import expected_experts_touched

    g = torch.Generator().manual_seed(0)
    for E, k, B in ((8, 2, 1), (8, 2, 3), (60, 4, 5), (60, 4, 16)):
        picks = torch.rand(4000, B, E, generator=g).argsort(-1)[..., :k]            # (trials, B, k)
        touched = torch.zeros(4000, E).scatter_(1, picks.reshape(4000, -1), 1.0).sum(1).mean()
        assert expected_experts_touched(E, k, B) == pytest.approx(float(touched), rel=0.02), (E, k, B)
    assert expected_experts_touched(8, 2, 0) == 0
    with pytest.raises(ValueError, match="tokens"):
        expected_experts_touched(8, 2, -1)


def test_decode_of_one_sequence_reads_only_the_active_weights():
    from llmsys_lab.estimators.memory import kv_bytes_per_token
    from llmsys_lab.estimators.moe import moe_decode_cost, moe_param_breakdown

    cfg = MOE_PRESETS["mixtral-8x7b"]
    cost = moe_decode_cost(cfg, 1, 1000, "bf16")
    active = moe_param_breakdown(cfg)["active"]
    assert cost.bytes == pytest.approx(2 * active + 1001 * kv_bytes_per_token(cfg.base, "bf16"))
    big = moe_decode_cost(cfg, 256, 1000, "bf16")                                    # 256 tokens touch all 8
    kv = 256 * 1001 * kv_bytes_per_token(cfg.base, "bf16")
    assert big.bytes == pytest.approx(2 * moe_param_breakdown(cfg)["total"] + kv)
