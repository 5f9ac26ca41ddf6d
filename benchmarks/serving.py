#!/usr/bin/env python3
"""Serving throughput: the same seeded requests, the same model, the same KV budget, one run.

(a) transformers `generate` with static padded batches, as many requests per batch as fit the
    budget when each reserves its maximum length;
(b) transformers' own continuous batching (`init_continuous_batching` manager) with the same blocks;
(c) the kit's engine, static batching; (d) the kit's engine, continuous batching on the paged cache;
(e) transformers' fastest documented single-GPU path: `generate` with a static KV cache
    (`cache_implementation="static"`), which makes `generate` torch.compile the decode step
    (mode "reduce-overhead": CUDA graphs), in static batches as (a);
(f) = (d) with CUDA graphs off (every iteration launched from Python), to show what graphs are worth.

Every system reports TTFT and TPOT percentiles (p50, p90, p99); a system that cannot run (version,
error, time limit) is reported with the reason instead of numbers.

Output-token throughput counts only the tokens each request asked for (a static batch that runs
longer for its slowest member does not get credit for the padding). Prints a table and saves
benchmarks/results/serving.json with a hardware fingerprint.

    python benchmarks/serving.py            # on a GPU: the two suites, saved to benchmarks/results/serving.json
    python benchmarks/serving.py --tiny     # on any machine: a few requests on the bundled model (a smoke run,
                                            # saved only with --out)
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from llmsys_lab.benchmarking import save_results
from llmsys_lab.configs import ModelConfig
from llmsys_lab.engine import serve
from llmsys_lab.metrics import percentile, summarize
from llmsys_lab.model import TINY_MODEL_PATH, LlamaLM

BLOCK = 16
SERVING_MODEL = ModelConfig(name="llama-300m", hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=4,
                            intermediate_size=2816, vocab_size=32000, max_position_embeddings=4096)


def random_hf_model(cfg: ModelConfig = SERVING_MODEL):
    """A random-weight transformers Llama in bf16 on the GPU that never stops early (no EOS)."""
    hf_cfg = cfg.to_hf()
    hf_cfg.eos_token_id = None
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    hf.generation_config.eos_token_id = None
    return hf


def workload(n, seed, prompt_range, output_range, vocab):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(*prompt_range))] for _ in range(n)]
    limits = [rng.randint(*output_range) for _ in range(n)]
    return prompts, limits


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


PERCENTILES = (50, 90, 99)


def latency_stats(ttft: list[float], tpot: list[float]) -> dict:
    """ttft_p50 .. tpot_p99 in seconds (the same percentiles as llmsys_lab.metrics.summarize)."""
    if not ttft:
        raise RuntimeError("no per-token timestamps were recorded: TTFT and TPOT cannot be measured")
    return {**{f"ttft_p{p}": percentile(ttft, p) for p in PERCENTILES},
            **{f"tpot_p{p}": percentile(tpot, p) for p in PERCENTILES}}


class StepClock(StoppingCriteria):
    """Records when each decoding step of `generate` finishes (it never stops generation).
    generate already synchronises every step to test its stopping condition, so the sync here
    makes the clock exact at little extra cost."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        sync()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class StopAfter(StoppingCriteria):
    """Stops every sequence after `steps` decoding steps (the warm-up of (e): shapes, not tokens, matter)."""

    def __init__(self, steps: int):
        self.steps, self.calls = steps, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), self.calls >= self.steps, dtype=torch.bool, device=input_ids.device)


def record_latencies(clock, limits, start, ttft, tpot) -> None:
    """A static batch's requests, timed by the batch's step clock: each one's first token came at the first step
    (TTFT from `start`, when every request arrived), and its own last token at step limits[i] (TPOT over the rest)."""
    for n in limits:
        ttft.append(clock.times[0] - start)
        if n > 1:
            tpot.append((clock.times[n - 1] - clock.times[0]) / (n - 1))


def hf_static(hf, prompts, limits, batch):
    """(a) Static batches in arrival order; the whole batch runs until its longest request is done.
    Request i's token k counts as delivered when step k of its batch finishes (as if streamed)."""
    warm = torch.tensor([prompts[0][:8]] * 2, device=hf.device)          # untimed warm-up, as for the kit
    hf.generate(input_ids=warm, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    sync()
    start, useful, ttft, tpot = time.perf_counter(), 0, [], []
    for i in range(0, len(prompts), batch):
        ps, ls = prompts[i:i + batch], limits[i:i + batch]
        width = max(map(len, ps))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps], device=hf.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=hf.device)
        clock = StepClock()
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(ls), do_sample=False,
                    pad_token_id=0, eos_token_id=None, stopping_criteria=StoppingCriteriaList([clock]))
        useful += sum(ls)
        record_latencies(clock, ls, start, ttft, tpot)
    sync()
    return {"seconds": time.perf_counter() - start, "tokens": useful, **latency_stats(ttft, tpot)}


