"""A text report of every estimate for one model and workload (the CLI and the widget print it)."""
from __future__ import annotations

from ..configs import ModelConfig
from .flops import flop_distribution, format_flops_table, forward_flops_table, total_flops
from .memory import dtype_bytes, kv_bytes_per_token, max_batch, training_memory, weight_bytes
from .params import param_breakdown
from .roofline import decode_cost, get_gpu, prefill_cost

GiB = 2**30


def estimate(cfg: ModelConfig, batch: int = 1, seq: int = 4096, dtype: str = "bf16", gpu: str = "A100-80GB",
             causal: bool = False) -> dict:
    """Every number of the report, as plain data (the --json output)."""
    dtype_bytes(dtype)
    g = get_gpu(gpu)
    rows = forward_flops_table(cfg, batch, seq, causal)
    mem = training_memory(cfg, batch, seq)
    pre, dec = prefill_cost(cfg, batch, seq, dtype), decode_cost(cfg, batch, seq, dtype)
    try:
        fit = max_batch(cfg, g.memory, seq, dtype)
    except ValueError:
        fit = 0
    return {
        "model": cfg.name, "batch": batch, "seq": seq, "dtype": dtype, "gpu": gpu, "causal": causal,
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
                  gpu: str = "A100-80GB", causal: bool = False) -> str:
    e = estimate(cfg, batch, seq, dtype, gpu, causal)
    p, m = e["params"], e["training_memory_bytes"]
    lines = [f"{cfg.name}: batch {batch}, sequence {seq}, {dtype}, {gpu}" + (", causal" if causal else ""),
             "", "parameters"]
    lines += [f"  {k:<11}{v:>16,}" for k, v in p.items()]
    lines += ["", f"forward FLOPs ({'causal' if causal else 'non-causal'} attention)",
              format_flops_table(forward_flops_table(cfg, batch, seq, causal), cfg),
              f"= {e['forward_flops'] / 1e12:.2f} TFLOPs forward, {3 * e['forward_flops'] / 1e12:.2f} TFLOPs training",
              "share: " + ", ".join(f"{k} {v:.3f}%" for k, v in e["flop_distribution_percent"].items()),
              "", "training memory (AdamW, mixed precision)"]
    lines += [f"  {k:<17}{v / GiB:>9.2f} GiB" for k, v in m.items()]
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
