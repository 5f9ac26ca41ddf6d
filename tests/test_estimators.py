"""Estimators against the lecture's numbers and against real measurement."""
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmsys_lab.configs import ModelConfig
from llmsys_lab.estimators.flop_counter import count_model_flops
from llmsys_lab.estimators import (model_attention_path, sdpa_backend, chinchilla_loss, compute_optimal, decode_cost, flop_distribution,
                                   forward_flops, forward_flops_table, get_gpu, korthikanti_activation_bytes,
                                   kv_bytes_per_token, max_batch, param_breakdown, param_count, prefill_cost,
                                   total_flops, training_flops, training_memory)
from llmsys_lab.presets import PRESETS, get_preset
from llmsys_lab.validate import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def hf_meta_model(cfg, attn="eager"):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg.to_hf(), attn_implementation=attn)


# ---- parameters ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_equals_transformers_model(name):
    cfg = PRESETS[name]
    model = hf_meta_model(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())


def test_known_param_counts_and_breakdown():
    assert param_count(get_preset("llama-2-7b")) == 6_738_415_616
    assert param_count(get_preset("gpt2")) == 124_439_808
    b = param_breakdown(get_preset("llama-2-7b"))
    assert b["attention"] == 32 * 4 * 4096**2 and b["mlp"] == 32 * 3 * 4096 * 11008
    assert b["lm_head"] == b["embedding"] == 32000 * 4096 and b["norms"] == 65 * 4096
    tied = param_breakdown(get_preset("llmsys-tiny"))
    assert tied["lm_head"] == 0


# ---- FLOPs: the lecture ---------------------------------------------------------------------

LECTURE_SHARES = {"embedding": 1.676, "norm": 0.007, "residual": 0.003, "attention": 41.276, "mlp": 55.361,
                  "lm_head": 1.676}


def test_llama2_7b_forward_is_63_tflops():
    cfg = get_preset("llama-2-7b")
    f = forward_flops(cfg, batch=1, seq=4096)
    assert round(f / 1e12) == 63
    # the lecture's closed form: N (6bsh^2 + 4bs^2h + 3bs^2n + 2bsh^2) + N 6bshi + 2bshv, plus the small terms
    b, s, h, n, i, v, N = 1, 4096, 4096, 32, 11008, 32000, 32
    closed = N * (6 * b * s * h * h + 4 * b * s * s * h + 3 * b * s * s * n + 2 * b * s * h * h) + N * 6 * b * s * h * i + 2 * b * s * h * v
    small = N * (3 * b * s * h + 2 * b * s * h + 5 * b * s * i + 2 * (4 * b * s * h + 2 * b * s)) + 4 * b * s * h + 2 * b * s
    assert f == closed + small


def test_llama2_7b_training_total_and_distribution_match_the_lecture():
    cfg = get_preset("llama-2-7b")
    assert abs(training_flops(cfg, 1, 4096) / 1e12 - 192.17) < 0.02
    rows = forward_flops_table(cfg, 1, 4096, embedding_as_matmul=True)
    shares = flop_distribution(rows, cfg)
    for category, lecture in LECTURE_SHARES.items():
        assert abs(shares[category] - lecture) < 0.005, (category, shares[category], lecture)


