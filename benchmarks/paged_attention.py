#!/usr/bin/env python3
"""Paged decode attention (Triton) vs contiguous SDPA decode, on this GPU.

Decode attention reads every cached K and V once: it is memory-bound, so the figure of merit is
achieved bandwidth (bytes of K/V read per second) as a fraction of the GPU's measured copy
bandwidth (bytes read + written per second by a large device-to-device copy). Both sides are
timed in the same run with triton.testing.do_bench (median). Results go to
benchmarks/results/paged_attention.json with a hardware fingerprint.

At every shape it times the unsplit kernel (num_splits=1) and the split-KV path: the automatic
choice (choose_num_splits) and a sweep of fixed splits, each at its best launch config. Ratios
are baseline time / kit time (> 1: the kit is faster), against contiguous SDPA, and achieved
bandwidth as a share of copy bandwidth. The targets (issue: performance work): >= 0.9x SDPA at
every shape, >= 85% of copy bandwidth where batch x context >= 32 x 2k. The last lines say
whether the automatic choice was never slower than unsplit, the condition for making it the default.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llmsys_lab.benchmarking import save_results          # before Triton: sets the interpreter up on a CPU
from llmsys_lab.kernels.paged_attention import choose_num_splits, paged_attention_decode
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402  (isort: skip)

H, H_KV, D, BLOCK = 32, 8, 128, 16
SHAPES = [(1, 4096), (8, 4096), (32, 2048), (32, 8192), (64, 4096), (128, 4096), (256, 2048)]
CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (32, 4, 3)]     # block_n, warps, stages
SPLITS = [2, 4, 8, 16, 32]                                                    # fixed splits, besides 1 and auto
BW_TARGET_TOKENS = 32 * 2048                                                  # batch x context from which >= 85%


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def setup(b, ctx, dtype=torch.bfloat16):
    blocks_per_seq = ctx // BLOCK
    num_blocks = b * blocks_per_seq
    perm = torch.randperm(num_blocks, device="cuda").int()
    tables = perm.view(b, blocks_per_seq)
    q = torch.randn(b, H, D, device="cuda", dtype=dtype)
    kc = torch.randn(num_blocks, BLOCK, H_KV, D, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    # the same K/V laid out contiguously per sequence, for SDPA
    k = kc[tables.long()].reshape(b, ctx, H_KV, D).transpose(1, 2).contiguous()
    v = vc[tables.long()].reshape(b, ctx, H_KV, D).transpose(1, 2).contiguous()
    return q, kc, vc, tables, lens, k, v


def main(out=Path(__file__).parent / "results" / "paged_attention.json") -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 0
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s; H={H}, H_kv={H_KV}, D={D}, "
          f"block size {BLOCK}, bf16")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for b, ctx in SHAPES:
        q, kc, vc, bt, lens, k, v = setup(b, ctx)
        paged_attention_decode(q, kc, vc, bt, lens)          # the tables checked once; the timed calls skip it
        ref = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
        sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)  # noqa: E731
        sdpa_ms = do_bench(sdpa, return_mode="median")
        sdpa_graph_ms = do_bench_cudagraph(sdpa, return_mode="median")
        kv_bytes = 2 * b * ctx * H_KV * D * 2
        auto = choose_num_splits(b, H_KV, ctx, sms)
        r = {"batch": b, "context": ctx, "sdpa_ms": sdpa_ms, "sdpa_bw_fraction": kv_bytes / (sdpa_ms * 1e-3) / bw,
             "sdpa_graph_ms": sdpa_graph_ms, "sdpa_graph_bw_fraction": kv_bytes / (sdpa_graph_ms * 1e-3) / bw,
             "auto_splits": auto, "splits": {}}
        for splits in sorted({1, auto, *SPLITS}):
            best = None
            for block_n, warps, stages in CONFIGS:
                fn = lambda: paged_attention_decode(q, kc, vc, bt, lens, block_n=block_n, num_warps=warps,  # noqa: E731
                                                    num_stages=stages, check=False, num_splits=splits)
                err = (fn().float() - ref.float()).abs().max().item()
                ms = do_bench(fn, return_mode="median")
                if best is None or ms < best[0]:
                    best = (ms, (block_n, warps, stages), err)
            block_n, warps, stages = best[1]
            # the same call replayed from a CUDA graph: GPU time only, no Python or launch cost (as in
            # the engine's graphed decode, and as SDPA is timed beside it)
            graph_ms = do_bench_cudagraph(
                lambda: paged_attention_decode(q, kc, vc, bt, lens, block_n=block_n, num_warps=warps,
                                               num_stages=stages, check=False, num_splits=splits),
                return_mode="median")
            r["splits"][splits] = {"ms": best[0], "config": best[1], "max_abs_err": best[2],
                                   "bw_fraction": kv_bytes / (best[0] * 1e-3) / bw, "vs_sdpa": sdpa_ms / best[0],
                                   "graph_ms": graph_ms, "graph_bw_fraction": kv_bytes / (graph_ms * 1e-3) / bw,
                                   "graph_vs_sdpa": sdpa_graph_ms / graph_ms}
        best_splits = min(r["splits"], key=lambda n: r["splits"][n]["ms"])
        unsplit, chosen, best = r["splits"][1], r["splits"][auto], r["splits"][best_splits]
        r.update(best_splits=best_splits, auto_vs_unsplit=unsplit["ms"] / chosen["ms"],
                 # the fields of earlier runs, for the unsplit kernel
                 kernel_ms=unsplit["ms"], config=unsplit["config"], max_abs_err=unsplit["max_abs_err"],
                 kernel_bw_fraction=unsplit["bw_fraction"], speedup_vs_sdpa=unsplit["vs_sdpa"])
        rows.append(r)
        print(f"b={b:>4} ctx={ctx:>5}  SDPA {sdpa_ms * 1e3:8.1f} us ({r['sdpa_bw_fraction']:5.1%} of copy bw); "
              f"in a CUDA graph {sdpa_graph_ms * 1e3:.1f} us ({r['sdpa_graph_bw_fraction']:5.1%})", flush=True)
        for n, x in sorted(r["splits"].items()):
            tag = " <- auto" if n == auto else ""
            tag += " <- best" if n == best_splits else ""
            print(f"    splits {n:>2}: {x['ms'] * 1e3:8.1f} us  {x['vs_sdpa']:5.2f}x SDPA  "
                  f"{x['bw_fraction']:5.1%} of copy bw  cfg {x['config']}  err {x['max_abs_err']:.1e}; graph "
                  f"{x['graph_ms'] * 1e3:6.1f} us {x['graph_vs_sdpa']:5.2f}x SDPA graph "
                  f"{x['graph_bw_fraction']:5.1%}{tag}", flush=True)
        print(f"    unsplit {unsplit['vs_sdpa']:.2f}x SDPA; auto ({auto} splits) {chosen['vs_sdpa']:.2f}x SDPA, "
              f"{r['auto_vs_unsplit']:.2f}x unsplit; best ({best_splits} splits) {best['vs_sdpa']:.2f}x SDPA",
              flush=True)
    print("\ntargets: >= 0.9x SDPA at every shape; >= 85% of copy bandwidth at batch x context >= 32 x 2k")
    print("  eager: each call launched from Python (launch cost included); graph: replayed from a CUDA graph")
    big = [r for r in rows if r["batch"] * r["context"] >= BW_TARGET_TOKENS]
    targets = {}
    for mode, ratio, frac in (("eager", "vs_sdpa", "bw_fraction"), ("graph", "graph_vs_sdpa", "graph_bw_fraction")):
        for name, pick in (("unsplit", lambda r: r["splits"][1]), ("auto", lambda r: r["splits"][r["auto_splits"]]),
                           ("best", lambda r: r["splits"][r["best_splits"]])):
            sdpa_ok = all(pick(r)[ratio] >= 0.9 for r in rows)
            bw_ok = all(pick(r)[frac] >= 0.85 for r in big)
            worst = min(rows, key=lambda r: pick(r)[ratio])
            targets[f"{mode}_{name}"] = {"vs_sdpa_ok": sdpa_ok, "bandwidth_ok": bw_ok,
                                         "worst_vs_sdpa": pick(worst)[ratio],
                                         "worst_shape": [worst["batch"], worst["context"]]}
            print(f"  {mode:<5} {name:<8} >= 0.9x SDPA at all {len(rows)} shapes: {sdpa_ok} (worst "
                  f"{pick(worst)[ratio]:.2f}x at b={worst['batch']}, ctx={worst['context']}); >= 85% of copy bw "
                  f"at the {len(big)} shapes where it applies: {bw_ok}")
    never_slower = all(r["auto_vs_unsplit"] >= 0.98 for r in rows)
    print(f"  auto never slower than unsplit (within 2%): {never_slower}"
          f"{' -> num_splits=None can become the default' if never_slower else ''}")
    save_results(out, {"rows": rows, "targets": targets}, copy_bandwidth=bw)
    return 0


if __name__ == "__main__":
    sys.exit(main(*(Path(a) for a in sys.argv[1:])))
