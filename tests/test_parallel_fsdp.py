"""FSDP (ZeRO-3) on real gloo ranks: equal to one process, one unit's weights whole at a time, 16/N bytes."""
import pytest
import torch

from llmsys_lab.parallel import launch
from llmsys_lab.parallel.fsdp import FSDP
from llmsys_lab.parallel.fsdp_checks import check_fsdp


@pytest.fixture(scope="module")
def fp32():
    return launch(check_fsdp, 2, timeout=300)


@pytest.fixture(scope="module")
def bf16():
    return launch(check_fsdp, 2, kwargs={"compute_dtype": "bfloat16"}, timeout=300)


def test_fsdp_equals_one_process_in_fp32_with_frozen_and_tied_parameters(fp32):
    for r in fp32:
        assert r["names_checked"]                         # every trainable parameter, the tied one once
        assert r["max_param_diff"] < 1e-5 and r["loss_diff"] < 1e-5
        assert torch.equal(r["frozen_value"], torch.full_like(r["frozen_value"], 2.0))
        assert r["tied"] and r["units"] == 5               # 4 blocks and the root


def test_weights_are_whole_one_unit_at_a_time_and_freed(fp32):
    for r in fp32:
        assert r["live_after"] == [(0, 0)] * 3             # nothing gathered survives a forward or a backward
        # at most the root's (embedding/LM head, needed at both ends) and one block's whole weights
        assert r["largest_layer_bytes"] < r["peak_gathered"] <= r["root_bytes"] + r["largest_layer_bytes"]


def test_settling_waits_for_released_buffers_but_keeps_counting_a_kept_one():
    import threading
    import weakref

    from llmsys_lab.parallel.fsdp import GatherStats

    stats = GatherStats()
    kept, released = torch.zeros(8), [torch.zeros(4)]
    for t in (kept, released[0]):
        stats.add(t.numel() * 4)
        weakref.finalize(t, stats.remove, t.numel() * 4)
    del t
    threading.Timer(0.05, released.clear).start()      # another thread lets go of its buffer a moment later
    assert stats.settled(timeout=0.5) == 32            # only the kept buffer (8 floats) stays counted
    assert stats.peak == 48


def test_bytes_per_rank_are_the_zero_3_tables(fp32):
    for r in fp32:
        est, got = r["estimate"], r["measured"]
        for part in ("weights", "gradients", "optimizer"):
            # whole shards of padded flat buffers: at most one element per unit and rank more than 1/N
            assert est[part] <= got[part] <= est[part] + r["units"] * 4 * (2 if part == "optimizer" else 1)
            assert got[part] < r["unsharded"][part]


def test_mixed_precision_bf16_compute_fp32_shards(bf16):
    for r in bf16:
        assert r["names_checked"] and r["measured"]["weights"] == bf16[0]["measured"]["weights"]
        # AdamW moves a weight by about lr = 1e-2 per step; a bf16 gradient of another sign costs up to 2 lr
        assert r["max_param_diff"] < 2 * 1e-2 * 3
        assert r["loss_diff"] < 0.25                       # bf16 logits: 8 bits of mantissa
        assert r["peak_gathered"] <= r["root_bytes"] + r["largest_layer_bytes"]   # half of fp32's bytes


def test_fsdp_refuses_bad_arguments():
    import torch.distributed as dist

    with pytest.raises(TypeError, match="FSDP wraps a torch.nn.Module, got int"):
        FSDP(3)
    for bad in ("bf16", torch.int8):
        with pytest.raises(TypeError, match="compute_dtype must be a floating torch.dtype"):
            FSDP(torch.nn.Linear(2, 2), compute_dtype=bad)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group"):
        FSDP(torch.nn.Linear(2, 2))
