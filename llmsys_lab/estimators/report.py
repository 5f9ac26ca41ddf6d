"""A text report of every estimate for one model and workload (the CLI and the widget print it)."""
from __future__ import annotations

from ..configs import ModelConfig
from .flops import flop_distribution, format_flops_table, forward_flops_table, total_flops
from .memory import dtype_bytes, kv_bytes_per_token, max_batch, training_memory, weight_bytes
from .params import param_breakdown
from .roofline import decode_cost, get_gpu, prefill_cost

GiB = 2**30


def context_warning(cfg: ModelConfig, seq: int) -> str | None:
    """A warning when `seq` exceeds the positions the model was built for, else None."""
    if seq > cfg.max_position_embeddings:
        return (f"sequence {seq} exceeds {cfg.name}'s context of {cfg.max_position_embeddings} tokens: the numbers "
                "are for the shape alone; the model was not trained for this length")
    return None


def format_listing() -> str:
    """The presets and GPUs the estimator knows (``estimate --list``)."""
    from ..presets import PRESETS
    from .params import param_count
    from .roofline import GPUS

    lines = ["model presets:"]
    lines += [f"  {n:<13}{param_count(c) / 1e9:>7.2f} B params, context {c.max_position_embeddings}, "
              f"{c.num_heads} heads / {c.num_kv_heads} K/V heads" for n, c in PRESETS.items()]
    from .moe import MOE_PRESETS, moe_param_breakdown

    lines += ["MoE presets:"]
    for n, c in MOE_PRESETS.items():
        p, b = moe_param_breakdown(c), c.base
        lines.append(f"  {n:<18}{p['total'] / 1e9:>7.2f} B params ({p['active'] / 1e9:.2f} B active), "
                     f"{c.moe.num_experts} experts top-{c.moe.top_k}, context {b.max_position_embeddings}, "
                     f"{b.num_heads} heads / {b.num_kv_heads} K/V heads")
    lines += ["GPUs:"]
    lines += [f"  {n:<11}{g.flops / 1e12:>6.0f} TFLOP/s bf16, {g.bandwidth / 1e12:.2f} TB/s, {g.memory / GiB:.0f} GiB"
              for n, g in GPUS.items()]
    return "\n".join(lines)


def estimate(cfg: ModelConfig, batch: int = 1, seq: int = 4096, dtype: str = "bf16", gpu: str = "A100-80GB",
             causal: bool = False, precision: str = "mixed") -> dict:
    """Every number of the report, as plain data (the --json output)."""
    from .attention_path import model_attention_path

    dtype_bytes(dtype)
    g = get_gpu(gpu)
    rows = forward_flops_table(cfg, batch, seq, causal)
    path = model_attention_path(cfg, precision, capability=g.capability)      # PyTorch's order on that GPU
    mem = training_memory(cfg, batch, seq, precision, path=path)
    pre, dec = prefill_cost(cfg, batch, seq, dtype), decode_cost(cfg, batch, seq, dtype)
    try:
        fit = max_batch(cfg, g.memory, seq, dtype)
    except ValueError:
        fit = 0
    return {
        "model": cfg.name, "batch": batch, "seq": seq, "dtype": dtype, "gpu": gpu, "causal": causal,
        "precision": precision, "warnings": [w for w in (context_warning(cfg, seq),) if w],
        "attention_backend": {"backend": path.backend, "dtype": path.dtype, "kv_heads_seen_by_sdpa": path.kv_heads,
                              "enable_gqa": path.enable_gqa, "stores_scores": path.stores_scores,
                              "description": path.describe()},
        "params": param_breakdown(cfg),
        "forward_flops": total_flops(rows, cfg),
        "flop_table": [{"op": r.op, "shape": r.shape, "formula": r.formula, "flops": r.flops,
                        "total": r.total(cfg.num_layers)} for r in rows],
        "flop_distribution_percent": flop_distribution(rows, cfg),
        "training_memory_bytes": mem.as_dict(),
        "weights_bytes": weight_bytes(cfg, dtype),
        "kv_bytes_per_token": kv_bytes_per_token(cfg, dtype),
        "kv_bytes_per_request": kv_bytes_per_token(cfg, dtype) * seq,
        "max_batch_on_gpu": fit,
        "arithmetic_intensity": {"prefill": pre.intensity, "decode": dec.intensity, "ridge": g.ridge},
        "bound": {"prefill": pre.bound(g), "decode": dec.bound(g)},
    }


