#!/usr/bin/env python3
"""The kit's Triton FlashAttention vs PyTorch SDPA (each backend pinned) and naive attention, on this GPU.

Grid (bf16): head dim 64 and 128; sequence 1k, 4k, 16k with batch x seq = 16k tokens and hidden 2048
(heads = 2048 / head_dim); causal and not. Every number comes from this run: forward and backward
times (triton.testing.do_bench medians), TFLOP/s with the usual convention (4 B H S^2 D forward,
x0.5 causal, x2.5 backward), the fraction of this GPU's measured bf16 matmul rate, and the ratio
of the kit's kernel to each baseline. Before timing, each shape's output and gradients are checked
against SDPA. Results go to benchmarks/results/flash_attention.json with a hardware fingerprint.

    python benchmarks/flash_attention.py            # the grid, with the kernel's built-in tile configs
    python benchmarks/flash_attention.py --tune     # first sweep tile configs per (head dim, causal)
    python benchmarks/flash_attention.py --quick    # one shape per head dim (a smoke run)
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from llmsys_lab.benchmarking import save_results
from llmsys_lab.kernels import flash_attention as fa

TOKENS, HIDDEN = 16384, 2048
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
C = fa.KernelConfig
TUNE_FWD = [C(128, 64, 4, 3), C(128, 64, 8, 3), C(128, 64, 8, 4), C(128, 128, 8, 2), C(128, 128, 8, 3),
            C(64, 64, 4, 3), C(128, 32, 4, 4)]
TUNE_DKDV = [C(64, 128, 8, 2), C(64, 128, 8, 3), C(32, 128, 4, 3), C(64, 64, 4, 3), C(128, 128, 8, 2),
             C(32, 64, 4, 3)]
TUNE_DQ = [C(128, 64, 8, 2), C(128, 64, 8, 3), C(64, 64, 4, 3), C(128, 128, 8, 2), C(64, 128, 8, 2)]


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms = do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192 ** 3 / (ms * 1e-3)


def inputs(batch, heads, seq, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda: torch.randn(batch, heads, seq, d, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v, do = mk(), mk(), mk(), mk()
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_fwd_bwd(fn, q, k, v, do):
    """Median forward ms and backward ms (the backward timed alone on a retained graph)."""
    with torch.no_grad():
        fwd = do_bench(lambda: fn(q, k, v), return_mode="median")
    o = fn(q, k, v)
    bwd = do_bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), return_mode="median")
    return fwd, bwd


def sdpa(backend, causal):
    def run(q, k, v):
        with sdpa_kernel(BACKENDS[backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def naive(causal):
    return lambda q, k, v: fa.reference_attention(q, k, v, causal)


def kit(causal):
    return lambda q, k, v: fa.flash_attention(q, k, v, causal)


def check(q, k, v, do, causal):
    """The kit's output and gradients against SDPA (flash backend) on these inputs."""
    o = fa.flash_attention(q, k, v, causal)
    g = torch.autograd.grad(o, (q, k, v), do)
    o_ref = sdpa("flash", causal)(q, k, v)
    g_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    errs = [rel(o, o_ref)] + [rel(a, b) for a, b in zip(g, g_ref)]
    if not all(e < 2e-2 for e in errs) or torch.isnan(o).any():
        raise SystemExit(f"kernel disagrees with SDPA: relative errors O,dQ,dK,dV = {errs}")
    return max(errs)


