#!/usr/bin/env python3
"""Where a decode iteration's time goes: a torch.profiler trace of the kit engine, summarised.

The engine (llama-300m, random weights, bf16; batch 16, context 512) is stepped into decode, then a
few decode iterations run under ``torch.profiler`` (each inside a ``decode_iteration`` range). The
trace is reduced to what lesson 07 shows, per engine mode (eager, and CUDA graphs where the engine
has them):

* ``kernels``: every GPU kernel (and memcpy / memset) by name: calls and GPU time per iteration;
* ``cpu_ms`` vs ``gpu_busy_ms`` per iteration: how long the host spends issuing the iteration and how
  long the GPU is actually busy in it; ``gpu_idle_ms`` and the ``gaps`` (idle stretches > 5 us between
  the iteration's first and last kernel, the largest listed);
* ``launches``: kernel launches (and graph launches) the host makes per iteration;
* ``timeline``: one iteration, start and end (us from the iteration's start) of the top-level CPU ops
  and of the GPU kernels: the lesson's figure. At most ``TIMELINE_CAP`` of each kind, with the totals.

    python benchmarks/decode_profile.py           # GPU: writes benchmarks/results/decode_profile.json
    python benchmarks/decode_profile.py --tiny    # CPU: llmsys-tiny, CPU ops only (there are no kernels)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from decode_step import RESULTS, decoding_engine, engine_has_graph_flag, gpu_model, tiny_model
from llmsys_lab.benchmarking import save_results

ANNOTATION = "decode_iteration"
TIMELINE_CAP = 200            # events of each kind (CPU, GPU) in the stored timeline
GAP_US = 5.0                  # GPU idle stretches shorter than this are not listed as gaps
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH = re.compile(r"LaunchKernel|GraphLaunch|LaunchCooperativeKernel")


def short(name: str) -> str:
    """A kernel's or op's name without template arguments and signature (for tables and the figure)."""
    name = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "")
    for cut in ("<", "("):
        if cut in name and not name.startswith(cut):
            name = name[:name.index(cut)]
    return name[:80]


def intervals_union(spans):
    """Merge (start, end) intervals; returns the merged list, sorted."""
    out = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def top_level(ops):
    """CPU ops not nested inside another op of the list (same thread): what the Python code called."""
    out, end = [], -1.0
    for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] >= end:
            out.append(e)
            end = e["ts"] + e["dur"]
    return out


def summarise(trace: dict, iterations: int) -> dict:
    """Reduce a Chrome trace (torch.profiler's export) to the per-iteration summary described above."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    windows = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"] == ANNOTATION),
                     key=lambda e: e["ts"])
    if len(windows) != iterations:
        raise RuntimeError(f"the trace holds {len(windows)} '{ANNOTATION}' ranges, expected {iterations}")

    def which(ts):
        for i, w in enumerate(windows):
            if w["ts"] <= ts <= w["ts"] + w["dur"]:
                return i
        return None

    main_tid = windows[0]["tid"]
    cpu_ops = [[] for _ in windows]
    launches = [0] * len(windows)
    corr_iter = {}
    for e in events:
        cat = e.get("cat")
        if cat == "cpu_op" and e["tid"] == main_tid:
            i = which(e["ts"])
            if i is not None:
                cpu_ops[i].append(e)
        elif cat in ("cuda_runtime", "cuda_driver"):
            i = which(e["ts"])
            if i is not None:
                corr_iter[e.get("args", {}).get("correlation")] = i
                launches[i] += bool(LAUNCH.search(e["name"]))
    gpu = [[] for _ in windows]
    for e in events:
        if e.get("cat") in GPU_CATS:
            i = corr_iter.get(e.get("args", {}).get("correlation"))
            if i is not None:
                gpu[i].append(e)

    n = len(windows)
    kernels = defaultdict(lambda: {"calls": 0, "gpu_us": 0.0})
    ops = defaultdict(lambda: {"calls": 0, "cpu_us": 0.0})
    per_iter = []
    for i, w in enumerate(windows):
        for e in gpu[i]:
            k = kernels[short(e["name"])]
            k["calls"] += 1
            k["gpu_us"] += e["dur"]
        for e in top_level(cpu_ops[i]):
            o = ops[e["name"]]
            o["calls"] += 1
            o["cpu_us"] += e["dur"]
        merged = intervals_union((e["ts"], e["ts"] + e["dur"]) for e in gpu[i])
        busy = sum(e - s for s, e in merged)
        gaps = [merged[j + 1][0] - merged[j][1] for j in range(len(merged) - 1)]
        first = merged[0][0] if merged else None
        span = merged[-1][1] - first if merged else 0.0
        per_iter.append({"cpu_us": w["dur"], "gpu_busy_us": busy, "gpu_span_us": span,
                         "gpu_idle_us": span - busy, "gaps": [g for g in gaps if g > GAP_US],
                         "gpu_events": len(gpu[i]), "launches": launches[i],
                         "gpu_start_after_cpu_us": (first - w["ts"]) if merged else None})

    def mean(key):
        vals = [p[key] for p in per_iter if p[key] is not None]
        return sum(vals) / len(vals) if vals else None

    all_gaps = sorted((g for p in per_iter for g in p["gaps"]), reverse=True)
    has_gpu = any(p["gpu_events"] for p in per_iter)
    summary = {
        "iterations": n,
        "cpu_ms": mean("cpu_us") / 1e3,
        "gpu_busy_ms": mean("gpu_busy_us") / 1e3 if has_gpu else None,
        "gpu_span_ms": mean("gpu_span_us") / 1e3 if has_gpu else None,
        "gpu_idle_ms": mean("gpu_idle_us") / 1e3 if has_gpu else None,
        "gaps_per_iteration": sum(len(p["gaps"]) for p in per_iter) / n,
        "largest_gaps_us": all_gaps[:10],
        "gpu_events_per_iteration": mean("gpu_events"),
        "launches_per_iteration": mean("launches"),
        "kernels": sorted(({"name": k, "calls": v["calls"] / n, "gpu_us": v["gpu_us"] / n}
                           for k, v in kernels.items()), key=lambda k: -k["gpu_us"]),
        "cpu_ops": sorted(({"name": k, "calls": v["calls"] / n, "cpu_us": v["cpu_us"] / n}
                           for k, v in ops.items()), key=lambda k: -k["cpu_us"]),
        "per_iteration": per_iter,
    }
    summary["timeline"] = timeline(windows[n // 2], cpu_ops[n // 2], gpu[n // 2])
    return summary


def timeline(window, cpu_ops, gpu) -> dict:
    """One iteration's events, in us from the iteration's start: top-level CPU ops and GPU events."""
    t0 = window["ts"]
    cpu = [{"name": short(e["name"]), "start": e["ts"] - t0, "end": e["ts"] + e["dur"] - t0}
           for e in top_level(cpu_ops)]
    kernels = [{"name": short(e["name"]), "start": e["ts"] - t0, "end": e["ts"] + e["dur"] - t0}
               for e in sorted(gpu, key=lambda e: e["ts"])]
    return {"iteration_us": window["dur"], "cpu_total": len(cpu), "gpu_total": len(kernels),
            "cpu": cpu[:TIMELINE_CAP], "gpu": kernels[:TIMELINE_CAP], "cap": TIMELINE_CAP}


def profile_engine(model, batch: int, context: int, iterations: int, cuda_graphs: bool | None,
                   warmup: int = 5) -> dict:
    on_gpu = model.lm_head.weight.is_cuda
    engine = decoding_engine(model, batch, context, warmup + iterations + 16, cuda_graphs)
    for _ in range(warmup):
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(iterations):
            with record_function(ANNOTATION):
                engine.step()
            if on_gpu:
                torch.cuda.synchronize()     # each iteration's kernels end before the next range opens
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    out = summarise(trace, iterations)
    out["cuda_graphs"] = bool(getattr(engine, "cuda_graphs", False))
    out["graph_replays"] = sum(bool(x.get("graph")) for x in engine.log[-iterations:])
    return out


def print_summary(mode: str, s: dict) -> None:
    print(f"\n{mode}: {s['iterations']} decode iterations")
    print(f"  CPU time per iteration {s['cpu_ms']:.3f} ms; launches per iteration {s['launches_per_iteration']:.0f}")
    if s["gpu_busy_ms"] is not None:
        print(f"  GPU busy {s['gpu_busy_ms']:.3f} ms, span {s['gpu_span_ms']:.3f} ms, idle in span "
              f"{s['gpu_idle_ms']:.3f} ms; gaps > {GAP_US:.0f} us per iteration {s['gaps_per_iteration']:.0f}")
        for k in s["kernels"][:12]:
            print(f"    {k['gpu_us']:9.1f} us  {k['calls']:6.1f} calls  {k['name']}")
    else:
        print("  no GPU: CPU ops only")
        for o in s["cpu_ops"][:12]:
            print(f"    {o['cpu_us']:9.1f} us  {o['calls']:6.1f} calls  {o['name']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="llmsys-tiny on the CPU, small sizes (a test of the script)")
    ap.add_argument("--out", type=Path, help="where to write the JSON")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.tiny:
        model, batch, context, iterations, warmup = tiny_model(), 4, 32, 2, 1
        out = args.out or Path(tempfile.gettempdir()) / "decode_profile_tiny.json"
        modes = {"eager": None}
        print("CPU run (--tiny): no GPU kernels, no CUDA graphs; the summary lists CPU ops")
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: nothing to measure (--tiny runs a small version on the CPU)")
            return 0
        model, batch, context, iterations, warmup = gpu_model(), 16, 512, 5, 5
        out = args.out or RESULTS / "decode_profile.json"
        modes = {"eager": False, "cuda_graphs": True} if engine_has_graph_flag() else {"eager": None}
    profiles = {}
    for mode, flag in modes.items():
        try:
            profiles[mode] = profile_engine(model, batch, context, iterations, flag, warmup)
            print_summary(mode, profiles[mode])
        except Exception as exc:  # noqa: BLE001 - a mode that cannot run is reported, not hidden
            profiles[mode] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"\n{mode}: FAILED: {profiles[mode]['error']}")
    save_results(out, {"model": "llmsys-tiny (fp32, CPU)" if args.tiny else "llama-300m (random weights, bf16)",
                       "tiny": args.tiny, "batch": batch, "context": context, "gap_us": GAP_US,
                       "engine_has_cuda_graphs_flag": engine_has_graph_flag(), "profiles": profiles})
    return 0


if __name__ == "__main__":
    sys.exit(main())
