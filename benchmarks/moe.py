#!/usr/bin/env python3
"""MoE dispatch speed: the kit's three dispatch paths against transformers' Mixtral block.

For each (tokens, experts, top-k), one MoE layer's forward pass (inference, no gradients) is timed:

* ``hf eager``: ``MixtralSparseMoeBlock`` with its per-expert loop (the baseline of every ratio);
* ``hf grouped_mm``: the same block through transformers' grouped-matmul experts implementation;
* ``loop``, ``sorted``, ``triton``: ``llmsys_lab.moe.MoE`` with the same weights and each dispatch
  (``triton``: the grouped-GEMM kernel, one launch per projection for all experts).

Before timing, every path's output is compared with the baseline's (printed ``max |err|``). The ratio
column is baseline time / path time (above 1: faster than transformers' eager block).

    python benchmarks/moe.py            # GPU: bf16, hidden 1024, expert size 2816, tokens 4k-32k, 8-64 experts
    python benchmarks/moe.py --tiny     # anywhere (CPU, Triton interpreter): tiny sizes, for testing

Saves benchmarks/results/moe.json on a GPU (or the path given with --out).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import llmsys_lab  # noqa: F401  (sets the Triton interpreter up on machines without a GPU)
from llmsys_lab._runtime import triton_available
from llmsys_lab.moe import MoE, MoEConfig

GPU_GRID = dict(hidden=1024, intermediate=2816, tokens=(4096, 16384, 32768), experts=(8, 64), top_k=(1, 2))
TINY_GRID = dict(hidden=32, intermediate=48, tokens=(64,), experts=(4, 8), top_k=(1, 2))


def hf_block(hidden: int, intermediate: int, experts: int, top_k: int, implementation: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=experts,
                        num_experts_per_tok=top_k)
    cfg._experts_implementation = implementation
    return MixtralSparseMoeBlock(cfg)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of `repeats` calls after two warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(grid: dict, device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    rows = []
    paths = ["loop", "sorted"] + (["triton"] if triton_available() else [])
    for experts in grid["experts"]:
        for top_k in grid["top_k"]:
            torch.manual_seed(0)
            base = hf_block(grid["hidden"], grid["intermediate"], experts, top_k, "eager")
            with torch.no_grad():
                for p in base.parameters():
                    p.normal_(0, 0.02)
            base = base.to(device, dtype).eval()
            grouped = hf_block(grid["hidden"], grid["intermediate"], experts, top_k, "grouped_mm").to(device, dtype)
            grouped.load_state_dict(base.state_dict())
            ours = MoE(MoEConfig(grid["hidden"], grid["intermediate"], experts, top_k)).to(device, dtype)
            ours.load_hf_block(base)
            for tokens in grid["tokens"]:
                x = torch.randn(1, tokens, grid["hidden"], device=device, dtype=dtype)
                with torch.no_grad():
                    ref = base(x)
                    fns = {"hf eager": lambda: base(x), "hf grouped_mm": lambda: grouped(x)}
                    fns.update({p: (lambda p=p: ours(x, p)) for p in paths})
                    row = {"tokens": tokens, "experts": experts, "top_k": top_k, "ms": {}, "max_err": {}}
                    for name, fn in fns.items():
                        try:
                            row["max_err"][name] = (fn().float() - ref.float()).abs().max().item()
                            row["ms"][name] = timed(fn, repeats, device)
                        except Exception as e:  # noqa: BLE001 - e.g. grouped_mm unsupported on this device
                            row["ms"][name] = None
                            row["max_err"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                rows.append(row)
                print_row(row)
    return rows


def print_row(row: dict) -> None:
    base = row["ms"]["hf eager"]
    head = f"tokens {row['tokens']:>6}  experts {row['experts']:>3}  top-{row['top_k']}"
    parts = []
    for name, ms in row["ms"].items():
        if ms is None:
            parts.append(f"{name}: n/a ({row['max_err'][name]})")
        else:
            parts.append(f"{name}: {ms:8.3f} ms x{base / ms:5.2f} (err {row['max_err'][name]:.1e})")
    print(head + "\n    " + "\n    ".join(parts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on any device (CPU: Triton interpreter)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per path (median reported)")
    ap.add_argument("--out", type=Path, default=None, help="where to save the JSON results")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("no GPU: run with --tiny on a CPU (the full grid is 4k-32k tokens, 8-64 experts)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and not args.tiny else torch.float32
    grid = TINY_GRID if args.tiny else GPU_GRID
    repeats = args.repeats or (3 if args.tiny else 20)
    if repeats < 1:
        print(f"--repeats must be >= 1, got {repeats}", file=sys.stderr)
        return 2
    print(f"device {device}, {dtype}, hidden {grid['hidden']}, expert size {grid['intermediate']}; "
          f"ratio = hf eager time / path time")
    rows = run(grid, device, dtype, repeats)
    out = args.out or (Path(__file__).resolve().parent / "results" / "moe.json" if cuda and not args.tiny else None)
    if out is not None:
        from llmsys_lab.benchmarking import save_results
        save_results(out, {"grid": grid, "dtype": str(dtype), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