def tune(d, causal, seq=4096):
    heads, batch = HIDDEN // d, TOKENS // seq
    q, k, v, do = inputs(batch, heads, seq, d)
    best = {}
    with torch.no_grad():
        res = []
        for c in TUNE_FWD:
            try:
                ms = do_bench(lambda: fa._forward(q, k, v, causal, None, c), return_mode="median")
            except Exception as e:           # a config may not fit in shared memory
                print(f"  fwd {c}: {type(e).__name__}")
                continue
            res.append((ms, c))
        best["fwd"] = min(res, key=lambda t: t[0])
        ptr_ms = do_bench(lambda: fa._forward(q, k, v, causal, None, best["fwd"][1], tma=False), return_mode="median")
        print(f"  fwd {best['fwd'][1]}: {best['fwd'][0]:.3f} ms with tensor descriptors (TMA), "
              f"{ptr_ms:.3f} ms with pointer loads")
        o, lse = fa._forward(q, k, v, causal, None)
        scale = 1 / math.sqrt(d)
        for name, grid, slot in (("dkdv", TUNE_DKDV, 0), ("dq", TUNE_DQ, 1)):
            res = []
            for c in grid:
                cfgs = [None, None]
                cfgs[slot] = c
                try:
                    ms = do_bench(lambda: fa._backward(do, q, k, v, o, lse, causal, scale, tuple(cfgs)),
                                  return_mode="median")
                except Exception as e:
                    print(f"  {name} {c}: {type(e).__name__}")
                    continue
                res.append((ms, c))
            best[name] = min(res, key=lambda t: t[0])
    print(f"tuned d={d} causal={causal}: " + ", ".join(f"{k} {c} {ms:.3f} ms" for k, (ms, c) in best.items()))
    key = (d, causal)
    fa.FWD_CONFIGS[key], fa.DKDV_CONFIGS[key], fa.DQ_CONFIGS[key] = best["fwd"][1], best["dkdv"][1], best["dq"][1]
    return {k: (ms, c.__dict__) for k, (ms, c) in best.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", action="store_true", help="sweep tile configs first and use the best")
    ap.add_argument("--quick", action="store_true", help="seq 4k only")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "flash_attention.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 0
    torch.manual_seed(0)
    peak = matmul_peak()
    print(f"{torch.cuda.get_device_name(0)}: bf16 matmul (8192^3, random data) {peak / 1e12:.0f} TFLOP/s")
    tuned = {}
    if args.tune:
        for d in (64, 128):
            for causal in (False, True):
                tuned[f"d{d}_{'causal' if causal else 'full'}"] = tune(d, causal)
    seqs = (4096,) if args.quick else (1024, 4096, 16384)
    rows = []
    for d in (64, 128):
        for causal in (False, True):
            for seq in seqs:
                heads, batch = HIDDEN // d, TOKENS // seq
                q, k, v, do = inputs(batch, heads, seq, d, seed=seq + d)
                err = check(q, k, v, do, causal)
                fl = fa.attention_flops(batch, heads, seq, seq, d, causal)
                row = {"d": d, "causal": causal, "seq": seq, "batch": batch, "heads": heads, "max_rel_err": err}
                for name, fn in [("kit", kit(causal)), *[(b, sdpa(b, causal)) for b in BACKENDS], ("naive", naive(causal))]:
                    try:
                        f_ms, b_ms = time_fwd_bwd(fn, q, k, v, do)
                    except (RuntimeError, torch.OutOfMemoryError) as e:   # e.g. math/naive out of memory
                        row[name] = None
                        print(f"  {name} d={d} seq={seq}: {str(e).splitlines()[0][:80]}")
                        torch.cuda.empty_cache()
                        continue
                    row[name] = {"fwd_ms": f_ms, "bwd_ms": b_ms, "fwd_tflops": fl / f_ms / 1e9,
                                 "bwd_tflops": 2.5 * fl / b_ms / 1e9}
                rows.append(row)
                r = row
                print(f"d={d:3d} causal={causal!s:5} seq={seq:5d}  kit fwd {r['kit']['fwd_tflops']:5.0f} bwd "
                      f"{r['kit']['bwd_tflops']:5.0f} | cudnn {r['cudnn']['fwd_tflops']:5.0f} {r['cudnn']['bwd_tflops']:5.0f}"
                      f" | flash {r['flash']['fwd_tflops']:5.0f} {r['flash']['bwd_tflops']:5.0f} TFLOP/s  err {err:.1e}",
                      flush=True)
                del q, k, v, do
                torch.cuda.empty_cache()

    def gmean(xs):
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    summary = {}
    for base in ("cudnn", "flash", "efficient"):
        for pas in ("fwd", "bwd"):
            xs = [r[base][f"{pas}_ms"] / r["kit"][f"{pas}_ms"] for r in rows if r.get(base)]
            summary[f"{pas}_vs_{base}"] = gmean(xs) if xs else None
    print("\n| d | causal | seq | kit fwd | kit bwd | cuDNN fwd | cuDNN bwd | flash fwd | flash bwd | efficient fwd | "
          "math fwd | naive fwd | kit speed-up vs cuDNN fwd | kit speed-up vs flash fwd | kit speed-up vs flash bwd | "
          "kit fwd % of matmul |")
    print("| --- " * 16 + "|")
    f = lambda r, n, p: f"{r[n][p + '_tflops']:.0f}" if r.get(n) else "OOM"   # noqa: E731
    for r in rows:
        print(f"| {r['d']} | {r['causal']} | {r['seq']} | {f(r, 'kit', 'fwd')} | {f(r, 'kit', 'bwd')} | "
              f"{f(r, 'cudnn', 'fwd')} | {f(r, 'cudnn', 'bwd')} | {f(r, 'flash', 'fwd')} | {f(r, 'flash', 'bwd')} | "
              f"{f(r, 'efficient', 'fwd')} | {f(r, 'math', 'fwd')} | {f(r, 'naive', 'fwd')} | "
              f"{r['cudnn']['fwd_ms'] / r['kit']['fwd_ms']:.2f}x | {r['flash']['fwd_ms'] / r['kit']['fwd_ms']:.2f}x | "
              f"{r['flash']['bwd_ms'] / r['kit']['bwd_ms']:.2f}x | {100 * r['kit']['fwd_tflops'] * 1e12 / peak:.0f}% |")
    print("(TFLOP/s; speed-up = baseline time / kit time, > 1 means the kit's kernel is faster)")
    print("geometric means: " + ", ".join(f"kit {k.replace('_vs_', ' vs ')} {v:.2f}x" for k, v in summary.items() if v))
    save_results(args.out, {"matmul_peak_tflops": peak / 1e12, "tokens": TOKENS, "hidden": HIDDEN,
                            "rows": rows, "geomean_speedup": summary, "tuned": tuned,
                            "configs": {name: {f"d{d}_{'causal' if c else 'full'}": cfg.__dict__ for (d, c), cfg in table.items()}
                                        for name, table in (("fwd", fa.FWD_CONFIGS), ("dkdv", fa.DKDV_CONFIGS),
                                                            ("dq", fa.DQ_CONFIGS))}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