def format_report(cfg: ModelConfig, batch: int = 1, seq: int = 4096, dtype: str = "bf16",
                  gpu: str = "A100-80GB", causal: bool = False, precision: str = "mixed") -> str:
    e = estimate(cfg, batch, seq, dtype, gpu, causal, precision)
    p, m = e["params"], e["training_memory_bytes"]
    lines = [f"{cfg.name}: batch {batch}, sequence {seq}, {dtype}, {gpu}" + (", causal" if causal else "")]
    lines += [f"WARNING: {w}" for w in e["warnings"]]
    lines += ["", "parameters"]
    lines += [f"  {k:<11}{v:>16,}" for k, v in p.items()]
    lines += ["", f"forward FLOPs ({'causal' if causal else 'non-causal'} attention)",
              format_flops_table(forward_flops_table(cfg, batch, seq, causal), cfg),
              f"= {e['forward_flops'] / 1e12:.2f} TFLOPs forward, {3 * e['forward_flops'] / 1e12:.2f} TFLOPs training",
              "share: " + ", ".join(f"{k} {v:.3f}%" for k, v in e["flop_distribution_percent"].items()),
              "", f"training memory (AdamW, precision {precision})",
              f"  attention: {e['attention_backend']['description']}"]
    lines += [f"  {k:<20}{v / GiB:>9.2f} GiB" for k, v in m.items() if not isinstance(v, str)]
    lines += ["", "inference",
              f"  weights ({dtype})     {e['weights_bytes'] / GiB:9.2f} GiB",
              f"  KV cache per token  {e['kv_bytes_per_token'] / 1024:9.1f} KiB",
              f"  KV cache / request  {e['kv_bytes_per_request'] / GiB:9.3f} GiB  ({seq} tokens)",
              f"  max batch on {gpu}: {e['max_batch_on_gpu']} sequences of {seq} tokens",
              f"  arithmetic intensity: prefill {e['arithmetic_intensity']['prefill']:.1f}, "
              f"decode {e['arithmetic_intensity']['decode']:.1f} FLOPs/byte "
              f"(ridge {e['arithmetic_intensity']['ridge']:.1f}): prefill {e['bound']['prefill']}-bound, "
              f"decode {e['bound']['decode']}-bound"]
    return "\n".join(lines)


# ---- MoE presets ------------------------------------------------------------------------------
MOE_NOT_ESTIMATED = ("training memory (the activation model is the dense block's)", "the attention backend",
                     "parallel plans (--tp/--pp/--dp/--zero/--micro-batches)")