def hf_static_compiled(hf, prompts, limits, batch, max_len, time_limit=600.0, warmup_steps=16):
    """(e) `generate` with a static KV cache and torch.compile, in static batches of `batch` as (a).

    With `cache_implementation="static"` the cache is preallocated at a fixed size, so every decode step
    has the same shapes and `generate` compiles the model's forward for decoding by itself (transformers'
    CompileConfig: inductor, mode "reduce-overhead", i.e. CUDA graphs; the prefill runs eagerly).
    Compiled code is specialised to shapes, so every batch gets the same one: prompts left-padded to the
    longest prompt of the workload, `max_new_tokens` the largest limit of the workload (a request's tokens
    count, and its TPOT is timed, only up to its own limit, as in (a)), and a short last batch filled up
    with copies of its last request (not counted). The cache then holds `batch` sequences of
    longest prompt + largest limit <= `max_len` tokens: within the KV budget of (a). Compilation and
    CUDA-graph capture happen in an untimed warm-up of that shape, stopped after `warmup_steps` steps.
    Going past `time_limit` seconds (compilation included) stops the run with an error saying so."""
    width, new_tokens = max(map(len, prompts)), max(limits)
    if width + new_tokens > max_len:
        raise ValueError(f"a static cache of {width} + {new_tokens} tokens per sequence exceeds the KV budget's "
                         f"{max_len}")
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                  cache_implementation="static")

    def padded(ps):
        ps = ps + [ps[-1]] * (batch - len(ps))                       # a full batch: one shape for every call
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps], device=hf.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=hf.device)
        return ids, mask

    from torch._dynamo.utils import counters

    torch._dynamo.reset()      # compiled code of another model (the other suite) would count against its limits
    graphs = lambda: counters["stats"]["unique_graphs"]                       # noqa: E731
    graphs_before = graphs()
    t0 = time.perf_counter()
    ids, mask = padded(prompts[:batch])
    hf.generate(input_ids=ids, attention_mask=mask, stopping_criteria=StoppingCriteriaList([StopAfter(warmup_steps)]),
                **kwargs)
    sync()
    compile_seconds = time.perf_counter() - t0
    graphs_warm = graphs()
    start, useful, ttft, tpot = time.perf_counter(), 0, [], []
    for i in range(0, len(prompts), batch):
        if time.perf_counter() - t0 > time_limit:
            raise TimeoutError(f"stopped after {i} of {len(prompts)} requests: over the {time_limit:.0f} s limit "
                               f"(compilation took {compile_seconds:.0f} s)")
        ps, ls = prompts[i:i + batch], limits[i:i + batch]
        ids, mask = padded(ps)
        clock = StepClock()
        hf.generate(input_ids=ids, attention_mask=mask, stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
        useful += sum(ls)
        record_latencies(clock, ls, start, ttft, tpot)
    sync()
    seconds = time.perf_counter() - start
    # what torch.compile did: graphs made in the warm-up, and any made while the clock ran (their compile
    # time is then inside `seconds`)
    compiled, late = graphs_warm - graphs_before, graphs() - graphs_warm
    r = {"seconds": seconds, "tokens": useful, "compiled_graphs": compiled, "graphs_compiled_while_timed": late,
         "compile_seconds": compile_seconds, "static_cache_tokens": batch * (width + new_tokens),
         **latency_stats(ttft, tpot)}
    if not compiled:
        r["note"] = ("generate did not compile the decode step (transformers compiles it on a GPU only): "
                     "this is the static cache without torch.compile")
    return r


def hf_continuous(hf, prompts, limits, num_blocks, max_batch_tokens, timeout=120):
    """(b) transformers' continuous batching manager with the same number of KV blocks. Its own
    warm-up (CUDA graph capture where it uses them) runs before the clock starts, as
    `generate_batch` does by default."""
    gen = GenerationConfig(max_new_tokens=max(limits), do_sample=False, pad_token_id=0, eos_token_id=None)
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        cb = ContinuousBatchingConfig(num_blocks=num_blocks, block_size=BLOCK, max_batch_tokens=max_batch_tokens)
        manager = hf.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    except ImportError:                       # older 5.x: the sizes live on the generation config
        gen.num_blocks, gen.block_size, gen.max_batch_tokens = num_blocks, BLOCK, max_batch_tokens
        manager = hf.init_continuous_batching(generation_config=gen)
    if hasattr(manager, "warmup") and not getattr(manager, "warmed_up", True):
        manager.warmup()
    manager.start()
    attention = getattr(hf.config, "_attn_implementation", None)      # what it switched to for paged KV
    sync()
    start = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, limits)):
        manager.add_request(p, request_id=f"r{i}", max_new_tokens=n, record_timestamps=True)
    results = {}
    while len(results) < len(prompts):
        out = manager.get_result(timeout=timeout)
        if out is None:
            raise RuntimeError(f"transformers' continuous batching returned no result within {timeout} s "
                               f"({len(results)} of {len(prompts)} finished)")
        if getattr(out, "error", None):
            raise RuntimeError(f"transformers' continuous batching failed request {out.request_id}: {out.error}")
        if out.is_finished():                 # (its status is an IntEnum: str(status) is a number)
            results[out.request_id] = out
    seconds = time.perf_counter() - start
    manager.stop(block=True)
    if hasattr(hf, "destroy_cached_continuous_batching_manager"):
        hf.destroy_cached_continuous_batching_manager()
    # timestamps are the time.perf_counter() values at which each token was generated
    outs = [o for o in results.values() if getattr(o, "timestamps", None)]
    ttft = [o.timestamps[0] - start for o in outs]
    tpot = [(o.timestamps[-1] - o.timestamps[0]) / (len(o.timestamps) - 1) for o in outs if len(o.timestamps) > 1]
    tokens = sum(len(o.generated_tokens) for o in results.values())
    if tokens != sum(limits):
        raise RuntimeError(f"transformers' continuous batching produced {tokens} tokens, expected {sum(limits)}")
    return {"seconds": seconds, "tokens": tokens, "attention": attention, **latency_stats(ttft, tpot)}


