"""Every worked example of the lectures (llmsys_lab.lecture), reproduced by the kit's own code."""
from llmsys_lab import lecture


def test_examples_have_sources():
    for ex in lecture.EXAMPLES.values():
        assert ex.source and ex.slide, ex.name


# ---- serving: KV cache, continuous batching, PagedAttention, goodput, Orca ----
import pytest

from llmsys_lab.metrics import summarize
from llmsys_lab.paged import BlockManager
from llmsys_lab.simulator import CostModel, SimRequest, disaggregated_goodput, lecture_requests, simulate
from llmsys_lab.viz.block_view import SINGLE_REQUEST_ORDER, TWO_REQUEST_ORDER


def _table(m: BlockManager, seq) -> list[tuple[int, int]]:
    t = m.table(seq)
    return list(zip(t.blocks, t.filled))


def test_paged_single_request_slide():
    ex = lecture.get("paged_single_request")
    d = ex.data
    assert SINGLE_REQUEST_ORDER[:3] == d["allocation_order"]
    m = BlockManager(d["num_blocks"], d["block_size"], order=SINGLE_REQUEST_ORDER)
    words = d["prompt"].split()
    m.add("A", list(range(len(words))))
    assert _table(m, "A") == d["steps"]["prompt"]
    for word in d["completion"].split():
        m.append("A", len(words))
        words.append(word)
        assert _table(m, "A") == d["steps"][word], word
    assert _table(m, "A") == [(7, 4), (1, 4), (5, 1)]             # "renowned" in physical block 5


def test_paged_two_request_figure():
    d = lecture.get("paged_two_requests").data
    assert TWO_REQUEST_ORDER[:5] == d["allocation_order"]
    m = BlockManager(d["num_blocks"], d["block_size"], order=TWO_REQUEST_ORDER)
    a = "Alan Turing is a computer scientist and mathematician renowned".split()
    b = "Artificial Intelligence is the future of technology".split()
    m.add("A", list(range(6)))
    for i in range(6, len(a)):
        m.append("A", i)
    m.add("B", list(range(len(b))))
    assert _table(m, "A") == d["A"] and _table(m, "B") == d["B"]
    words = {"A": a, "B": b}
    physical = {blk: " ".join(words[s][i * 4:i * 4 + n]) for s in "AB" for i, (blk, n) in enumerate(_table(m, s))}
    assert physical == d["physical"]
    assert list(physical) != sorted(physical) and sorted(physical) == [1, 2, 3, 5, 7]


def _rows(table: str) -> dict[str, str]:
    """The simulator's grid as {first request in the row: cells, '.' for idle}."""
    out = {}
    for line in table.splitlines()[1:]:
        cells = [line[7 + 5 * i: 12 + 5 * i].strip() or "." for i in range(8)]
        out[cells[0]] = " ".join(cells)
    return out


def test_static_batching_table_of_lecture_002():
    sim = simulate(lecture_requests()[:4], "static", max_batch=4)
    assert _rows(sim.table(1, 8)) == lecture.get("static_batching_T1_T8").data["rows"]


def test_continuous_batching_table_of_lecture_002():
    reqs = lecture_requests()
    assert _rows(simulate(reqs, "continuous", max_batch=4).table(1, 8)) == \
        lecture.get("continuous_batching_T1_T8").data["rows"]
    static = simulate(reqs, "static", max_batch=4)
    assert all(("S5", "token") not in cell.values() for cell in static.timeline[:8])     # static: S5 waits past T8


def test_orca_walkthrough_R1_R5():
    d = lecture.get("orca_walkthrough_R1_R5").data
    walk = [SimRequest("R1", 3, 6), SimRequest("R2", 3, 2), SimRequest("R3", 2, 4, arrival=2),
            SimRequest("R4", 2, 3, arrival=3), SimRequest("R5", 2, 3, arrival=3)]
    sim = simulate(walk, "continuous", max_batch=d["max_batch"])
    for it, batch in d["batches"].items():
        assert sorted(rid for rid, _ in sim.timeline[it - 1].values()) == batch
    assert sim.timeline[1][1] == ("R2", "END")                     # R2 completes in iteration 2
    assert sim.waiting[2] == d["waiting_after_3"]


def test_goodput_slide_example_from_metrics():
    """10 requests finish in one second; only the first batch of 3 meets a 200 ms TTFT SLO."""
    d = lecture.get("goodput_vs_throughput").data
    reqs = [SimRequest(f"q{i}", 4, 5) for i in range(10)]
    # batches of 3, 3, 3, 1 requests x 5 iterations = 20 iterations of 50 ms: one second
    sim = simulate(reqs, "static", max_batch=3, cost=CostModel(base=0.05, per_prefill_token=0, per_decode_seq=0,
                                                               per_kv_token=0))
    s = summarize(list(sim.requests.values()), sim.iteration_end[-1], slo_ttft=0.2)
    assert s["requests"] / s["duration"] == pytest.approx(d["throughput_rps"])
    assert s["goodput"] == pytest.approx(d["goodput_rps"]) and s["slo_attainment"] == pytest.approx(0.3)