def estimate_moe(cfg, batch: int = 1, seq: int = 4096, dtype: str = "bf16", gpu: str = "A100-80GB",
                 causal: bool = False) -> dict:
    """The MoE counterpart of ``estimate`` (the --json output for an MoE preset): total and active
    parameters, FLOPs (every token runs k experts: active compute), weight and KV memory, the roofline
    with the experts a step is expected to touch, and the dense model of equal active compute beside it."""
    from .moe import (dense_vs_moe, expected_experts_touched, moe_decode_cost, moe_forward_flops,
                      moe_forward_flops_table, moe_param_breakdown, moe_prefill_cost)

    b = dtype_bytes(dtype)
    g = get_gpu(gpu)
    base, m = cfg.base, cfg.moe
    rows = moe_forward_flops_table(cfg, batch, seq, causal)
    params = moe_param_breakdown(cfg)
    weights = params["total"] * b
    kv_token = kv_bytes_per_token(base, dtype)
    usable = g.memory - weights
    pre, dec = moe_prefill_cost(cfg, batch, seq, dtype), moe_decode_cost(cfg, batch, seq, dtype)
    flops = moe_forward_flops(cfg, batch, seq, causal)
    return {
        "model": cfg.name, "kind": "moe", "batch": batch, "seq": seq, "dtype": dtype, "gpu": gpu, "causal": causal,
        "warnings": [w for w in (context_warning(base, seq),) if w],
        "moe": {"arch": cfg.arch, "num_experts": m.num_experts, "top_k": m.top_k,
                "expert_intermediate_size": m.intermediate_size, "shared_expert_size": m.shared_expert_size,
                "norm_topk_prob": m.norm_topk_prob},
        "params": params,
        "active_fraction": params["active"] / params["total"],
        "forward_flops": flops,
        "forward_flops_per_token": flops / (batch * seq),
        "flop_table": [{"op": r.op, "shape": r.shape, "formula": r.formula, "flops": r.flops,
                        "total": r.total(base.num_layers)} for r in rows],
        "flop_distribution_percent": flop_distribution(rows, base),
        "weights_bytes": weights,
        "active_weights_bytes": params["active"] * b,
        "kv_bytes_per_token": kv_token,
        "kv_bytes_per_request": kv_token * seq,
        "max_batch_on_gpu": max(0, int(usable // (kv_token * seq))) if usable > 0 else 0,
        "experts_touched_per_layer": {"prefill": expected_experts_touched(m.num_experts, m.top_k, batch * seq),
                                      "decode": expected_experts_touched(m.num_experts, m.top_k, batch)},
        "arithmetic_intensity": {"prefill": pre.intensity, "decode": dec.intensity, "ridge": g.ridge},
        "bound": {"prefill": pre.bound(g), "decode": dec.bound(g)},
        "dense_vs_moe": dense_vs_moe(cfg, seq, weight_bytes_per_param=b),
        "not_estimated": list(MOE_NOT_ESTIMATED),
    }


def format_moe_report(cfg, batch: int = 1, seq: int = 4096, dtype: str = "bf16", gpu: str = "A100-80GB",
                      causal: bool = False) -> str:
    from .moe import format_dense_vs_moe, moe_forward_flops_table

    e = estimate_moe(cfg, batch, seq, dtype, gpu, causal)
    p, m, g_mem, touched = e["params"], e["moe"], get_gpu(gpu).memory, e["experts_touched_per_layer"]
    shared = f" + a shared expert of {m['shared_expert_size']}" if m["shared_expert_size"] else ""
    lines = [f"{cfg.name}: batch {batch}, sequence {seq}, {dtype}, {gpu}" + (", causal" if causal else ""),
             f"MoE: {m['num_experts']} experts of intermediate size {m['expert_intermediate_size']}, top-{m['top_k']}"
             f"{shared}, top-k weights {'renormalised' if m['norm_topk_prob'] else 'not renormalised'}"]
    lines += [f"WARNING: {w}" for w in e["warnings"]]
    lines += ["", "parameters (total: stored; active: used by one token)"]
    lines += [f"  {k:<11}{v:>16,}" for k, v in p.items()]
    lines += [f"  active / total = {e['active_fraction']:.3f}",
              "", f"forward FLOPs ({'causal' if causal else 'non-causal'} attention; "
                  f"each token runs {m['top_k']} experts)",
              format_flops_table(moe_forward_flops_table(cfg, batch, seq, causal), cfg.base),
              f"= {e['forward_flops'] / 1e12:.2f} TFLOPs forward, {e['forward_flops_per_token'] / 1e9:.2f} GFLOPs "
              f"per token (active), {3 * e['forward_flops'] / 1e12:.2f} TFLOPs training",
              "share: " + ", ".join(f"{k} {v:.3f}%" for k, v in e["flop_distribution_percent"].items()),
              "", "inference",
              f"  weights ({dtype})     {e['weights_bytes'] / GiB:9.2f} GiB  (all experts are stored)",
              f"  active weights      {e['active_weights_bytes'] / GiB:9.2f} GiB  (what one token uses)",
              f"  KV cache per token  {e['kv_bytes_per_token'] / 1024:9.1f} KiB",
              f"  KV cache / request  {e['kv_bytes_per_request'] / GiB:9.3f} GiB  ({seq} tokens)",
              f"  max batch on {gpu}: {e['max_batch_on_gpu']} sequences of {seq} tokens"
              + (f" (the weights alone do not fit in its {g_mem / GiB:.0f} GiB)"
                 if e["weights_bytes"] >= g_mem else ""),
              f"  experts touched per layer (uniform routing): prefill {touched['prefill']:.1f}, "
              f"decode {touched['decode']:.2f} of {m['num_experts']}",
              f"  arithmetic intensity: prefill {e['arithmetic_intensity']['prefill']:.1f}, "
              f"decode {e['arithmetic_intensity']['decode']:.1f} FLOPs/byte "
              f"(ridge {e['arithmetic_intensity']['ridge']:.1f}): prefill {e['bound']['prefill']}-bound, "
              f"decode {e['bound']['decode']}-bound",
              "", f"dense model of equal active compute vs {cfg.name} (sequence {seq}, weights in {dtype})",
              format_dense_vs_moe(e["dense_vs_moe"]),
              "", "not estimated for MoE presets: " + "; ".join(e["not_estimated"])]
    return "\n".join(lines)
