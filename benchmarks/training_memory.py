#!/usr/bin/env python3
"""Training-step memory: the kit's estimate vs torch.cuda.max_memory_allocated on this GPU.

Random-weight transformers Llama models of three sizes (and a few variants: full activation
recomputation, fp32), AdamW, one measured step after a warm-up step. Prints the table and
saves it with a hardware fingerprint to benchmarks/results/training_memory.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from llmsys_lab.benchmarking import save_results
from llmsys_lab.configs import ModelConfig
from llmsys_lab.estimators.memory import training_memory
from llmsys_lab.estimators.measure import measure_training_peak
from llmsys_lab.estimators.params import param_count

V = 32000
MODELS = {
    "llama-160m": ModelConfig(name="llama-160m", hidden_size=768, num_layers=12, num_heads=12,
                              intermediate_size=2048, vocab_size=V),
    "llama-420m": ModelConfig(name="llama-420m", hidden_size=1024, num_layers=24, num_heads=16,
                              intermediate_size=2816, vocab_size=V),
    "llama-1.1b": ModelConfig(name="llama-1.1b", hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                              intermediate_size=5632, vocab_size=V),
}
RUNS = [  # model, batch, seq, precision, recompute
    ("llama-160m", 8, 1024, "mixed", False),
    ("llama-420m", 8, 1024, "mixed", False),
    ("llama-1.1b", 4, 2048, "mixed", False),
    ("llama-160m", 8, 1024, "mixed", True),
    ("llama-420m", 8, 1024, "mixed", True),
    ("llama-1.1b", 4, 2048, "mixed", True),
    ("llama-160m", 4, 1024, "fp32", False),
    ("llama-420m", 2, 2048, "fp32", False),
]


def main(out: Path = Path(__file__).parent / "results" / "training_memory.json") -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 0
    rows = []
    for name, b, s, precision, recompute in RUNS:
        cfg = MODELS[name]
        est = training_memory(cfg, b, s, precision=precision, recompute=recompute)
        measured = measure_training_peak(cfg, b, s, precision=precision, recompute=recompute)
        rows.append({"model": name, "params": param_count(cfg), "batch": b, "seq": s, "precision": precision,
                     "recompute": recompute, "estimate": est.peak, "measured": measured,
                     "error": est.peak / measured - 1, "activations": est.activations})
        r = rows[-1]
        print(f"{name:<11} b={b} s={s:<5} {precision:<6} recompute={recompute!s:<5} "
              f"estimate {r['estimate'] / 2**30:7.2f} GiB  measured {r['measured'] / 2**30:7.2f} GiB  "
              f"error {r['error']:+6.1%}", flush=True)
    save_results(out, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main(*(Path(a) for a in sys.argv[1:])))
