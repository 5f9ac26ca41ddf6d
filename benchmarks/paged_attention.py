#!/usr/bin/env python3
"""Paged decode attention (Triton) vs contiguous SDPA decode, on this GPU.

Decode attention reads every cached K and V once: it is memory-bound, so the figure of merit is
achieved bandwidth (bytes of K/V read per second) as a fraction of the GPU's measured copy
bandwidth (bytes read + written per second by a large device-to-device copy). Both sides are
timed in the same run with triton.testing.do_bench (median). Results go to
benchmarks/results/paged_attention.json with a hardware fingerprint.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from llmsys_lab.benchmarking import save_results
from llmsys_lab.kernels.paged_attention import paged_attention_decode

H, H_KV, D, BLOCK = 32, 8, 128, 16
SHAPES = [(1, 4096), (8, 4096), (32, 2048), (32, 8192), (64, 4096), (128, 4096), (256, 2048)]
CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (32, 4, 3)]     # block_n, warps, stages


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
    rows = []
    for b, ctx in SHAPES:
        q, kc, vc, bt, lens, k, v = setup(b, ctx)
        paged_attention_decode(q, kc, vc, bt, lens)          # the tables checked once; the timed calls skip it
        ref = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
        best = None
        for block_n, warps, stages in CONFIGS:
            fn = lambda: paged_attention_decode(q, kc, vc, bt, lens, block_n=block_n, num_warps=warps, num_stages=stages,  # noqa: E731
                                        check=False)
            err = (fn().float() - ref.float()).abs().max().item()
            ms = do_bench(fn, return_mode="median")
            if best is None or ms < best[0]:
                best = (ms, (block_n, warps, stages), err)
        sdpa_ms = do_bench(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True),
                           return_mode="median")
        kv_bytes = 2 * b * ctx * H_KV * D * 2
        r = {"batch": b, "context": ctx, "kernel_ms": best[0], "config": best[1], "max_abs_err": best[2],
             "sdpa_ms": sdpa_ms, "kernel_bw_fraction": kv_bytes / (best[0] * 1e-3) / bw,
             "sdpa_bw_fraction": kv_bytes / (sdpa_ms * 1e-3) / bw, "speedup_vs_sdpa": sdpa_ms / best[0]}
        rows.append(r)
        print(f"b={b:>4} ctx={ctx:>5}  paged {best[0] * 1e3:8.1f} us ({r['kernel_bw_fraction']:5.1%} of copy bw, "
              f"cfg {best[1]}, err {best[2]:.1e})  SDPA {sdpa_ms * 1e3:8.1f} us ({r['sdpa_bw_fraction']:5.1%})  "
              f"ratio {r['speedup_vs_sdpa']:.2f}x", flush=True)
    save_results(out, {"rows": rows}, copy_bandwidth=bw)
    return 0


if __name__ == "__main__":
    sys.exit(main(*(Path(a) for a in sys.argv[1:])))
