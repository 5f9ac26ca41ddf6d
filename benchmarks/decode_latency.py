#!/usr/bin/env python3
"""Batch-1 decode latency of ``generate``: eager, static cache + CUDA graph, compiled, against transformers.

At batch 1 a decode step must read every weight once, so its least time is (weight bytes + K/V bytes)
/ memory bandwidth: a few milliseconds for a 7B model, well under one for 1B. Launching the step's
hundreds of small kernels one by one from Python costs more than that for small models. One run
measures, for llama-100m / llama-1b / llama-7b shapes (random weights, bf16; benchmarks/speculative.py's
configs) and a 32-token prompt followed by 128 new tokens, the time per output token (TPOT) of

1. **kit eager**: ``generate(model, ...)``, the KVCache path: one launch per operation;
2. **kit static + CUDA graph**: ``generate(..., static_cache=True)``: the same forward over a
   StaticKVCache, each decode step replayed from one captured CUDA graph;
3. **kit compiled + CUDA graph**: ``generate(..., compile=True)``: the step through ``torch.compile``
   (Inductor, one graph), captured and replayed;
4. **kit compiled step**: rung 3's step alone, back to back (the next token fed on the device, no
   host sync per token): what ``generate``'s per-token Python and sync cost on top;
5. **transformers static + compile**: ``model.generate(..., cache_implementation="static")`` on the
   same weights, which compiles its decode forward itself (transformers' automatic compilation of a
   static-cache ``generate``);
6. **roofline**: (every weight once + the K/V of the average context) / copy bandwidth measured now.

TPOT of a ``generate`` rung is (time of 128 new tokens - time of 1) / 127, the median of 3 runs after
a warm-up run (which compiles and captures; that time is reported as ``compile_s``). Ratios are against
the roofline and against transformers' rung of the same run; the fraction of the copy bandwidth is
roofline time / rung time.

    python benchmarks/decode_latency.py                 # GPU: writes benchmarks/results/decode_latency.json
    python benchmarks/decode_latency.py --models llama-1b
    python benchmarks/decode_latency.py --tiny          # CPU: llmsys-tiny, fp32, no compile or graphs
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_step import copy_bandwidth, roofline  # noqa: E402  (benchmarks/ on sys.path)

from llmsys_lab.benchmarking import save_results  # noqa: E402
from llmsys_lab.generate import generate  # noqa: E402
from llmsys_lab.model import LlamaLM  # noqa: E402
from llmsys_lab.static_decode import StaticDecoder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT, NEW = 32, 128
RUNGS = ("kit eager", "kit static + CUDA graph", "kit compiled + CUDA graph", "kit compiled step",
         "transformers static + compile", "roofline")
BASELINE = "transformers static + compile"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def tpot_of(run, device, repeats: int = 3) -> dict:
    """run(n) generates n new tokens. Warm up once (compile, capture), then (t(NEW) - t(1)) / (NEW - 1)."""
    compile_s = timed(lambda: run(NEW), device)
    per = []
    for _ in range(repeats):
        one, full = timed(lambda: run(1), device), timed(lambda: run(NEW), device)
        per.append((full - one) / (NEW - 1))
    return {"ms": statistics.median(per) * 1e3, "first_run_s": compile_s}


def kit_rung(model, prompt, device, **kw) -> dict:
    out = {}

    def run(n):
        r = generate(model, [prompt], n, eos_token_id=None, **kw)
        out["tokens"] = r.new_tokens[0]
        out["compile_s"] = r.stats.compile_seconds

    res = tpot_of(run, device)
    res.update(compile_s=out["compile_s"], tokens=out["tokens"])
    return res


def kit_step(model, prompt, device, iters: int = 100) -> dict:
    """The compiled, graphed step alone: NEW steps fed back on the device, wall time / steps."""
    dec = StaticDecoder(model, 1, PROMPT + iters + 8, compile=True)
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        logits = dec.prefill(ids)
        start = time.perf_counter()
        logits = dec.decode(logits.argmax(-1))               # compiles and captures
        sync(device)
        compile_s = time.perf_counter() - start
        for _ in range(5):
            logits = dec.decode(logits.argmax(-1))
        sync(device)
        start = time.perf_counter()
        for _ in range(iters - 6):
            logits = dec.decode(logits.argmax(-1))
        sync(device)
    return {"ms": (time.perf_counter() - start) / (iters - 6) * 1e3, "compile_s": compile_s}


def hf_rung(hf, prompt, device) -> dict:
    ids = torch.tensor([prompt], device=device)
    out = {}

    def run(n):
        seq = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, cache_implementation="static", pad_token_id=0)
        out["tokens"] = seq[0, ids.shape[1]:].tolist()

    res = tpot_of(run, device)
    res["tokens"] = out["tokens"]
    res["compile_config"] = repr(getattr(hf.generation_config, "compile_config", None))[:200]
    return res


def run_rung(fn) -> dict:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a rung that cannot run is reported, not hidden
        return {"error": f"{type(exc).__name__}: {exc}"[:400]}


def measure(name: str, model: LlamaLM, hf, bw: float, on_gpu: bool) -> dict:
    device = model.lm_head.weight.device
    prompt = torch.randint(1, model.config.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    rungs = {}
    rungs["kit eager"] = run_rung(lambda: kit_rung(model, prompt, device))
    rungs["kit static + CUDA graph"] = run_rung(lambda: kit_rung(model, prompt, device, static_cache=True))
    rungs["kit static + CUDA graph"]["cuda_graph"] = on_gpu          # on a CPU: the static cache alone
    no = {"not_available": "GPU only (Inductor's CPU code needs a C++ compiler; CUDA graphs need CUDA)"}
    rungs["kit compiled + CUDA graph"] = (run_rung(lambda: kit_rung(model, prompt, device, compile=True))
                                         if on_gpu else no)
    rungs["kit compiled step"] = run_rung(lambda: kit_step(model, prompt, device)) if on_gpu else no
    rungs[BASELINE] = run_rung(lambda: hf_rung(hf, prompt, device)) if hf is not None else {
        "not_available": "transformers' automatic compilation runs on CUDA only"}
    rungs["roofline"] = roofline(model, 1, PROMPT + NEW // 2, bw)
    base, roof = rungs[BASELINE].get("ms"), rungs["roofline"]["ms"]
    eager_tokens = rungs["kit eager"].get("tokens")
    for r, x in rungs.items():
        if "ms" in x:
            x["tok_s"] = 1e3 / x["ms"]
            x["vs_roofline"] = x["ms"] / roof
            x["bandwidth_fraction"] = roof / x["ms"]
            if base:
                x["vs_transformers"] = x["ms"] / base
        if "tokens" in x and eager_tokens is not None:
            x["same_tokens_as_kit_eager"] = x.pop("tokens") == eager_tokens
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "rungs": rungs}


def print_row(row: dict) -> None:
    print(f"\n{row['model']} ({row['params'] / 1e6:,.0f} M parameters), batch 1, {PROMPT}-token prompt, {NEW} new tokens:")
    for name in RUNGS:
        x = row["rungs"][name]
        if "ms" not in x:
            print(f"  {name:<30} {x.get('error') or x.get('not_available')}", flush=True)
            continue
        extra = f"  {x['vs_transformers']:5.2f}x transformers" if "vs_transformers" in x else ""
        same = "" if "same_tokens_as_kit_eager" not in x else f"  same tokens: {x['same_tokens_as_kit_eager']}"
        comp = f"  compile {x['compile_s']:.0f} s" if x.get("compile_s") else ""
        print(f"  {name:<30} {x['ms']:8.3f} ms/token {x['tok_s']:8.0f} tok/s  {x['bandwidth_fraction']:6.1%} of "
              f"copy bandwidth{extra}{same}{comp}", flush=True)


def main(argv=None) -> int:
    global NEW
    from speculative import LARGE, random_target  # the llama-100m/1b/7b shapes

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="llmsys-tiny on the CPU (a test of the script)")
    ap.add_argument("--models", nargs="*", default=[c.name for c in LARGE], help="shapes to measure")
    ap.add_argument("--new-tokens", type=int, default=NEW, help=f"tokens to generate per run (default {NEW})")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        raise SystemExit(f"--new-tokens must be >= 2 (TPOT is the time after the first token), got {args.new_tokens}")
    NEW = args.new_tokens
    torch.manual_seed(0)
    results = {"prompt_tokens": PROMPT, "new_tokens": NEW, "tiny": bool(args.tiny), "batch": 1,
               "rungs": list(RUNGS), "baseline": BASELINE}
    if args.tiny:
        model = LlamaLM.from_pretrained()
        bw = copy_bandwidth("cpu")
        rows = [measure("llmsys-tiny (fp32, CPU)", model, None, bw, on_gpu=False)]
        out = args.out or Path(tempfile.gettempdir()) / "decode_latency_tiny.json"
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: nothing to measure (--tiny runs a small version on the CPU)")
            return 0
        from serving import random_hf_model

        bw = copy_bandwidth("cuda")
        print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
        known = {c.name: c for c in LARGE}
        unknown = [m for m in args.models if m not in known]
        if unknown:
            raise SystemExit(f"unknown model shape(s) {unknown}; known: {sorted(known)}")
        rows = []
        for name in args.models:
            hf = random_hf_model(known[name])
            model = random_target(known[name], "cuda")          # built on the GPU in bf16, then hf's weights
            model.load_state_dict(hf.state_dict(), strict=True)
            rows.append(measure(f"{name} (random weights, bf16)", model, hf, bw, on_gpu=True))
            print_row(rows[-1])
            del hf, model
            torch.cuda.empty_cache()
        out = args.out or RESULTS / "decode_latency.json"
    if args.tiny:
        print_row(rows[0])
    results.update(rows=rows, copy_bandwidth=bw)
    save_results(out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
