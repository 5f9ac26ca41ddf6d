"""Lesson 06's PyTorch pieces (online softmax, tiled attention, traffic model), the step kernels and the tiling view."""
import pytest
import torch
import torch.nn.functional as F

from llmsys_lab.flash import (block_stats, flash_attention_torch, hbm_traffic, merge_stats, naive_softmax,
                              online_softmax, standard_attention)
from llmsys_lab.kernels.flash_steps import kernel_source, run_step, step2_loop
from llmsys_lab.validate import ConfigError
from llmsys_lab.viz.tiling_view import TilingView


def test_two_block_merge_equals_whole_vector_stats():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(2, 9, generator=g, dtype=torch.float64) * 10
        m1, l1 = block_stats(x[:, :4])
        m2, l2 = block_stats(x[:, 4:])
        m, l = merge_stats(m1, l1, m2, l2)
        mx, lx = block_stats(x)
        torch.testing.assert_close(m, mx)
        torch.testing.assert_close(l, lx)


def test_safe_and_online_softmax():
    x = torch.tensor([1000.0, 1.0, 2.0])
    assert torch.isnan(naive_softmax(x)).any()
    x = torch.randn(3, 37, generator=torch.Generator().manual_seed(1)) * 20
    for block in (1, 4, 16, 37, 100):
        sm, history = online_softmax(x, block)
        torch.testing.assert_close(sm, torch.softmax(x, -1))
        assert len(history) == -(-37 // block)
    with pytest.raises(ConfigError, match="block must be positive"):
        online_softmax(x, 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("m,n,bm,bn", [(64, 64, 16, 16), (50, 50, 32, 16), (20, 70, 8, 32), (45, 20, 16, 8)])
def test_tiled_pytorch_flash_matches_reference(causal, m, n, bm, bn):
    g = torch.Generator().manual_seed(m + n)
    q = torch.randn(2, 3, m, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64) for _ in range(2))
    out = flash_attention_torch(q, k, v, causal, bm, bn)
    ref = standard_attention(q, k, v, causal)
    ref = torch.nan_to_num(ref)          # rows that see no key: 0 by the kit's convention
    torch.testing.assert_close(out, ref)


def test_trace_records_every_tile_and_skips_above_the_diagonal():
    trace = []
    q = torch.randn(1, 1, 8, 4, dtype=torch.float64)
    flash_attention_torch(q, q, q, True, 2, 2, trace=trace)
    assert len(trace) == 16 and sum(t.skipped for t in trace) == 6 and sum(t.masked for t in trace) == 4
    assert all(t.skipped == (t.k_block > t.q_block) for t in trace)


def test_traffic_model():
    std = hbm_traffic(1024, 64, bytes_per_el=2)
    assert std.total == 2 * (4 * 1024 * 1024 + 4 * 1024 * 64)
    fl = hbm_traffic(1024, 64, bytes_per_el=2, block_m=128)
    assert fl.total == 2 * (1024 * 64 * 2 + 2 * 1024 * 64 * 8)


@pytest.mark.parametrize("step,n,causal", [(1, 64, False), (2, 128, False), (3, 128, True), (4, 100, False), (4, 77, True)])
def test_step_kernels(device, step, n, causal):
    g = torch.Generator().manual_seed(step)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g).to(device) for _ in range(3))
    out = run_step(step, q, k, v, causal=causal)
    if step == 3:
        out, tiles = out
        assert tiles[0].tolist() == list(range(1, n // 32 + 1))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    tol = 5e-3 if device.type == "cuda" else 1e-5          # fp32 tl.dot is TF32 on GPUs
    assert (out - ref).abs().max().item() < tol


def test_step_kernel_errors_and_source():
    z = torch.zeros(1, 1, 100, 16)
    with pytest.raises(ValueError, match="multiple of the tiles"):
        run_step(2, z, z, z)
    with pytest.raises(ValueError, match="step must be 1, 2, 3 or 4"):
        run_step(5, z, z, z)
    assert "tl.maximum(m, tl.max(s, 1))" in kernel_source(step2_loop)


def test_tiling_view_text_and_steps():
    view = TilingView(n=8, d=4, block_m=2, block_n=2, causal=True)
    assert view.steps == 16
    view.set_step(5)
    text = view.text()
    assert "step 6 of 16" in text and "@" in text and "running stats" in text
    view.set_step(15)
    assert "equals softmax(QK^T/sqrt d) V: True" in view.text()
    with pytest.raises(ValueError, match="step must be in 0..15"):
        view.set_step(16)
    w = view.widget()
    assert w is not None and view._image.value[:4] == b"\x89PNG"
    view._slider.value = 3                                   # the slider drives the state
    assert view.step == 2 and "step 3 of 16" in view._html.value
