"""Expert and tensor parallelism of one MoE layer on gloo ranks, against the single-process layer."""
import pytest
import torch

from llmsys_lab.moe import MoE, MoEConfig
from llmsys_lab.parallel.expert_parallel import (ExpertParallelMoE, TensorParallelMoE, check_moe_parallel, compare_ep_tp,
                                                 ep_bytes, tp_moe_bytes)
from llmsys_lab.parallel.launcher import launch
from llmsys_lab.validate import ConfigError


@pytest.fixture(scope="module")
def two_ranks():
    return launch(check_moe_parallel, world_size=2, timeout=120)


def test_expert_parallel_equals_single_process(two_ranks):
    for out in two_ranks:
        ep = out["ep"]
        errs = {k: v for k, v in ep.items() if k.endswith("_err")}
        assert len(errs) == 5 and max(errs.values()) < 1e-5, errs


def test_tensor_parallel_moe_equals_single_process(two_ranks):
    for out in two_ranks:
        errs = {k: v for k, v in out["tp"].items() if k.endswith("_err")}
        assert len(errs) == 4 and max(errs.values()) < 1e-5, errs


def test_bytes_counted_match_the_formulas(two_ranks):
    for out in two_ranks:
        ep, tp = out["ep"], out["tp"]
        a2a = sum(v for k, v in ep["bytes"].items() if k.startswith("ep_dispatch") or k.startswith("ep_combine"))
        assert a2a == pytest.approx(ep["bytes_expected"])
        assert ep["calls"]["ep_dispatch"] == ep["calls"]["ep_combine"] == 1          # forward
        assert ep["calls"]["ep_dispatch_backward"] == ep["calls"]["ep_combine_backward"] == 1
        assert 0 < ep["assignments"] <= 4 * ep["capacity"]                           # E = 4 rows of C
        tp_main = tp["bytes"]["tp_all_reduce_forward"] + tp["bytes"]["tp_all_reduce_backward"]
        assert tp_main == pytest.approx(tp["bytes_expected"])
        assert tp["calls"]["tp_all_reduce_forward"] == 1 and tp["calls"]["tp_router_grad_all_reduce"] == 2
    assert ep_bytes(8, 10, 16, 2) == 4 * 0.5 * 8 * 10 * 16 * 4
    assert tp_moe_bytes(24, 16, 2) == 2 * 1.0 * 24 * 16 * 4


def test_bad_sharding_is_named():
    moe = MoE(MoEConfig(16, 24, 6))
    with pytest.raises(ConfigError, match="num_experts = 6 is not divisible by the expert-parallel world size 4"):
        ExpertParallelMoE(moe, 0, 4)
    with pytest.raises(ConfigError, match="intermediate_size = 24 is not divisible by the tensor-parallel degree 5"):
        TensorParallelMoE(moe, 0, 5)
    with pytest.raises(ConfigError, match="dropless"):
        ExpertParallelMoE(MoE(MoEConfig(16, 24, 6, capacity_factor=1.0)), 0, 2)
    with pytest.raises(TypeError, match="expected a llmsys_lab.moe.MoE"):
        ExpertParallelMoE(torch.nn.Linear(2, 2), 0, 2)


def test_compare_ep_tp_for_mixtral():
    cfg = MoEConfig(4096, 14336, 8, 2)
    out = compare_ep_tp(cfg, tokens=8192, world=8)
    # EP: 1024 tokens per rank, 2 choices, 8 experts -> C = 256 rows per expert; 4 all-to-alls of (8, 256, 4096)
    assert out["ep"]["capacity"] == 256
    assert out["ep"]["bytes"] == 4 * 7 / 8 * 8 * 256 * 4096 * 2
    # TP: 2 all-reduces of all 8192 tokens x 4096 features: N / k = 4x the bytes of EP
    assert out["tp"]["bytes"] == 2 * 2 * 7 / 8 * 8192 * 4096 * 2
    assert out["tp"]["bytes"] / out["ep"]["bytes"] == pytest.approx(8 / 2)
    assert out["tp"]["gemm"] == (2048, 4096, 1792) and out["ep"]["gemm"] == (2048, 4096, 14336)
    with pytest.raises(ConfigError, match="tokens = 8192 must split evenly over 3 ranks"):
        compare_ep_tp(cfg, 8192, 3)
    with pytest.raises(ConfigError, match="num_experts = 8 is not divisible"):
        compare_ep_tp(cfg, 8192, 16)
