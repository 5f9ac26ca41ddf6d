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
