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


# ---- lessons 07-10: performance, parallelism, MoE, speculative decoding ----
import json as _json
import math as _math

from llmsys_lab.benchmarking import load_results


@pytest.fixture(scope="module")
def two_ranks():
    from llmsys_lab.parallel import launch
    from llmsys_lab.parallel.checks import run_checks

    return launch(run_checks, 2, args=(("data_parallel", "tensor_parallel", "sequence_parallel", "bad_input"),),
                  timeout=300)


def test_fast_slow_components_against_the_measured_operator_classes():
    d = lecture.get("llm_components_fast_slow").data
    assert set(d["slow"]) == {"self-attentions", "MLPs"} and "layernorm, residual" in d["fast"]
    # the slide's "slow" components are the contractions; its "fast" ones are memory-bound: in the stored
    # training-step measurement their time share is many times their FLOP share
    for run in load_results("operator_classes")["runs"]:
        flops, time = run["flops_pct"], run["time_pct"]
        assert flops["tensor contraction"] > 99
        for cls in ("statistical normalisation", "element-wise"):
            assert time[cls] > 50 * flops[cls], (run["attention"], cls)
    assert {d["class"][c] for c in d["slow"]} == {"tensor contraction"}


def test_parallelism_tradeoff_in_the_estimator_and_the_schedule():
    from llmsys_lab.parallel.estimate import ParallelPlan, estimate_parallel
    from llmsys_lab.parallel.pipeline import bubble_fraction, gpipe_bubble, simulate
    from llmsys_lab.presets import get_preset

    d = lecture.get("parallelism_tradeoff").data
    assert d == {"communication": {"inter-op": "less", "intra-op": "more"},
                 "device idle time": {"inter-op": "more", "intra-op": "less"}}
    cfg = get_preset("llama-2-7b")
    inter = estimate_parallel(cfg, 64, 4096, ParallelPlan(pp=8, micro_batches=64))
    intra = estimate_parallel(cfg, 64, 4096, ParallelPlan(tp=8, micro_batches=64))
    assert inter.pp_bytes < intra.tp_bytes / 100                  # communication: less / more
    idle = bubble_fraction(simulate("1f1b", 8, 64), 8)
    assert idle == pytest.approx(gpipe_bubble(8, 64)) and idle > 0  # device idle time: more (intra-op: none)


def test_intra_op_two_matmuls_is_one_all_reduce(two_ranks):
    d = lecture.get("intra_op_two_matmuls").data
    for rank in two_ranks:
        tp = rank["tensor_parallel"]
        assert tp["mlp_forward_err"] < 1e-5
        assert tp["mlp_forward_all_reduces"] == d["all_reduces_forward"] == 1


def test_parameter_server_and_all_reduce_bytes(two_ranks):
    dp = [r["data_parallel"] for r in two_ranks]
    S, n = dp[0]["grad_bytes"], len(two_ranks)
    for name in ("all_reduce", "ring", "parameter_server"):
        assert all(r[name]["max_param_diff"] < 1e-6 for r in dp), name
    assert dp[0]["parameter_server"]["bytes_sent"] == (n - 1) * S           # the server's link
    assert dp[0]["ring"]["bytes_sent"] == 2 * (n - 1) / n * S
    assert "parameter_server_vs_allreduce" in lecture.EXAMPLES


def test_sequence_parallel_answers(two_ranks):
    d = lecture.get("sequence_parallel_questions").data
    assert "all-to-all" in d["ulysses"] and "ring" in d["ring_attention"]
    for rank in two_ranks:
        sp = rank["sequence_parallel"]
        assert max(sp[k] for k in sp if k.endswith("_err")) < 1e-5
        assert "heads" in rank["bad_input"]["ulysses_heads"]                   # 3 heads on 2 ranks: refused
    s = two_ranks[0]["sequence_parallel"]
    assert s["ulysses_causal_bytes"][0] > 0 and s["ring_causal_bytes"][0] > 0


def test_moe_gating_formula_is_the_kits_route():
    from llmsys_lab.moe import MoE, MoEConfig, route

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 6, generator=g), torch.randn(5, 6, generator=g)
    r = route(x, w, top_k=lecture.get("moe_gating").data["top_k"])
    G = torch.softmax(x @ w.T, -1)
    top, idx = G.topk(2, -1)
    assert torch.equal(r.experts, idx)
    s0, s1 = top[:, 0] / top.sum(-1), top[:, 1] / top.sum(-1)
    assert torch.allclose(r.weights[:, 0], s0, atol=1e-6) and torch.allclose(r.weights[:, 1], s1, atol=1e-6)
    torch.manual_seed(0)
    layer = MoE(MoEConfig(hidden_size=6, intermediate_size=4, num_experts=5, top_k=2))
    with torch.no_grad():
        layer.gate.weight.copy_(w)
        y = layer(x)
        by_hand = torch.stack([s0[t] * layer.experts[int(idx[t, 0])](x[t]) + s1[t] * layer.experts[int(idx[t, 1])](x[t])
                               for t in range(len(x))])
    assert (y - by_hand).abs().max() < 1e-5


def test_moe_scaling_mlp_params_times_n_over_2():
    from llmsys_lab.estimators.moe import MOE_PRESETS, dense_vs_moe

    d = lecture.get("moe_scaling").data
    mix = MOE_PRESETS["mixtral-8x7b"]
    assert (mix.moe.num_experts, mix.moe.top_k) == (d["experts"], d["top_k"])
    ratio = dense_vs_moe(mix)["ratio"]
    # N/2 = 4 up to the router's E x h weights (counted with the MLP): 4.0001
    assert ratio["mlp_params"] == pytest.approx(d["experts"] / 2, rel=1e-3) and d["mlp_params_ratio"] == 4
    assert ratio["weight_GB"] > 3                                  # "parameter related x N/2" (all but attention)
    assert 1 <= ratio["forward_flops_per_token"] < 1.01            # "Compute: only increase mildly"


def test_latency_is_step_latency_times_steps_and_speculation_cuts_steps():
    from llmsys_lab.drafters import PromptLookupDrafter
    from llmsys_lab.model import load_tiny
    from llmsys_lab.speculative import speculative_generate

    assert lecture.get("latency_step_times_steps").slide == "Latency = step latency * # steps"
    target, tok = load_tiny("cpu")
    text = "KING.\nMy lords, my lords, my lords, my lords,"
    out = speculative_generate(target, PromptLookupDrafter(), tok(text).input_ids, 24, gamma=4, eos_token_id=None)
    assert out.stats.generated == 24 and out.stats.drafted > 0
    assert out.stats.target_steps < out.stats.generated                   # fewer steps than tokens


def test_gpt3_needs_at_least_ten_a100_40gb():
    d = lecture.get("gpt3_serving_gpus").data
    weights = d["params"] * d["bytes_per_param"]
    assert _math.ceil(weights / d["gpu_bytes"]) == 9 < d["gpus"]            # weights alone: 8.75 GPUs


def test_vllm_ratio_and_the_kits_serving_ratio():
    d = lecture.get("vllm_throughput").data
    assert (d["vs_hf"], d["vs_tgi"]) == (24, 3.5)
    rows = load_results("serving")["results"]["llama-300m"]
    a = rows["(a) HF generate, static batches"]["throughput"]
    kit = rows["(d) kit engine, continuous"]
    assert kit["vs_a"] == pytest.approx(kit["throughput"] / a)
    assert kit["vs_a"] > 1
