"""Every strategy equals the single-device result, on real gloo process groups.

Starting ranks costs seconds, so one launch of 2 ranks and one of 3 run all the checks
(``llmsys_lab.parallel.checks``) and the tests read their results.
"""
import pytest
import torch

from llmsys_lab.validate import ConfigError

from llmsys_lab.parallel import launch
from llmsys_lab.parallel.checks import run_checks


@pytest.fixture(scope="module")
def two():
    return launch(run_checks, 2, timeout=300)


@pytest.fixture(scope="module")
def three():
    # 3 ranks: chunks and shards that do not divide evenly, and heads that do not divide by 3
    return launch(run_checks, 3, args=(("ring", "sequence_parallel", "bad_input", "zero"),
                                       {"sequence_parallel": {"heads": 6, "kv_heads": 3},
                                        "zero": {"batch_size": 6}}), timeout=300)


def test_ring_all_reduce_equals_all_reduce_and_sends_2_n_minus_1_over_n(two, three):
    for results in (two, three):
        for rank in results:
            for n, r in rank["ring"].items():
                assert r["err"] == 0.0 or r["err"] < 1e-12, n       # float64, the same sums in another order
                assert r["bytes_sent"] == r["bytes_formula"] or n % len(results), n
    # sizes that do not divide by 3: the bytes differ from the formula by less than one element per step
    for rank in three:
        for n, r in rank["ring"].items():
            assert abs(r["bytes_sent"] - r["bytes_formula"]) <= 2 * 2 * 8


def test_data_parallel_equals_single_process_training(two):
    for rank in two:
        dp = rank["data_parallel"]
        for name in ("all_reduce", "ring", "parameter_server"):
            assert dp[name]["max_param_diff"] < 1e-6, name          # fp32 sums in a different order
            assert dp[name]["loss_diff"] < 1e-6, name
        assert dp["all_reduce"]["bytes_sent"] == dp["grad_bytes"] * 2 * 1 / 2
        assert dp["ring"]["bytes_sent"] == dp["all_reduce"]["bytes_sent"]
    # parameter server: rank 0 sends N-1 parameter copies, a worker one gradient
    assert two[0]["data_parallel"]["parameter_server"]["bytes_sent"] == two[0]["data_parallel"]["grad_bytes"]


def test_sharded_optimizer_equals_the_unsharded_one_with_frozen_and_tied_parameters(two, three):
    """ZeRO-1 for AdamW (decoupled weight decay) and SGD with momentum: 10 steps, two param groups."""
    for results in (two, three):
        n = len(results)
        for name in ("adamw", "sgd-momentum"):
            for rank in results:
                z = rank["zero"][name]
                # the same averaged gradients through the unsharded optimizer: bitwise the same parameters
                assert z["diff_vs_unsharded_dp"] == 0.0, (n, name)
                # vs one process on the whole batch: fp32 sums in another order (1/3 is not exact in
                # binary), grown over 10 steps of lr 0.1 with momentum 0.9
                assert z["max_param_diff"] < (1e-5 if n == 2 else 2e-4), (n, name, z["max_param_diff"])
                assert z["tied"] and z["frozen_unchanged"]
                # the frozen norm at 2.0 stays 2.0 (the flat-buffer version decayed it to 2 * 0.99**10 = 1.8088)
                assert torch.equal(z["frozen_value"], torch.full_like(z["frozen_value"], 2.0))
            # every trainable parameter is owned by exactly one rank, and the shards are balanced
            shards = [rank["zero"][name]["shard_numel"] for rank in results]
            assert sum(shards) == results[0]["zero"][name]["trainable_params"]
            assert max(shards) - min(shards) <= results[0]["zero"][name]["largest_param"]
            # the state is sharded: the ranks together hold exactly the unsharded optimizer's state
            states = [rank["zero"][name]["state_bytes"] for rank in results]
            assert all(s > 0 for s in states)
            assert sum(states) == results[0]["zero"][name]["state_bytes_unsharded"] > 0
            assert max(states) < results[0]["zero"][name]["state_bytes_unsharded"]


def test_sharded_optimizer_refuses_what_is_not_an_optimizer_class():
    from llmsys_lab.parallel.zero import ShardedOptimizer

    params = [torch.nn.Parameter(torch.ones(2))]
    for bad in (torch.optim.AdamW(params), "adamw", torch.nn.Linear, None):
        with pytest.raises(TypeError, match="optimizer_class must be a torch.optim.Optimizer subclass"):
            ShardedOptimizer(params, bad, lr=0.1)


