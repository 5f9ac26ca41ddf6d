"""Every worked example of the lectures (llmsys_lab.lecture), reproduced by the kit's own code."""
from llmsys_lab import lecture


def test_examples_have_sources():
    for ex in lecture.EXAMPLES.values():
        assert ex.source and ex.slide, ex.name


# ---- serving: KV cache, continuous batching, PagedAttention, goodput, Orca ----


# ---- estimators: parameters, FLOPs, training memory, Chinchilla ----


# ---- compute: attention, FLOPs, memory, scaling laws, FlashAttention, latency ----
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _lesson_text(name: str) -> str:
    nb = json.loads((ROOT / "notebooks" / name).read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"])


def test_memory_hierarchy_is_in_lesson_06():
    ex = lecture.get("memory_hierarchy")
    text = _lesson_text("06_flash_attention.ipynb")
    sram, hbm, dram = ex.data["GPU SRAM"], ex.data["GPU HBM"], ex.data["CPU DRAM"]
    assert f"~{sram['size']}" in text and f"~{sram['bandwidth_TBps']:.0f} TB/s" in text
    assert f"{hbm['bandwidth_TBps']}–4.8 TB/s" in text and f"{dram['bandwidth_TBps'] * 1000} GB/s" in text
    # the ordering the slide teaches: each level is faster than the next
    assert sram["bandwidth_TBps"] > hbm["bandwidth_TBps"] > dram["bandwidth_TBps"]


def test_online_softmax_two_blocks():
    from llmsys_lab.flash import block_stats, merge_stats

    d = lecture.get("online_softmax_two_blocks").data
    x1, x2 = torch.tensor(d["x1"]), torch.tensor(d["x2"])
    m1, l1 = block_stats(x1)
    m2, l2 = block_stats(x2)
    m, l = merge_stats(m1, l1, m2, l2)
    for got, want in ((m1, "m1"), (l1, "l1"), (m2, "m2"), (l2, "l2"), (m, "m"), (l, "l")):
        assert round(float(got), 4) == d[want], want
    mx, lx = block_stats(torch.cat([x1, x2]))         # merging equals the statistics of the whole vector
    assert torch.allclose(torch.tensor([float(m), float(l)]), torch.tensor([float(mx), float(lx)]))


@pytest.fixture(scope="module")
def benchmarks_on_path():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    yield
    sys.path.remove(str(ROOT / "benchmarks"))


def test_operator_classes_slide_and_small_measurement(benchmarks_on_path):
    import operator_classes as oc

    assert oc.SLIDE == lecture.get("operator_classes").data
    r = oc.measure(oc.SMALL_SETUP, "eager")
    assert set(r["flops_pct"]) == set(oc.CLASSES)
    assert abs(sum(r["flops_pct"].values()) - 100) < 1e-6 and abs(sum(r["time_pct"].values()) - 100) < 1e-6
    # FLOPs: contractions dominate, as on the slide; normalisation (softmax, RMSNorm, loss) is classed as such
    assert r["flops_pct"]["tensor contraction"] > 90
    assert r["flops"]["statistical normalisation"] > 0 and r["ops"]["statistical normalisation"] > 0
    # the analytic matmul count agrees with FlopCounterMode (eager attention: every contraction is a matmul)
    assert abs(r["contraction_analytic_vs_flop_counter"] - 1) < 1e-6


def test_operator_classes_classification(benchmarks_on_path):
    import operator_classes as oc

    assert oc.op_class("aten::mm") == oc.op_class("aten::_scaled_dot_product_flash_attention") == oc.CLASSES[0]
    assert oc.op_class("aten::_softmax") == oc.op_class("aten::nll_loss_forward") == oc.CLASSES[1]
    assert oc.op_class("aten::add") is None            # decided by scope: RMSNorm's mul is normalisation
    assert oc.op_flops("aten::mm", [[4, 8], [8, 16]]) == 2 * 4 * 8 * 16
    assert oc.op_flops("aten::addmm", [[16], [4, 8], [8, 16]]) == 2 * 4 * 8 * 16
    assert oc.op_flops("aten::mul", [[4, 8], [4, 8]]) == 32


def test_flash_numeric_deviation_depends_on_the_baseline(benchmarks_on_path):
    import numeric_deviation as nd

    dev = nd.deviations((1, 2, 128, 64), torch.bfloat16, causal=False, seeds=(0,))["rms"]
    # the paper's baseline (fp32 intermediates) deviates less than flash ...
    assert dev["flash (kit)"] > 1.2 * dev["fp32 intermediates"]
    # ... while the kit's bf16 standard attention (S, P rounded to bf16) is no better than flash
    assert dev["bf16 intermediates"] > 0.9 * dev["flash (kit)"]
    assert "higher-precision intermediates" in lecture.get("flash_numeric_deviation").note


def test_e2e_latency_counts_the_first_token_once():
    from llmsys_lab.generate import GenerationStats

    ex = lecture.get("e2e_latency")
    s = GenerationStats(prompt_tokens=5, generated_tokens=4, ttft=0.010, step_times=[0.002, 0.003, 0.001])
    n = 1 + len(s.step_times)                           # the first token comes with TTFT
    assert abs(s.e2e - (s.ttft + s.tpot * (n - 1))) < 1e-12
    assert abs(s.e2e - (s.ttft + s.tpot * n)) > 1e-4    # the slide's TTFT + TPOT * n counts one TPOT too many
    assert ex.data["kit"] == "TTFT + TPOT * (n - 1)"


def test_gqa_with_all_heads_sharing_is_mqa():
    from llmsys_lab.attention import scaled_dot_product_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 6, 16, generator=g)
    k, v = torch.randn(1, 1, 6, 16, generator=g), torch.randn(1, 1, 6, 16, generator=g)   # one K/V head: MQA
    out = scaled_dot_product_attention(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.expand(1, 8, 6, 16), v.expand(1, 8, 6, 16),
                                                           is_causal=True)
    assert torch.allclose(out, ref, atol=1e-5)
    assert lecture.get("gqa_all_heads_share").data["all query heads share one K/V head"] == "MQA"
    assert "MQA" in _lesson_text("01_attention.ipynb") and "all heads share K, V" in _lesson_text("01_attention.ipynb")
