#!/usr/bin/env python3
"""One decode iteration, seven ways: how far the kit's engine is from the hardware, and why.

For llama-300m (random weights, bf16; benchmarks/serving.py's model) at batch 1, 16 and 64 with
512 and 2048 tokens of context, one run measures the time of one decode iteration (every sequence
of the batch gets one new token) as

1. **engine eager**: the kit's serving engine (``Engine(..., cuda_graphs=False)``): scheduler,
   packed batch, paged KV cache, the Triton paged-attention kernel, one host sync per iteration;
2. **engine + CUDA graphs**: the same engine replaying its captured decode graph
   (``cuda_graphs=True``); reported as not available where the engine has no such flag;
   **engine compiled + CUDA graphs**: the same with ``compile=True`` (every iteration through
   ``torch.compile``, the paged kernel kept as the operator ``llmsys_lab::paged_decode``; GPU only);
3. **plain eager**: the same model's decode step written directly in PyTorch over a static,
   contiguous KV cache (``PlainDecode``): no scheduler, no paging, fixed shapes, no host sync;
4. **plain + CUDA graph**: that step captured once with ``torch.cuda.CUDAGraph`` and replayed;
5. **plain compiled + CUDA graph**: the same step through ``torch.compile`` (Inductor, one graph: the
   element-wise and normalisation work between the matmuls fused into a few Triton kernels), captured
   and replayed the same way (GPU only: the compile time is reported, not timed);
6. **roofline**: the bytes a decode step must read at least (every weight once, every cached K/V
   once) divided by the copy bandwidth measured in the same run.

Ratios are against the plain CUDA-graphed step of the same run (and the plain eager step, which a
CPU run has too). The target of the performance work
is engine + CUDA graphs <= 1.5x plain + CUDA graph at batch 64.

Timing: each rung runs back to back for many iterations (after warm-up) and the wall time is divided
by their number (the median of 3 repeats); the engine syncs once per iteration by itself (its next
tokens go to the host), the plain step runs ahead of the GPU as a decode loop without a host would.

    python benchmarks/decode_step.py            # GPU: writes benchmarks/results/decode_step.json
    python benchmarks/decode_step.py --tiny     # CPU: llmsys-tiny, small sizes, no CUDA graphs

``--out PATH`` writes elsewhere (``--tiny`` defaults to a file in the temp folder: CPU numbers are
never stored as the lesson's GPU results).
"""
from __future__ import annotations

import argparse
import inspect
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmsys_lab.benchmarking import save_results
from llmsys_lab.engine import Engine
from llmsys_lab.model import LlamaLM
from llmsys_lab.plain_decode import PlainDecode, check_plain_step

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 16
RUNGS = ("engine eager", "engine + CUDA graphs", "engine compiled + CUDA graphs", "plain eager", "plain + CUDA graph",
         "plain compiled + CUDA graph", "roofline")
BASELINE = "plain + CUDA graph"
TARGET_RATIO, TARGET_BATCH = 1.5, 64


@dataclass
class Plan:
    """What one run measures: model, batches, contexts, iterations."""
    model: str
    batches: tuple
    contexts: tuple
    iters: int             # timed iterations per repeat
    warmup: int
    repeats: int = 3


GPU_PLAN = Plan("llama-300m (random weights, bf16)", (1, 16, 64), (512, 2048), iters=50, warmup=10)
TINY_PLAN = Plan("llmsys-tiny (bundled, fp32, CPU)", (1, 4), (32,), iters=4, warmup=2, repeats=1)


# ---- the model --------------------------------------------------------------------------------
def gpu_model() -> LlamaLM:
    """benchmarks/serving.py's llama-300m with random weights, bf16, as the kit's LlamaLM."""
    from serving import random_hf_model       # benchmarks/ is on sys.path when this file runs

    hf = random_hf_model()
    model = LlamaLM.from_hf(hf)
    del hf
    torch.cuda.empty_cache()
    return model


def tiny_model() -> LlamaLM:
    return LlamaLM.from_pretrained(device="cpu")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- timing -----------------------------------------------------------------------------------