def test_sharded_optimizer_needs_a_process_group():
    import torch.distributed as dist

    from llmsys_lab.parallel.zero import ShardedOptimizer

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group"):
        ShardedOptimizer([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1)


def test_shards_are_whole_parameters_balanced_by_size():
    from llmsys_lab.parallel.zero import assign_shards

    # largest first, each to the least-loaded rank: 100 | 60, 50 | 10 -> rank 0 | 1 -> rank 0 | 1 -> rank 1
    assert assign_shards([100, 1, 60, 50, 1, 10], 2) == [0, 0, 1, 1, 1, 0]    # 111 elements each
    assert assign_shards([5], 3) == [0]
    with pytest.raises(ConfigError, match="world must be an int >= 1"):
        assign_shards([1, 2], 0)


def test_tensor_parallel_mlp_and_llama_block(two):
    for rank in two:
        tp = rank["tensor_parallel"]
        assert tp["mlp_forward_err"] < 1e-5 and tp["mlp_forward_all_reduces"] == 1
        assert tp["block_forward_err"] < 1e-5 and tp["block_input_grad_err"] < 1e-5
        assert max(tp["block_weight_grad_err"].values()) < 1e-5
        assert len(tp["block_weight_grad_err"]) == 9
        assert tp["block_calls"] == {"tp_all_reduce_forward": 2, "tp_all_reduce_backward": 2}
        assert tp["block_bytes_sent"] == tp["block_bytes_expected"]


def test_pipeline_schedules_equal_the_unsplit_model(two):
    for rank_id, rank in enumerate(two):
        for kind in ("gpipe", "1f1b"):
            r = rank["pipeline"][kind]
            assert r["grad_err"] < 1e-6 and r["n_params_checked"] > 0
            if rank_id == len(two) - 1:
                assert r["loss_err"] < 1e-6
            assert r["bytes_sent"] == rank["pipeline"]["bytes_expected"]
    assert two[0]["pipeline"]["1f1b"]["order"] == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1),
                                                    ("F", 3), ("B", 2), ("B", 3)]


def test_sequence_parallel_equals_full_attention(two, three):
    for results in (two, three):
        for rank in results:
            sp = rank["sequence_parallel"]
            for tag in ("full", "causal"):
                assert sp[f"ulysses_{tag}_err"] < 1e-5 and sp[f"ulysses_{tag}_grad_err"] < 1e-5
                assert sp[f"ring_{tag}_err"] < 1e-5 and sp[f"ring_{tag}_grad_err"] < 1e-5
                sent, expected = sp[f"ulysses_{tag}_bytes"]
                assert sent == expected
                sent, expected = sp[f"ring_{tag}_bytes"]
                assert sent == expected


def test_bad_input_fails_on_every_rank_with_a_clear_error(two, three):
    for results in (two, three):
        n = len(results)
        for rank in results:
            bad = rank["bad_input"]
            assert "ShapeError: ring_all_reduce's tensor must have the same shape" in bad["ring_mismatch"]
            assert f"rank {n - 1}: (5,)" in bad["ring_mismatch"]
            assert "ShapeError: x must have the same shape and dtype on every rank" in bad["shape_mismatch"]
            assert f"{n + 1} heads do not divide into {n} ranks" in bad["ulysses_heads"]
            assert "ShapeError: the local q shard must have the same shape" in bad["ring_attention_shards"]
            assert f"num_heads = {n + 1} is not divisible by the tensor-parallel degree {n}" in bad["tp_heads"]
            assert f"num_layers = {n + 1} is not divisible by the number of pipeline stages {n}" in bad["pp_layers"]
            assert ("ConfigError: DDP's module (parameter and buffer shapes, dtypes, requires_grad) must be the same "
                    f"on every rank; rank 0 has [((4, 4), 'torch.float32', True)") in bad["ddp_model"]
            assert f"rank {n - 1} has [((5, 4)" in bad["ddp_model"]
            assert "ConfigError: DDP's buckets (bucket_size_mb) must be the same on every rank" in bad["ddp_buckets"]
            assert "ConfigError: FSDP's module (parameter and buffer shapes" in bad["fsdp_model"]
            assert f"rank {n - 1} has [((3,), 'torch.float32', True)]" in bad["zero_params"]


def test_estimators_count_what_the_implementations_send(two):
    from llmsys_lab.estimators import param_count
    from llmsys_lab.parallel.data_parallel import tiny_config
    from llmsys_lab.parallel.estimate import ParallelPlan, estimate_parallel

    cfg = tiny_config()                                          # the checks' model, fp32
    dp = estimate_parallel(cfg, 4, 8, ParallelPlan(dp=2), "fp32")
    assert dp.params_per_device == param_count(cfg)
    assert dp.dp_bytes == two[0]["data_parallel"]["ring"]["bytes_sent"]
    zero = estimate_parallel(cfg, 4, 8, ParallelPlan(dp=2, zero=1), "fp32")
    # the estimate shards every element evenly; the implementation shards whole parameters, and the
    # checks' model ties one matrix and freezes two parameters: the ranks' states add up to the
    # estimate's for the trainable parameters, N times the per-rank figure
    z = [rank["zero"]["adamw"] for rank in two]
    trainable_share = z[0]["trainable_params"] / param_count(cfg)
    assert sum(r["state_bytes"] for r in z) == pytest.approx(2 * zero.optimizer * trainable_share, rel=1e-12)
    # check_tensor_parallel: one block, batch 2, 6 tokens
    tp = estimate_parallel(cfg.replace(num_layers=1), 2, 6, ParallelPlan(tp=2), "fp32")
    assert tp.tp_bytes == two[0]["tensor_parallel"]["block_bytes_sent"]
    # check_pipeline: batch 4 of 8 predicted tokens, 4 micro-batches, 2 stages: one boundary each
    pp = estimate_parallel(cfg, 4, 8, ParallelPlan(pp=2, micro_batches=4), "fp32")
    assert pp.pp_bytes == two[0]["pipeline"]["1f1b"]["bytes_sent"] == two[1]["pipeline"]["1f1b"]["bytes_sent"]