def test_disaggregation_goodput():
    d = lecture.get("disaggregation_goodput").data
    two_p_one_d = disaggregated_goodput(d["prefill_rps_per_gpu"], d["decode_rps_per_gpu"], 2, 1)
    assert round(two_p_one_d, 1) == d["2P1D_rps_per_gpu"]
    assert round(two_p_one_d / d["colocated_rps_per_gpu"]) == d["gain"]
    # without interference a colocated GPU would do better than the slide's measured 1.6 rps
    shared = 1 / (1 / d["prefill_rps_per_gpu"] + 1 / d["decode_rps_per_gpu"])
    assert d["colocated_rps_per_gpu"] < shared < d["prefill_rps_per_gpu"]


def test_orca_selective_batching_with_the_engine():
    from llmsys_lab.engine import Engine
    from llmsys_lab.model import load_tiny
    from llmsys_lab.selective_batching import trace_step

    d = lecture.get("orca_selective_batching").data
    model, _ = load_tiny()
    engine = Engine(model, num_blocks=32, block_size=4, max_batch=4, eos_token_id=None)
    reqs = {"x1": engine.add_request("x1", [11, 12, 13], 4), "x2": engine.add_request("x2", [21, 22], 4)}
    engine.step()                                              # x1, x2 prefilled: from now on they decode
    reqs["x3"] = engine.add_request("x3", [31, 32], 4)
    reqs["x4"] = engine.add_request("x4", [41, 42, 43], 4)
    packed = trace_step(engine)
    assert packed.shape == (d["packed_rows"], model.config.hidden_size)
    assert {rid: len(rows) for rid, rows in packed.rows.items()} == d["lengths"]
    covered = sorted(i for rows in packed.rows.values() for i in rows)
    assert covered == list(range(d["packed_rows"]))            # every row belongs to exactly one request
    for rid, rows in packed.rows.items():                      # the rows hold that request's tokens
        r = reqs[rid]
        expect = r.prompt if packed.kinds[rid] == "prefill" else [r.output[-2]]
        assert packed.token_ids[rows.start:rows.stop] == expect, rid



# ---- estimators: parameters, FLOPs, training memory, Chinchilla ----

def test_llama2_7b_flops_slide_convention_and_kit_count():
    from llmsys_lab.estimators import (flop_distribution, forward_flops, forward_flops_table,
                                       slide_training_breakdown, training_flops)
    from llmsys_lab.presets import get_preset

    cfg = get_preset("llama-2-7b")
    assert round(forward_flops(cfg, 1, 4096) / 1e12) == lecture.get("llama2_7b_forward_flops").data["forward_tflops"]
    slide = lecture.get("llama2_7b_training_flops").data
    parts = slide_training_breakdown(cfg, 1, 4096)
    total = sum(parts.values())
    assert round(total / 1e12, 2) == slide["training_tflops"]
    assert {k: round(100 * v / total, 3) for k, v in parts.items()} == slide["shares"]      # exactly, all six
    # the kit's fuller count (Swish 4bsi + product bsi, RoPE, bsh per residual add): 192.18, two digits differ
    kit = flop_distribution(forward_flops_table(cfg, 1, 4096, embedding_as_matmul=True), cfg)
    assert round(training_flops(cfg, 1, 4096) / 1e12, 2) == 192.18
    assert (round(kit["mlp"], 3), round(kit["residual"], 3)) == (55.364, 0.002)
    # forward only, no embedding (the estimator view): attention 42.0%, MLP 56.3%
    fwd = flop_distribution(forward_flops_table(cfg, 1, 4096), cfg)
    assert (round(fwd["attention"], 1), round(fwd["mlp"], 1)) == (42.0, 56.3)


def test_chinchilla_exponent_and_gopher_budget():
    from llmsys_lab.estimators import compute_optimal
    from llmsys_lab.estimators import scaling

    ex = lecture.get("chinchilla_law")
    assert scaling.BETA == ex.data["beta_paper"] != ex.data["beta_slide"] and "0.28" in ex.note
    opt = compute_optimal(ex.data["gopher_flops"])
    assert (round(opt.params / 1e9), round(opt.tokens / 1e12, 1), round(opt.tokens_per_param)) == (32, 3.0, 93)
    chinchilla = ex.data["chinchilla_tokens"] / ex.data["chinchilla_params"]
    assert 19 < chinchilla < 21 and "approaches 1 and 2" in ex.note


def test_training_memory_peak_is_not_the_sum_of_rows():
    from llmsys_lab.estimators import training_memory
    from llmsys_lab.presets import get_preset

    m = training_memory(get_preset("llama-2-7b"), 1, 4096)
    rows = m.weights + m.gradients + m.optimizer + m.weight_copies + m.activations + m.logits_transient
    assert (round(rows / 2**30, 1), round(m.peak / 2**30, 1)) == (142.1, 117.0)
    assert round(rows / 2**30 - m.peak / 2**30, 1) == round(m.gradients / 2**30, 1) == 25.1
    assert "142.1" in lecture.get("llama2_7b_training_memory").note and "117.0" in lecture.get("llama2_7b_training_memory").note
    assert sum(m.alive_at_peak().values()) == m.peak



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
