#!/usr/bin/env python3
"""Training-step memory on a grid: the kit's estimate vs torch.cuda.max_memory_allocated.

Grid: precision {fp32, mixed (bf16 autocast)} x attention {MHA, GQA, MQA} x sequence
{512, 2048, 8192} x recompute {off, on}, at two model sizes (72 points); a constant number of
tokens per step (batch x sequence = 8192). Random-weight transformers Llama models, AdamW, one
measured step after a warm-up step; the warm-up runs under the profiler, which records the SDPA
backend that really ran (flash / memory-efficient / cuDNN / math). A point whose estimate does
not fit in 90% of the free GPU memory is skipped and listed with the reason.

Saves benchmarks/results/training_memory.json (rows: estimate, measured, error, the estimated
and the measured backend, the model's config) with a hardware fingerprint. 133 s on an H200
(all 72 points fit there). `--quick` runs the smaller model only.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from llmsys_lab.benchmarking import save_results
from llmsys_lab.configs import ModelConfig
from llmsys_lab.estimators.attention_path import model_attention_path
from llmsys_lab.estimators.measure import measure_training_step
from llmsys_lab.estimators.memory import training_memory
from llmsys_lab.estimators.params import param_count

V = 32000
TOKENS = 8192                     # batch x sequence of every point
ATTENTION = {"MHA": None, "GQA": 4, "MQA": 1}   # K/V heads (None: as many as query heads)
SIZES = {
    "llama-60m": ModelConfig(name="llama-60m", hidden_size=512, num_layers=8, num_heads=8,
                             intermediate_size=1408, vocab_size=V, max_position_embeddings=8192),
    "llama-200m": ModelConfig(name="llama-200m", hidden_size=1024, num_layers=12, num_heads=16,
                              intermediate_size=2816, vocab_size=V, max_position_embeddings=8192),
}
# one model per (size, attention)
MODELS = {f"{size}-{att.lower()}": cfg.replace(name=f"{size}-{att.lower()}", num_kv_heads=kv or cfg.num_heads)
          for size, cfg in SIZES.items() for att, kv in ATTENTION.items()}
# the models of the earlier three-point runs, so older results files still load
MODELS.update({
    "llama-160m": ModelConfig(name="llama-160m", hidden_size=768, num_layers=12, num_heads=12,
                              intermediate_size=2048, vocab_size=V),
    "llama-420m": ModelConfig(name="llama-420m", hidden_size=1024, num_layers=24, num_heads=16,
                              intermediate_size=2816, vocab_size=V),
    "llama-1.1b": ModelConfig(name="llama-1.1b", hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                              intermediate_size=5632, vocab_size=V),
})
SEQS = (512, 2048, 8192)
PRECISIONS = ("fp32", "mixed")


def grid(sizes=tuple(SIZES)):
    for size in sizes:
        for att in ATTENTION:
            for precision in PRECISIONS:
                for seq in SEQS:
                    for recompute in (False, True):
                        yield f"{size}-{att.lower()}", att, TOKENS // seq, seq, precision, recompute


def main(out: Path = Path(__file__).parent / "results" / "training_memory.json", quick: bool = False) -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 0
    cap = torch.cuda.get_device_capability()
    rows, skipped = [], []
    start = time.perf_counter()
    for name, att, b, s, precision, recompute in grid(("llama-60m",) if quick else tuple(SIZES)):
        cfg = MODELS[name]
        path = model_attention_path(cfg, precision, capability=cap)      # PyTorch's order on this GPU
        est = training_memory(cfg, b, s, precision=precision, recompute=recompute, path=path)
        free, _ = torch.cuda.mem_get_info()
        if est.peak > 0.9 * free:
            skipped.append({"model": name, "batch": b, "seq": s, "precision": precision, "recompute": recompute,
                            "reason": f"estimate {est.peak / 2**30:.1f} GiB > 90% of the free {free / 2**30:.1f} GiB"})
            print(f"skip {name} b={b} s={s} {precision} recompute={recompute}: {skipped[-1]['reason']}")
            continue
        got = measure_training_step(cfg, b, s, precision=precision, recompute=recompute)
        rows.append({"model": name, "attention": att, "config": cfg.to_dict(), "params": param_count(cfg),
                     "batch": b, "seq": s, "precision": precision, "recompute": recompute,
                     "estimate": est.peak, "measured": got["peak"], "error": est.peak / got["peak"] - 1,
                     "activations": est.activations, "backend_estimated": est.attention_backend,
                     "backend_measured": got["backend"]})
        r = rows[-1]
        print(f"{name:<15} b={b:<3} s={s:<5} {precision:<6} recompute={recompute!s:<5} "
              f"backend {r['backend_estimated']:>9}/{r['backend_measured']:<9} "
              f"estimate {r['estimate'] / 2**30:7.2f} GiB  measured {r['measured'] / 2**30:7.2f} GiB  "
              f"error {r['error']:+6.1%}", flush=True)
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"\n{len(rows)} points, {len(skipped)} skipped, {time.perf_counter() - start:.0f} s; largest error "
          f"{worst['error']:+.1%} ({worst['model']} s={worst['seq']} {worst['precision']} recompute={worst['recompute']}); "
          f"backend predicted correctly at {sum(r['backend_estimated'] == r['backend_measured'] for r in rows)}/{len(rows)} points")
    save_results(out, {"rows": rows, "skipped": skipped, "capability": list(cap), "tokens_per_step": TOKENS})
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    sys.exit(main(*(Path(a) for a in args), quick="--quick" in sys.argv))