def kit(model, prompts, limits, num_blocks, policy, max_batch, token_budget, cuda_graphs=None, compile=False):
    sync()
    # CUDA graphs are captured before the clock starts (a server's start-up; (e) compiles in an
    # untimed warm-up, (b) warms up before its clock too); the row says how long that took
    engine, done = serve(model, prompts, limits, num_blocks=num_blocks, block_size=BLOCK, policy=policy,
                         max_batch=max_batch, token_budget=token_budget, eos_token_id=None, capture_graphs=True,
                         cuda_graphs=cuda_graphs, **({"compile": True} if compile else {}))
    sync()
    s = summarize(list(done.values()), engine.log[-1]["seconds"])
    util = sum(x["kv_used"] for x in engine.log) / sum(x["kv_reserved"] for x in engine.log)
    return {"seconds": s["duration"], "tokens": s["output_tokens"],
            **{f"{k}_p{p}": s[k][f"p{p}"] for k in ("ttft", "tpot") for p in PERCENTILES},
            "kv_utilisation": util, "iterations": engine.iteration,
            "cuda_graphs": bool(getattr(engine, "cuda_graphs", False)),
            "graphed_iterations": sum(bool(x.get("graph")) for x in engine.log),
            "capture_seconds": engine.capture_seconds}


def run_suite(name, hf, kit_model, prompts, limits, max_len, seqs_in_budget, compile_limit=600.0):
    budget_tokens = seqs_in_budget * max_len
    num_blocks = budget_tokens // BLOCK
    print(f"\n{name}: {len(prompts)} requests, KV budget {budget_tokens:,} tokens "
          f"({seqs_in_budget} sequences of {max_len}), block size {BLOCK}", flush=True)
    rows = {}
    # (e) runs before (b): transformers' continuous batching switches the model's attention to its paged
    # implementation, and (e) must run on the model as (a) did. Between systems the previous one's memory
    # is released (gc: an engine and its graphs form a reference cycle), and the log says what is held.
    systems = [
        ("(a) HF generate, static batches", lambda: hf_static(hf, prompts, limits, seqs_in_budget)),
        ("(e) HF static cache + compile", lambda: hf_static_compiled(hf, prompts, limits, seqs_in_budget, max_len,
                                                                         time_limit=compile_limit)),
        # static: a batch is admitted at once, so its whole prefill must fit one iteration (as in generate)
        ("(c) kit engine, static", lambda: kit(kit_model, prompts, limits, num_blocks, "static", seqs_in_budget,
                                               seqs_in_budget * max(map(len, prompts)))),
        ("(d) kit engine, continuous", lambda: kit(kit_model, prompts, limits, num_blocks, "continuous", 256, 4096)),
        # (d) without CUDA graphs: what replaying whole iterations is worth, in the same run
        ("(f) kit engine, continuous, no CUDA graphs",
         lambda: kit(kit_model, prompts, limits, num_blocks, "continuous", 256, 4096, cuda_graphs=False)),
        # (d) with every iteration compiled by torch.compile (Inductor around the paged kernel), GPU only;
        # compilation happens in the graph capture before the clock starts (capture_seconds says how long)
        *([("(g) kit engine, continuous, compiled",
            lambda: kit(kit_model, prompts, limits, num_blocks, "continuous", 256, 4096, compile=True))]
          if torch.cuda.is_available() else []),
        # last: its manager keeps GPU memory after it is destroyed, which the kit rows would lose
        ("(b) HF continuous batching", lambda: hf_continuous(hf, prompts, limits, num_blocks, 4096)),
    ]
    for label, fn in systems:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            print(f"  [{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated before {label.split(' ', 1)[0]}]",
                  flush=True)
        try:
            r = fn()
            r["throughput"] = r["tokens"] / r["seconds"]
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not hidden
            r = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        rows[label] = r
        if "error" in r:
            print(f"  {label:<44} FAILED: {r['error']}", flush=True)
        else:
            extra = "".join(f"  {k} {r[k] * 1e3:.0f}ms" for k in
                            [f"{m}_p{p}" for m in ("ttft", "tpot") for p in PERCENTILES] if k in r)
            util = f"  KV util {r['kv_utilisation']:.0%}" if "kv_utilisation" in r else ""
            print(f"  {label:<44} {r['throughput']:>9.0f} tok/s  ({r['seconds']:.1f} s){extra}{util}", flush=True)
    rows = dict(sorted(rows.items()))                     # (a) .. (e), whatever order they ran in
    base = rows["(a) HF generate, static batches"].get("throughput")
    for label, r in rows.items():
        if base and "throughput" in r:
            r["vs_a"] = r["throughput"] / base
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=None,
                        help="where to save (default benchmarks/results/serving.json; --tiny saves only where told)")
    parser.add_argument("--tiny", action="store_true", help="a few requests on the bundled model, on any device")
    parser.add_argument("--compile-limit", type=float, default=600.0,
                        help="seconds (e) may take, compilation included, before it is stopped and reported")
    args = parser.parse_args(argv)
    if args.tiny:
        return tiny(args.out)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure (--tiny runs a small smoke test on this machine)")
        return 0
    out = args.out or Path(__file__).parent / "results" / "serving.json"
    torch.manual_seed(0)
    results = {}
    cfg = SERVING_MODEL
    hf = random_hf_model()
    kit_model = LlamaLM.from_hf(hf)
    prompts, limits = workload(256, 0, (32, 512), (16, 512), cfg.vocab_size)
    kit(kit_model, prompts[:8], [8] * 8, 512, "continuous", 8, 4096)            # warm-up
    results["llama-300m"] = run_suite("llama-300m (random weights, bf16)", hf, kit_model, prompts, limits, 1024, 64,
                                      args.compile_limit)
    save_results(out, {"results": results})          # saved per suite: a run cut short keeps what it measured
    tiny_hf = AutoModelForCausalLM.from_pretrained(TINY_MODEL_PATH, dtype=torch.float32).cuda().eval()
    tiny_kit = LlamaLM.from_pretrained(device="cuda")
    prompts, limits = workload(256, 1, (8, 200), (8, 300), 4096)
    results["llmsys-tiny"] = run_suite("llmsys-tiny (bundled, fp32)", tiny_hf, tiny_kit, prompts, limits, 512, 64,
                                       args.compile_limit)
    save_results(out, {"results": results})
    return 0


def tiny(out: Path | None) -> int:
    """Every system on 6 short requests to the bundled model, on this machine's device: checks that the
    script runs (on a CPU, transformers does not compile (e), which the row says); the numbers mean nothing."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    tiny_hf = AutoModelForCausalLM.from_pretrained(TINY_MODEL_PATH, dtype=torch.float32).to(device).eval()
    tiny_kit = LlamaLM.from_pretrained(device=device)
    prompts, limits = workload(6, 1, (4, 20), (2, 12), 4096)
    rows = run_suite(f"llmsys-tiny on {device} (smoke run)", tiny_hf, tiny_kit, prompts, limits, 32, 4)
    if out is not None:
        save_results(out, {"results": {"llmsys-tiny": rows}, "tiny": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