def test_causal_counting_keeps_the_lower_triangle():
    cfg = get_preset("llama-2-7b")
    full = {r.op: r.flops for r in forward_flops_table(cfg, 2, 100)}
    causal = {r.op: r.flops for r in forward_flops_table(cfg, 2, 100, causal=True)}
    assert causal["QK^T"] == full["QK^T"] * (100 * 101 // 2) // (100 * 100)
    assert causal["Q/K/V projections"] == full["Q/K/V projections"]


def test_decode_step_attends_to_the_cache():
    cfg = get_preset("llama-3-8b")
    rows = {r.op: r for r in forward_flops_table(cfg, 4, 1, causal=True, past=999)}
    assert rows["QK^T"].flops == 2 * 4 * 32 * 128 * 1000
    assert rows["Q/K/V projections"].flops == 2 * 4 * 4096 * (32 * 128 + 2 * 8 * 128)


@pytest.mark.parametrize("name,batch,seq,attn", [
    ("llama-2-7b", 1, 128, "eager"), ("llama-2-70b", 2, 64, "eager"), ("llama-3-8b", 2, 64, "sdpa"),
    ("mistral-7b", 1, 100, "eager"), ("opt-13b", 1, 64, "eager"), ("gpt2", 2, 50, "eager"),
    ("llmsys-tiny", 3, 33, "sdpa"),
])
def test_matmul_flops_equal_flop_counter_mode(name, batch, seq, attn):
    """FlopCounterMode counts matmuls (mm, addmm, bmm) of the real transformers model; it does
    not count softmax, norms, RoPE, activations or residual adds."""
    cfg = get_preset(name)
    model = hf_meta_model(cfg, attn)
    counted = count_model_flops(model, torch.zeros(batch, seq, dtype=torch.long, device="meta"))
    rows = forward_flops_table(cfg, batch, seq)    # the model computes every score (masking after)
    assert counted["model"] == total_flops(rows, cfg, matmul_only=True)
    # RoPE's angle table, if transformers builds it with a matmul: positions x head_dim / 2, once
    assert counted["rope_table"] in (0, 2 * seq * cfg.head_dim // 2) if cfg.positions == "rope" else counted["rope_table"] == 0


# ---- memory -------------------------------------------------------------------------------------

def test_kv_cache_bytes():
    assert kv_bytes_per_token(get_preset("opt-13b"), "fp16") == 800 * 1024          # vLLM paper: 800 KB
    assert kv_bytes_per_token(get_preset("llama-2-7b"), "fp16") == 512 * 1024
    assert kv_bytes_per_token(get_preset("llama-2-70b"), "fp16") == 2 * 80 * 8 * 128 * 2   # GQA: 8 kv heads


def test_max_batch_fits_weights_plus_kv():
    cfg = get_preset("llama-2-7b")
    gpu = 80 * 2**30
    b = max_batch(cfg, gpu, 4096, "fp16")
    per_seq = 4096 * kv_bytes_per_token(cfg, "fp16")
    weights = param_count(cfg) * 2
    assert weights + b * per_seq <= gpu < weights + (b + 1) * per_seq
    with pytest.raises(ConfigError, match="the weights alone .* do not fit in 16.0 GiB"):
        max_batch(get_preset("llama-2-13b"), 16 * 2**30, 1024, "fp16")


def saved_activation_bytes(cfg, batch, seq, amp, math=False):
    """What autograd really keeps for backward, measured with saved-tensor hooks (math=True:
    SDPA restricted to its math backend, as on a GPU for fp32 with grouped-query attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg.to_hf(), attn_implementation="sdpa")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        weight_copy = t.dtype == torch.bfloat16 and type(t.grad_fn).__name__ == "TBackward0"
        if st.data_ptr() not in params and not weight_copy:
            seen[st.data_ptr()] = st.nbytes()
        return t

    backends = [SDPBackend.MATH] if math else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_kernel(backends):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
@pytest.mark.parametrize("cfg,batch,seq", [
    (ModelConfig(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=160, vocab_size=50), 3, 7),
    (ModelConfig(hidden_size=128, num_layers=2, num_heads=8, intermediate_size=344, vocab_size=300), 2, 40),
])
def test_activation_formula_equals_saved_tensors(cfg, batch, seq, precision):
    from llmsys_lab.estimators.memory import activation_bytes

    path = model_attention_path(cfg, precision, device="cpu")
    assert path.backend == "flash"
    assert activation_bytes(cfg, batch, seq, precision, device="cpu") == saved_activation_bytes(cfg, batch, seq, precision == "mixed")


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
@pytest.mark.parametrize("cfg,batch,seq", [
    (ModelConfig(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=160, vocab_size=50), 3, 7),
    (ModelConfig(hidden_size=128, num_layers=2, num_heads=8, intermediate_size=344, vocab_size=300), 2, 40),
])
def test_math_backend_activation_formula_equals_saved_tensors(cfg, batch, seq, precision):
    """The math fallback keeps the (b, n, s, s) probabilities of every layer: the estimate for the
    math path equals what autograd saves when SDPA is restricted to math, and exceeds the fused
    path's by the quadratic term."""
    from llmsys_lab.estimators.memory import activation_bytes

    math_path = sdpa_backend(precision, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, device="cpu", priority=("math",))
    assert math_path.backend == "math" and math_path.stores_scores
    est = activation_bytes(cfg, batch, seq, precision, device="cpu", path=math_path)
    assert est == saved_activation_bytes(cfg, batch, seq, precision == "mixed", math=True)
    fused = activation_bytes(cfg, batch, seq, precision, device="cpu")
    c = 4 if precision == "fp32" else 2
    assert est - fused >= cfg.num_layers * c * batch * cfg.num_heads * seq * seq - cfg.num_layers * 4 * batch * cfg.num_heads * seq


def stored_training_rows():
    """The rows benchmarks/training_memory.py measured on a GPU, each with its ModelConfig (stored
    in the row; rows of the earlier format name a model of the benchmark's MODELS)."""
    data = json.loads((ROOT / "benchmarks/results/training_memory.json").read_text())
    from benchmarks_training_memory import MODELS

    return [(ModelConfig(**r["config"]) if "config" in r else MODELS[r["model"]], r) for r in data["rows"]]


def test_training_memory_within_10_percent_of_gpu_measurement():
    """benchmarks/training_memory.py measured real training steps on a GPU (a grid of precisions,
    attention kinds, sequence lengths and recomputation); the estimate computed now, by this code,
    must stay within 10% of every stored measurement, and must predict the SDPA backend each run
    used where the run recorded it."""
    rows = stored_training_rows()
    data = json.loads((ROOT / "benchmarks/results/training_memory.json").read_text())
    cap = tuple(data.get("capability", (9, 0)))        # the GPU the grid ran on (H200: 9.0)
    assert len({r["model"] for _, r in rows}) >= 3
    for cfg, r in rows:
        path = model_attention_path(cfg, r["precision"], capability=cap)
        est = training_memory(cfg, r["batch"], r["seq"], r["precision"], recompute=r["recompute"], path=path)
        assert abs(est.peak / r["measured"] - 1) < 0.10, r
        if "backend_measured" in r:
            assert est.attention_backend == r["backend_measured"], r
    if "backend_measured" in rows[0][1]:     # the grid: every precision, attention kind and recompute setting
        assert {(r["precision"], r["attention"], r["recompute"]) for _, r in rows} >= {
            (p, a, rc) for p in ("fp32", "mixed") for a in ("MHA", "GQA", "MQA") for rc in (False, True)}
        assert {r["backend_measured"] for _, r in rows} >= {"math", "efficient"}


def test_training_memory_parts():
    cfg = get_preset("llama-2-7b")
    m = training_memory(cfg, 1, 4096, "mixed-zero")
    n = param_count(cfg)
    assert (m.weights, m.gradients, m.optimizer) == (2 * n, 2 * n, 12 * n)      # 16 bytes / param (ZeRO)
    sharded = training_memory(cfg, 1, 4096, "mixed-zero", devices=8)
    assert sharded.optimizer == m.optimizer / 8 and sharded.activations == m.activations
    assert training_memory(cfg, 1, 4096, recompute=True).activations < m.activations / 5
    # Korthikanti et al.: 34 sbh + 5 a s^2 b bytes per layer
    assert korthikanti_activation_bytes(cfg, 1, 4096) == 32 * (4096 * 4096 * (34 + 5 * 32 * 4096 / 4096))


@pytest.mark.parametrize("call,msg", [
    (lambda: training_memory(get_preset("gpt2"), 1, 8, precision="fp8-mixed"), "unknown precision 'fp8-mixed'"),
    (lambda: training_memory(get_preset("gpt2"), 1, 8, optimizer="lion"), "unknown optimizer 'lion'"),
    (lambda: kv_bytes_per_token(get_preset("gpt2"), "fp7"), "unknown dtype 'fp7'"),
    (lambda: get_gpu("B300"), "unknown GPU 'B300'"),
    (lambda: get_preset("llama2-7b"), "unknown model preset 'llama2-7b'. Did you mean 'llama-2-7b'"),
    (lambda: forward_flops(get_preset("gpt2"), batch=0), "batch must be a positive int, got 0"),
    (lambda: forward_flops_table(get_preset("gpt2"), 1, 8, past=-1), "past must be a non-negative int"),
])
def test_bad_input_is_named(call, msg):
    with pytest.raises(ConfigError, match=msg):
        call()


# ---- roofline and scaling -----------------------------------------------------------------------

def test_decode_is_memory_bound_and_batching_raises_its_intensity():
    cfg, gpu = get_preset("llama-2-7b"), get_gpu("A100-80GB")
    assert prefill_cost(cfg, 1, 1024).bound(gpu) == "compute"
    decode = [decode_cost(cfg, b, 1024) for b in (1, 8, 64)]
    assert all(d.bound(gpu) == "memory" for d in decode)
    assert decode[0].intensity < decode[1].intensity < decode[2].intensity
    assert 0.9 < decode[0].intensity < 1.1          # ~2 FLOPs per 2-byte weight at batch 1


def test_chinchilla_closed_form_is_the_minimum():
    assert chinchilla_loss(1e9, 2e10) == pytest.approx(1.69 + 406.4 / 1e9**0.34 + 410.7 / 2e10**0.28)
    opt = compute_optimal(1e21)
    assert 6 * opt.params * opt.tokens == pytest.approx(1e21)
    for factor in (0.5, 0.8, 1.25, 2.0):
        n = opt.params * factor
        assert chinchilla_loss(n, 1e21 / 6 / n) > opt.loss
    with pytest.raises(ConfigError, match="compute budget must be positive"):
        compute_optimal(0)


# ---- configs from transformers ------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_transformers_configs(name):
    cfg = PRESETS[name]
    back = ModelConfig.from_hf(cfg.to_hf(), name=cfg.name)
    assert back == cfg


# ---- command line -----------------------------------------------------------------------------

@pytest.fixture
def run_cli(cli):
    """`python -m llmsys_lab estimate ARGS`, in this process (tests/conftest.py's `cli`)."""
    return lambda *args: cli("estimate", *args)


def test_cli_prints_the_tables(run_cli):
    out = run_cli("llama-2-7b", "--batch", "1", "--seq", "4096")
    assert out.returncode == 0, out.stderr
    assert "6,738,415,616" in out.stdout
    assert "= 62.99 TFLOPs forward" in out.stdout and "QK^T" in out.stdout and "KV cache per token" in out.stdout


def test_cli_json(run_cli):
    out = run_cli("opt-13b", "--seq", "2048", "--dtype", "fp16", "--json")
    data = json.loads(out.stdout)
    assert data["kv_bytes_per_token"] == 800 * 1024 and data["params"]["total"] == 12_853_473_280
    assert data["bound"] == {"prefill": "compute", "decode": "memory"}


def test_cli_bad_input_exits_2_with_a_message(run_cli):
    out = run_cli("llama2-7b")
    assert out.returncode == 2 and "Did you mean 'llama-2-7b'" in out.stderr
    assert "unknown dtype 'fp7'" in run_cli("gpt2", "--dtype", "fp7").stderr
    assert "batch must be a positive int, got -1" in run_cli("gpt2", "--batch", "-1").stderr


# ---- the attention path: which SDPA backend runs ----------------------------------------------

A100 = {"capability": (8, 0)}      # PyTorch's default order: flash, memory-efficient, math, cuDNN


@pytest.mark.parametrize("dtype,n,kv,d,kw,backend,why", [
    ("bf16", 32, 32, 128, A100, "flash", "first in the priority"),
    ("mixed", 32, 8, 128, A100, "flash", "first in the priority"),                 # GQA via enable_gqa
    ("fp16", 16, 1, 64, A100, "flash", "first in the priority"),                   # MQA
    ("fp32", 12, 12, 64, A100, "efficient", "flash: needs fp16/bf16"),
    ("fp32", 10, 5, 64, A100, "math", "efficient: does not take fewer K/V heads"),  # the issue's configuration
    ("fp32", 16, 1, 64, A100, "math", "efficient: does not take fewer K/V heads"),
    ("fp16", 8, 8, 64, {"capability": (7, 5)}, "efficient", "flash: needs compute capability >= 8.0"),
    ("bf16", 8, 2, 64, {"capability": (7, 5)}, "math", "bf16 needs compute capability"),
    ("bf16", 8, 8, 64, {**A100, "attn_mask": True}, "efficient", "flash: takes no explicit mask"),
    ("bf16", 8, 8, 320, A100, "efficient", "head_dim 320 > 256"),
    ("fp32", 8, 8, 30, A100, "math", "not a multiple of 4"),
    # Hopper / Blackwell: cuDNN first (measured on an H200: bf16 training ran cuDNN attention)
    ("mixed", 32, 8, 128, {}, "cudnn", "first in the priority"),
    ("bf16", 8, 8, 64, {"capability": (10, 0), "attn_mask": True}, "cudnn", "first in the priority"),
    ("bf16", 8, 8, 160, {}, "flash", "cudnn: head_dim 160"),
    ("fp32", 12, 12, 64, {}, "efficient", "cudnn: needs fp16/bf16"),
    ("fp32", 10, 5, 64, {}, "math", "efficient: does not take fewer K/V heads"),
    ("bf16", 8, 8, 36, {"priority": ("flash", "cudnn", "math")}, "flash", "first in the priority"),
    ("bf16", 8, 8, 64, {"priority": ("cudnn", "math")}, "cudnn", "first in the priority"),
    ("bf16", 8, 8, 160, {"priority": ("cudnn", "math")}, "math", "cudnn: head_dim 160"),
    ("fp32", 8, 8, 64, {"priority": ("cudnn", "math")}, "math", "cudnn: needs fp16/bf16"),
    ("fp32", 8, 2, 64, {"device": "cpu"}, "flash", "CPU flash kernel"),
    ("mixed", 8, 8, 64, {"device": "cpu", "dropout": 0.1}, "math", "CPU flash takes no dropout"),
])
def test_sdpa_backend_every_branch(dtype, n, kv, d, kw, backend, why):
    path = sdpa_backend(dtype, n, kv, d, **kw)
    assert path.backend == backend and why in path.reason, path
    assert path.stores_scores == (backend == "math")
    assert backend in path.describe()


def test_transformers_gqa_choice_decides_the_kv_heads_sdpa_sees():
    # GQA, no mask: K/V unrepeated with enable_gqa=True (fp32: no fused backend takes it -> math)
    p = sdpa_backend("fp32", 10, 5, 64)
    assert (p.enable_gqa, p.kv_heads, p.backend) == (True, 5, "math")
    # with a padding mask transformers repeats K/V: plain MHA for SDPA, memory-efficient takes it
    p = sdpa_backend("fp32", 10, 5, 64, attn_mask=True, capability=(8, 0))
    assert (p.enable_gqa, p.kv_heads, p.backend) == (False, 10, "efficient")
    # forcing the choice
    assert sdpa_backend("fp32", 10, 5, 64, enable_gqa=False).backend == "efficient"
    assert sdpa_backend("bf16", 10, 5, 64, enable_gqa=True).kv_heads == 5
    # CPU math computes bf16 in fp32
    assert sdpa_backend("mixed", 8, 8, 64, device="cpu", priority=("math",)).dtype == "fp32"


@pytest.mark.parametrize("call,msg", [
    (lambda: sdpa_backend("fp8", 8, 8, 64), "unknown attention dtype or precision 'fp8'"),
    (lambda: sdpa_backend("bf16", 8, 3, 64), "num_kv_heads = 3 must be positive and divide num_heads = 8"),
    (lambda: sdpa_backend("bf16", 8, 8, 0), "head_dim must be positive"),
    (lambda: sdpa_backend("bf16", 8, 8, 64, device="tpu"), "unknown device kind 'tpu'"),
    (lambda: sdpa_backend("bf16", 8, 8, 64, priority=("fast",)), "unknown SDPA backend 'fast'"),
    (lambda: sdpa_backend("fp32", 8, 8, 64, priority=("flash", "cudnn")), "no SDPA backend accepts this call"),
])
def test_sdpa_backend_bad_input(call, msg):
    with pytest.raises(ConfigError, match=msg):
        call()


def test_backend_from_profiler_op_names():
    from llmsys_lab.estimators.attention_path import backend_from_ops

    assert backend_from_ops(["aten::_scaled_dot_product_flash_attention"]) == "flash"
    assert backend_from_ops(["aten::_scaled_dot_product_efficient_attention_backward"]) == "efficient"
    assert backend_from_ops(["aten::scaled_dot_product_attention", "aten::_safe_softmax"]) == "math"
    with pytest.raises(ValueError, match="no scaled_dot_product_attention"):
        backend_from_ops(["aten::mm"])


def test_issue_configuration_gets_the_quadratic_term():
    """fp32 + GQA on a GPU: the estimate grows with s^2 like the measurement (4.44 / 9.62 / 24.85 GiB
    at s = 512 / 1024 / 2048 on an H200 for this shape); the fused-path estimate does not."""
    cfg = ModelConfig(hidden_size=640, num_layers=10, num_heads=10, num_kv_heads=5, intermediate_size=1728,
                      vocab_size=32000)
    m = {s: training_memory(cfg, 8, s, "fp32") for s in (1024, 2048)}
    assert m[1024].attention_backend == "math"
    probs = 10 * 4 * 8 * 10 * 2048**2
    fused = training_memory(cfg, 8, 2048, "fp32", path=sdpa_backend("fp32", 10, 10, 64))
    lse = 10 * 4 * 8 * 10 * 2048
    assert m[2048].activations - fused.activations >= probs - lse
    assert training_memory(cfg, 8, 2048, "mixed").attention_backend == "cudnn"      # H100/H200: cuDNN first
    from llmsys_lab.estimators.attention_path import default_priority

    assert default_priority((9, 0))[0] == default_priority((10, 0))[0] == "cudnn"
    assert default_priority((8, 0))[0] == default_priority((8, 9))[0] == default_priority((12, 0))[0] == "flash"


def test_peak_is_what_is_alive_at_the_peak_moment():
    m = training_memory(get_preset("llama-2-7b"), 1, 4096)
    assert sum(m.alive_at_peak().values()) == pytest.approx(m.peak)
    rows = m.weights + m.gradients + m.optimizer + m.weight_copies + m.activations + m.logits_transient
    assert m.peak < rows            # gradients and activations are never alive together in full


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="asks PyTorch's CUDA SDPA selection")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n,kv,d", [(16, 16, 64), (16, 4, 64), (16, 1, 64), (8, 8, 128), (4, 4, 80)])
@pytest.mark.parametrize("mask", [False, True])
def test_table_agrees_with_pytorch_selection_on_this_gpu(dtype, n, kv, d, mask):
    from llmsys_lab.estimators.attention_path import query_torch_backend

    if mask and dtype != "fp32":
        pytest.skip("16-bit with an explicit mask: cuDNN's mask support depends on the cuDNN version")
    cap = torch.cuda.get_device_capability()
    assert sdpa_backend(dtype, n, kv, d, capability=cap, attn_mask=mask).backend == \
        query_torch_backend(dtype, n, kv, d, attn_mask=mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlopCounterMode on the GPU's fused SDPA kernels")
@pytest.mark.parametrize("name", list(PRESETS))
def test_matmul_flops_equal_flop_counter_mode_on_gpu(name):
    """On a GPU transformers' sdpa attention runs a fused kernel (flash in bf16), which
    FlopCounterMode counts as QK^T + PV over all s^2 pairs: the kit's table must agree for one layer of
    every preset's shape; the test also states (asserts) which backend was measured."""
    from llmsys_lab.estimators.measure import sdpa_backend_ran

    cfg = get_preset(name).replace(num_layers=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg.to_hf(), attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    counted = count_model_flops(model, ids)
    with torch.no_grad():
        ran = sdpa_backend_ran(lambda: model(input_ids=ids))
    assert ran in ("flash", "efficient", "cudnn"), ran        # a fused kernel, which FlopCounterMode counts
    if cfg.arch in ("llama", "mistral"):                       # no mask: the path the estimator predicts
        expected = model_attention_path(cfg, "bf16", capability=torch.cuda.get_device_capability()).backend
        assert ran == expected, (ran, expected)
    assert counted["model"] == total_flops(forward_flops_table(cfg, 2, 256), cfg, matmul_only=True)


def test_cli_list_and_context_warning_and_backend(capsys):
    from llmsys_lab.__main__ import main

    def cli(*args):
        code = main(["estimate", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = cli("--list")
    assert code == 0 and "llama-2-7b" in out and "H200" in out and "context 4096" in out
    _, out, _ = cli("gpt2", "--seq", "2048")
    assert "WARNING: sequence 2048 exceeds gpt2's context of 1024 tokens" in out
    assert "attention: SDPA flash" in out                    # the default GPU, an A100 (8.0): flash first
    assert "attention: SDPA cudnn" in cli("gpt2", "--gpu", "H200")[1]     # Hopper: cuDNN first
    data = json.loads(cli("gpt2", "--seq", "2048", "--json")[1])
    assert any("exceeds gpt2's context" in w for w in data["warnings"])
    assert json.loads(cli("gpt2", "--seq", "1024", "--json")[1])["warnings"] == []
    fp32 = json.loads(cli("llama-2-70b", "--seq", "1024", "--precision", "fp32", "--json")[1])
    assert fp32["attention_backend"]["backend"] == "math" and fp32["attention_backend"]["stores_scores"]
    code, _, err = cli()
    assert code == 2 and "--list" in err




INFERENCE_RESULTS = ROOT / "benchmarks/results/inference_memory.json"


@pytest.mark.skipif(not INFERENCE_RESULTS.exists(), reason="benchmarks/inference_memory.py has not been run on a GPU yet")
def test_inference_memory_against_stored_gpu_measurement():
    """benchmarks/inference_memory.py measured generation peaks (contiguous and paged caches) and the
    max-batch boundary on a GPU; the estimate computed now must stay within 15% of every point, and
    at the boundary the predicted batch ran."""
    from llmsys_lab.estimators import inference_memory, max_batch_inference

    data = json.loads(INFERENCE_RESULTS.read_text())
    assert {r["cache"] for r in data["rows"]} == {"contiguous", "paged"}
    for r in data["rows"]:
        est = inference_memory(ModelConfig(**r["config"]), r["batch"], r["prompt"], r["new_tokens"], "bf16", r["cache"])
        assert abs(est.peak / r["measured"] - 1) < 0.10, r
    for check in data["boundary"]:
        # the batch this code predicts for the stored budget, against the largest that really ran
        # there (recorded when the run's own prediction was off) or the run's prediction that ran
        cfg = ModelConfig(**next(r["config"] for r in data["rows"] if r["model"] == check["model"]))
        predicted = max_batch_inference(cfg, check["budget_bytes"], check["prompt"], check["new_tokens"], "bf16",
                                        check["cache"])
        ran = check["largest_batch_that_ran"] if check["largest_batch_that_ran"] is not None else check["predicted_max_batch"]
        assert isinstance(ran, int) and abs(predicted / ran - 1) <= 0.10, (predicted, check)


def test_inference_memory_parts_and_max_batch():
    from llmsys_lab.estimators import inference_memory, max_batch_inference

    cfg = get_preset("llama-2-7b")
    m = inference_memory(cfg, 8, 1024, 128)
    assert m.kv_cache == 8 * (1024 + 127) * kv_bytes_per_token(cfg, "bf16")
    assert m.peak > m.weights + m.kv_cache and m.phase in ("prefill", "decode")
    paged = inference_memory(cfg, 8, 1024, 128, cache="paged")
    assert paged.kv_cache == 8 * math.ceil(1152 / 16) * 16 * kv_bytes_per_token(cfg, "bf16")
    budget = 40 * 2**30
    b = max_batch_inference(cfg, budget, 1024, 128)
    assert inference_memory(cfg, b, 1024, 128).peak <= budget < inference_memory(cfg, b + 1, 1024, 128).peak
    # fewer than max_batch's KV-only count: activations and workspace take room too
    assert b < max_batch(cfg, budget, 1024 + 128, "bf16")
    assert max_batch_inference(cfg, 10 * 2**30, 1024, 128) == 0          # the weights alone do not fit
    with pytest.raises(ConfigError, match="unknown cache 'ring'"):
        inference_memory(cfg, 1, 8, 8, cache="ring")
    with pytest.raises(ConfigError, match="prompt must be a positive int"):
        inference_memory(cfg, 1, 0, 8)