def time_per_iter(fn, iters: int, repeats: int, device) -> float:
    """Seconds per call of fn: `iters` calls back to back, wall time / iters, median of `repeats`."""
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        out.append((time.perf_counter() - start) / iters)
    return statistics.median(out)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy (a CPU: a memory copy)."""
    if torch.device(device).type == "cuda":
        from paged_attention import copy_bandwidth as gpu_copy_bandwidth   # the same measure as the kernel benchmark

        return gpu_copy_bandwidth()
    src = torch.empty(1 << 26, dtype=torch.uint8)
    dst = torch.empty_like(src)
    seconds = time_per_iter(lambda: dst.copy_(src), 10, 3, "cpu")
    return 2 * src.numel() / seconds


def engine_has_graph_flag() -> bool:
    return "cuda_graphs" in inspect.signature(Engine).parameters


def decoding_engine(model, batch: int, context: int, max_new: int, cuda_graphs: bool | None,
                    seed: int = 0, compile: bool = False) -> Engine:
    """An engine with `batch` requests of `context`-token prompts, stepped until every one of them is in
    decode (the last logged iteration decoded the whole batch). `cuda_graphs` None: the engine's default
    (an engine without the flag)."""
    num_blocks = batch * math.ceil((context + max_new + 1) / BLOCK) + 4
    kw = {} if cuda_graphs is None else {"cuda_graphs": cuda_graphs}
    if compile:
        kw["compile"] = True
    engine = Engine(model, num_blocks, block_size=BLOCK, max_batch=batch, token_budget=max(4096, context),
                    eos_token_id=None, **kw)
    gen = torch.Generator().manual_seed(seed)
    for i in range(batch):
        engine.add_request(i, torch.randint(1, model.config.vocab_size, (context,), generator=gen).tolist(), max_new)
    prefill_iters = 0
    while not (engine.log and engine.log[-1]["requests"] == batch and engine.log[-1]["tokens"] == batch):
        if engine.step():
            raise RuntimeError("a request finished during prefill: max_new_tokens too small")
        prefill_iters += 1
        if prefill_iters > 4 * batch + 8:
            raise RuntimeError(f"the engine did not reach {batch} decoding requests in {prefill_iters} iterations")
    return engine


def time_engine(model, batch: int, context: int, plan: Plan, cuda_graphs: bool | None, compile: bool = False) -> dict:
    """The engine's decode iteration: `warmup` + timed decode-only iterations of a decoding_engine."""
    device = model.lm_head.weight.device
    steps = plan.warmup + plan.repeats * plan.iters
    # nobody finishes while timed: the first admitted request also decodes while the later ones prefill
    # (up to 4 x batch + 8 iterations, decoding_engine's bound)
    started = time.perf_counter()
    engine = decoding_engine(model, batch, context, steps + 4 * batch + 16, cuda_graphs, compile=compile)
    for _ in range(plan.warmup):
        engine.step()
    first = len(engine.log)

    def one():
        if engine.step():
            raise RuntimeError("a request finished while the clock ran: max_new_tokens too small")

    seconds = time_per_iter(one, plan.iters, plan.repeats, device)
    timed = engine.log[first:]
    if any(x["requests"] != batch or x["tokens"] != batch for x in timed):
        raise RuntimeError("a timed iteration was not a decode iteration of the whole batch")
    out = {"ms": seconds * 1e3, "cuda_graphs": bool(getattr(engine, "cuda_graphs", False)),
           "attention_path": engine.attention_path}
    if compile:
        out["setup_s"] = time.perf_counter() - started - seconds * plan.iters * plan.repeats   # compiling, mostly
    if "graph" in timed[0]:
        out["graph_replay_fraction"] = sum(bool(x["graph"]) for x in timed) / len(timed)
    if getattr(engine, "graph_buckets", None) is not None:
        out["graph_buckets"] = list(engine.graph_buckets)
    del engine
    return out


