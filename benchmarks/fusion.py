#!/usr/bin/env python3
"""Operator fusion measured: residual add + RMSNorm as separate PyTorch ops, under torch.compile, and as
the kit's fused Triton kernel (llmsys_lab.kernels.fused_norm), on this GPU.

The op is memory-bound: a few FLOPs per element, so its time is set by bytes moved through HBM. Each row
reports, for one (tokens, hidden) shape in bf16:

* ``bytes_moved``: the floor any implementation must move (read x and residual, write new_residual and
  normed; the weight once), by formula (fused_norm.bytes_moved). GB/s = bytes_moved / time: the
  *effective* bandwidth, comparable across the three, and to the copy bandwidth measured in this run;
* ``eager_bytes``: the bytes the separate ops move, counted operator by operator (EAGER_OPS): the
  reason they are slower;
* ms (triton.testing.do_bench median), and the ratio ``speedup_vs_separate`` = separate ms / this ms.

Before timing, each implementation's outputs are compared with the separate ops': ``new_residual_equal``
(bit for bit) and ``max_abs_err_normed``. The fused kernel normalises the bf16-rounded sum, as eager does;
torch.compile may normalise the fp32 sum before rounding it, so its normed output can differ from eager's
in the last bf16 bit. Results go to
benchmarks/results/fusion.json with a hardware fingerprint and the copy bandwidth.

    python benchmarks/fusion.py            # the grid (a GPU)
    python benchmarks/fusion.py --tiny     # tiny shapes on the CPU (Triton interpreter): a smoke run, not a result
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from llmsys_lab.benchmarking import save_results          # before Triton: sets the interpreter up on a CPU
from llmsys_lab.kernels.fused_norm import bytes_moved, fused_add_rmsnorm

TOKENS = [1, 16, 256, 4096, 16384]
HIDDEN = [1024, 4096, 8192]
TINY_TOKENS, TINY_HIDDEN = [1, 5], [64, 96]
EPS = 1e-6
OUT = Path(__file__).parent / "results" / "fusion.json"

# What eager PyTorch runs for `h = x + residual; RMSNorm(h)` (llmsys_lab.layers.RMSNorm.forward), one kernel
# per line, with the elements it reads and writes per element of the hidden vector, in bytes of the input
# dtype (d) and fp32 (4). The mean writes one number per row and the rsqrt works on those: ~0 bytes.
EAGER_OPS = [
    ("h = x + residual", lambda d: 2 * d + d),
    ("h.float()", lambda d: d + 4),
    ("x32.pow(2)", lambda d: 4 + 4),
    (".mean(-1)", lambda d: 4),
    ("x32 * rsqrt(...)", lambda d: 4 + 4),
    (".to(dtype)", lambda d: 4 + d),
    ("weight * ...", lambda d: d + d),
]


def eager_bytes(rows: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes the separate ops move (EAGER_OPS), assuming each intermediate goes through HBM."""
    d = torch.empty((), dtype=dtype).element_size()
    return rows * hidden * sum(f(d) for _, f in EAGER_OPS) + hidden * d


def separate(x, residual, weight, eps=EPS):
    """The unfused code path: the add, then the kit's RMSNorm forward, as eager PyTorch runs it."""
    h = x + residual
    h32 = h.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h32.to(h.dtype), h


def time_ms(fn, device: torch.device, repeats: int = 5) -> float:
    """Median ms: triton.testing.do_bench on a GPU (it flushes L2 between calls); wall clock on a CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a large device-to-device copy: the practical ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3)


def compiled_fn():
    """torch.compile of the same function, fresh for each shape (no recompilation limit, no shape guards)."""
    torch._dynamo.reset()
    return torch.compile(separate, dynamic=False)


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def run(tokens, hidden, dtype, device, use_compile=True) -> list[dict]:
    rows = []
    for h in hidden:
        for t in tokens:
            g = torch.Generator().manual_seed(t * 7 + h)
            x = torch.randn(t, h, generator=g).to(device=device, dtype=dtype)
            r = torch.randn(t, h, generator=g).to(device=device, dtype=dtype)
            w = (1 + 0.1 * torch.randn(h, generator=g)).to(device=device, dtype=dtype)
            want_n, want_h = separate(x, r, w)
            impls = {"separate": separate, "fused_triton": fused_add_rmsnorm}
            if use_compile:
                impls["torch_compile"] = compiled_fn()
            floor = bytes_moved(t, h, dtype)
            base = None
            for name, fn in impls.items():
                row = {"op": name, "tokens": t, "hidden": h, "shape": [t, h], "dtype": str(dtype).split(".")[-1],
                       "bytes_moved": floor, "eager_bytes": eager_bytes(t, h, dtype) if name == "separate" else None}
                try:
                    got_n, got_h = fn(x, r, w, EPS)
                    row["max_abs_err_normed"] = max_err(got_n, want_n)
                    row["new_residual_equal"] = bool(torch.equal(got_h, want_h))
                    ms = time_ms(lambda: fn(x, r, w, EPS), device)
                except Exception as err:                      # e.g. torch.compile without a C++ compiler
                    row.update(ms=None, gb_per_s=None, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
                    rows.append(row)
                    print(f"T={t:>6} H={h:>5} {name:<14} failed: {row['error']}", flush=True)
                    continue
                base = ms if name == "separate" else base
                row.update(ms=ms, gb_per_s=floor / (ms * 1e-3) / 1e9,
                           speedup_vs_separate=(base / ms) if base else None, error=None)
                rows.append(row)
                print(f"T={t:>6} H={h:>5} {name:<14} {ms * 1e3:9.1f} us {row['gb_per_s']:8.1f} GB/s  "
                      f"x{row['speedup_vs_separate'] or float('nan'):5.2f} vs separate  "
                      f"err {row['max_abs_err_normed']:.1e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on any device (the CPU: the interpreter)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to save (default {OUT} on a GPU; a --tiny run saves only where told)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        print("benchmarks/fusion.py measures a GPU; on a CPU run it with --tiny (a smoke run)", file=sys.stderr)
        return 2
    tokens, hidden = (TINY_TOKENS, TINY_HIDDEN) if args.tiny else (TOKENS, HIDDEN)
    bw = copy_bandwidth(device, (1 << 20) if args.tiny else (1 << 30))
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"{name}: copy bandwidth {bw / 1e9:.1f} GB/s; bf16; eps {EPS}", flush=True)
    rows = run(tokens, hidden, torch.bfloat16, device, use_compile=not args.no_compile)
    for row in rows:
        row["bw_fraction"] = row["gb_per_s"] * 1e9 / bw if row.get("gb_per_s") else None
    ok = [r for r in rows if r["op"] == "fused_triton" and r["error"] is None]
    if ok:
        print(f"\nfused kernel: {min(r['speedup_vs_separate'] for r in ok):.2f}x .. "
              f"{max(r['speedup_vs_separate'] for r in ok):.2f}x the separate ops; at the largest shape "
              f"{ok[-1]['bw_fraction']:.0%} of copy bandwidth")
    out = args.out or (None if args.tiny else OUT)
    if out is not None:
        save_results(out, {"rows": rows, "eps": EPS, "tiny": args.tiny,
                           "eager_ops": [name for name, _ in EAGER_OPS]}, copy_bandwidth=bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
