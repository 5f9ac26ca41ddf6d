"""Every worked example of the lectures (llmsys_lab.lecture), reproduced by the kit's own code."""
from llmsys_lab import lecture


def test_examples_have_sources():
    for ex in lecture.EXAMPLES.values():
        assert ex.source and ex.slide, ex.name


# ---- serving: KV cache, continuous batching, PagedAttention, goodput, Orca ----


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
