"""DDP with gradient hooks: equal to one process, overlapped with the backward pass, on real gloo ranks."""
import math

import pytest
import torch

from llmsys_lab.parallel import launch
from llmsys_lab.parallel.checks import run_checks
from llmsys_lab.parallel.ddp import DDP, make_buckets
from llmsys_lab.validate import ConfigError

SIZES = (None, 1e-4, 0.01, 1000.0)     # per parameter; buckets smaller than any parameter; ~8 KB; one bucket


@pytest.fixture(scope="module")
def two():
    return launch(run_checks, 2, args=(("ddp", "ddp_errors", "ddp_timeline"),
                                       {"ddp": {"bucket_sizes": SIZES},
                                        "ddp_timeline": {"bucket_size_mb": 1.0, "warmup": 1}}), timeout=300)


def test_ddp_equals_one_process_with_frozen_and_tied_parameters(two):
    for rank in two:
        d = rank["ddp"]
        for size in SIZES:
            r = d[size]
            assert r["broadcast_err"] == 0.0, size          # each rank built its own model; rank 0's won
            assert r["diff_vs_naive"] == 0.0, size          # bitwise the all-reduce-after-backward step
            assert r["max_param_diff"] < 1e-5, size         # fp32 sums over half batches, 3 AdamW steps
            assert r["tied"] and r["frozen_grads_none"], size
            assert torch.equal(r["frozen_value"], torch.full_like(r["frozen_value"], 2.0)), size
            assert sum(r["buckets"]) == d["trainable"], size   # every trainable parameter once (tied: once)
            assert sum(r["bucket_bytes"]) == r["grad_bytes"], size
            # every bucket launched its all-reduce inside the backward pass, in every step
            assert r["launched_in_backward"] == [len(r["buckets"])] * 3, size
            assert r["bytes_sent"] == 3 * r["grad_bytes"] * 2 * (2 - 1) / 2, size
        assert d[None]["buckets"] == [1] * d["trainable"]
        assert d[1e-4]["buckets"] == [1] * d["trainable"]       # each parameter alone exceeds the size
        assert d[1000.0]["buckets"] == [d["trainable"]]
        small = d[0.01]
        assert 1 < len(small["buckets"]) < d["trainable"]
        assert all(b <= 0.01 * 2**20 for b, n in zip(small["bucket_bytes"], small["buckets"]) if n > 1)


def test_a_second_backward_before_finishing_fails_clearly(two):
    for rank in two:
        assert "call it after every loss.backward()" in rank["ddp_errors"]["double_backward"]


def test_a_parameter_no_rank_uses_keeps_no_gradient_and_its_bucket_is_still_sent(two):
    for rank in two:
        r = rank["ddp_errors"]
        assert r["unused_buckets"] == 1 and r["unused_pending"] == [4]    # 4 of 6 gradients arrived
        assert r["unused_grads_none"]
        assert r["unused_used_err"] < 1e-6


def test_buckets_are_sent_while_the_backward_pass_runs(two):
    for rank in two:
        t = rank["ddp_timeline"]
        buckets = sorted(t["buckets"], key=lambda b: b["bucket"])
        assert len(buckets) > 3
        for b in buckets:
            assert t["forward_end"] <= b["launched"] <= b["done"] <= t["sync_end"]
            assert b["launched"] <= t["backward_end"]            # launched by a hook, not after backward
        launches = [b["launched"] for b in buckets]
        assert launches == sorted(launches)                      # reverse registration order = backward order
        # the first buckets were complete before the backward pass ended: communication overlapped it
        assert buckets[0]["done"] < t["backward_end"]


def _params(*sizes, dtype=torch.float32):
    return [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in sizes]


def test_buckets_fill_in_reverse_order_and_flush_the_last_partial_one():
    ps = _params(1000, 10, 100_000, 5000, 300)              # fp32: 4000, 40, 400000, 20000, 1200 bytes
    mb = 21300 / 2**20
    buckets = make_buckets(ps, mb)
    assert [[p.numel() for p in b] for b in buckets] == [[300, 5000], [100_000], [10, 1000]]
    assert [[p.numel() for p in b] for b in make_buckets(ps, None)] == [[300], [5000], [100_000], [10], [1000]]
    assert [len(b) for b in make_buckets(ps, 1.0)] == [5]
    mixed = _params(10) + _params(10, dtype=torch.float64) + _params(10)
    assert [len(b) for b in make_buckets(mixed, 1.0)] == [1, 1, 1]   # one dtype per flat buffer


def test_ddp_refuses_bad_arguments():
    import torch.distributed as dist

    m = torch.nn.Linear(2, 2)
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="bucket_size_mb"):
            DDP(m, bucket_size_mb=bad)
    with pytest.raises(TypeError, match="bucket_size_mb must be a number"):
        DDP(m, bucket_size_mb="25")
    with pytest.raises(TypeError, match="DDP wraps a torch.nn.Module, got function"):
        DDP(lambda x: x)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group"):
        DDP(m, bucket_size_mb=25)


def test_measurement_helpers_refuse_bad_arguments_before_starting():
    from llmsys_lab.parallel.overlap import ddp_timeline, time_bucket_sizes

    with pytest.raises(ConfigError, match="bucket_size_mb must be > 0"):
        ddp_timeline(bucket_size_mb=0)
    with pytest.raises(ConfigError, match="steps must be an int >= 1"):
        time_bucket_sizes(steps=0)
    with pytest.raises(TypeError, match="warmup must be an int"):
        time_bucket_sizes(warmup=1.5)