def time_plain(model, batch: int, context: int, plan: Plan, graph: bool, compile: bool = False) -> dict:
    device = model.lm_head.weight.device
    # room for the next token; a multiple of 16 positions, so SDPA's memory-efficient kernel takes the
    # mask as it is (it pads a ragged last dimension with a copy on every call)
    plain = PlainDecode(model, batch, -(-(context + 1) // 16) * 16, compile=compile)
    plain.fill_random(context, torch.Generator(device=device).manual_seed(0))
    fn = plain.step
    out = {}
    if graph:
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):                     # warm-up off the default stream, as capture wants
            for _ in range(3):                              # (the first call compiles)
                plain.step()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            plain.step()
        fn = g.replay
        torch.cuda.synchronize()
        if compile:
            out["compile_and_capture_s"] = time.perf_counter() - start
    for _ in range(plan.warmup):
        fn()
    seconds = time_per_iter(fn, plan.iters, plan.repeats, device)
    return {"ms": seconds * 1e3, **out}


def roofline(model, batch: int, context: int, bandwidth: float) -> dict:
    """Least bytes a decode step reads: every weight once (the embedding: only the B rows looked up;
    a tied LM head reads the whole matrix anyway) plus every cached K and V once."""
    cfg = model.config
    size = model.lm_head.weight.element_size()
    emb = model.model.embed_tokens.weight
    weights = sum(p.numel() for p in model.parameters()) * size
    if emb is not model.lm_head.weight:
        weights -= emb.numel() * size - batch * cfg.hidden_size * size
    kv = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * size
    return {"ms": (weights + kv) / bandwidth * 1e3, "weight_bytes": weights, "kv_bytes": kv}


def run_rung(fn) -> dict:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a rung that cannot run is reported, not hidden
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def measure(model, plan: Plan, tiny: bool) -> dict:
    device = model.lm_head.weight.device
    on_gpu = device.type == "cuda"
    graph_flag = engine_has_graph_flag()
    bw = copy_bandwidth(device)
    err = check_plain_step(model)
    print(f"{plan.model} on {torch.cuda.get_device_name(device) if on_gpu else 'CPU'}; copy bandwidth "
          f"{bw / 1e9:.0f} GB/s; plain step == model forward (fp32): max |err| {err:.1e}", flush=True)
    if not on_gpu:
        print("CPU run (--tiny): no CUDA graphs on a CPU; the graph rungs are reported as not available")
    if not graph_flag:
        print("this engine has no cuda_graphs flag: 'engine + CUDA graphs' not available")
    if err > 1e-3:
        raise RuntimeError(f"the plain decode step disagrees with the model's forward: max |err| {err:.2e}")
    no_graphs = "not available: no CUDA graphs on a CPU"
    rows = []
    for context in plan.contexts:
        for batch in plan.batches:
            r = {"batch": batch, "context": context, "rungs": {}}
            rungs = r["rungs"]
            rungs["engine eager"] = run_rung(lambda: time_engine(
                model, batch, context, plan, False if graph_flag else None))
            if not on_gpu:
                rungs["engine + CUDA graphs"] = {"not_available": no_graphs}
            elif not graph_flag:
                rungs["engine + CUDA graphs"] = {"not_available": "Engine has no cuda_graphs flag"}
            else:
                rungs["engine + CUDA graphs"] = run_rung(lambda: time_engine(model, batch, context, plan, True))
            rungs["engine compiled + CUDA graphs"] = (run_rung(lambda: time_engine(
                model, batch, context, plan, True, compile=True)) if on_gpu and graph_flag else
                {"not_available": "GPU only (Inductor's CPU code needs a C++ compiler, and no CUDA graphs)"})
            rungs["plain eager"] = run_rung(lambda: time_plain(model, batch, context, plan, False))
            rungs["plain + CUDA graph"] = (run_rung(lambda: time_plain(
                model, batch, context, plan, True)) if on_gpu else {"not_available": no_graphs})
            rungs["plain compiled + CUDA graph"] = (run_rung(lambda: time_plain(
                model, batch, context, plan, True, compile=True)) if on_gpu else
                {"not_available": "GPU only (Inductor's CPU code needs a C++ compiler, and no CUDA graphs)"})
            rungs["roofline"] = roofline(model, batch, context, bw)
            base, eager = rungs[BASELINE].get("ms"), rungs["plain eager"].get("ms")
            for x in rungs.values():
                if "ms" in x:
                    x["tok_s"] = batch / (x["ms"] * 1e-3)
                    if base:
                        x["vs_plain_graph"] = x["ms"] / base
                    if eager:
                        x["vs_plain_eager"] = x["ms"] / eager
            rows.append(r)
            print_row(r)
    return {"model": plan.model, "tiny": tiny, "device": str(device), "dtype": str(model.lm_head.weight.dtype),
            "params": sum(p.numel() for p in model.parameters()), "engine_has_cuda_graphs_flag": graph_flag,
            "plain_step_max_abs_err": err, "rungs": list(RUNGS), "baseline": BASELINE,
            "target": {"rung": "engine + CUDA graphs", "batch": TARGET_BATCH, "max_vs_plain_graph": TARGET_RATIO},
            "iters": plan.iters, "repeats": plan.repeats, "rows": rows, "copy_bandwidth": bw}


def print_row(r: dict) -> None:
    print(f"\nbatch {r['batch']}, context {r['context']}:")
    for name in RUNGS:
        x = r["rungs"][name]
        if "ms" in x:
            ratio = "".join(f"  {x[k]:6.2f}x {label}" for k, label in (("vs_plain_graph", "plain graph"),
                                                                     ("vs_plain_eager", "plain eager")) if k in x)
            print(f"  {name:<22} {x['ms']:9.3f} ms  {x['tok_s']:10.0f} tok/s  {ratio}", flush=True)
        else:
            print(f"  {name:<22} {x.get('error') or x.get('not_available')}", flush=True)


def print_target(result: dict) -> None:
    rows = [r for r in result["rows"] if r["batch"] == TARGET_BATCH]
    for r in rows:
        x = r["rungs"]["engine + CUDA graphs"]
        if "vs_plain_graph" in x:
            print(f"target (context {r['context']}): engine + CUDA graphs {x['vs_plain_graph']:.2f}x plain graph "
                  f"at batch {TARGET_BATCH} <= {TARGET_RATIO}x: {x['vs_plain_graph'] <= TARGET_RATIO}")
        else:
            print(f"target (context {r['context']}): not measured ({x.get('error') or x.get('not_available')})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="llmsys-tiny on the CPU, small sizes (a test of the script)")
    ap.add_argument("--out", type=Path, help="where to write the JSON")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.tiny:
        out = args.out or Path(tempfile.gettempdir()) / "decode_step_tiny.json"
        result = measure(tiny_model(), TINY_PLAN, tiny=True)
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: nothing to measure (--tiny runs a small version on the CPU)")
            return 0
        out = args.out or RESULTS / "decode_step.json"
        result = measure(gpu_model(), GPU_PLAN, tiny=False)
    print_target(result)
    save_results(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
