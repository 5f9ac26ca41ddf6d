#!/usr/bin/env python3
"""Inference memory: the estimate vs the measured peak of generation, and the "max batch that fits"
checked at the out-of-memory boundary.

(1) Peak ``torch.cuda.max_memory_allocated`` while generating (bf16, two random-weight models,
    batch x prompt grid, 32 new tokens) with
    * the contiguous cache: transformers ``generate`` (its dynamic cache, SDPA attention);
    * the paged cache: the kit's engine (``llmsys_lab.engine``), its block pool sized for the batch;
    against ``inference_memory`` (weights + KV + prefill activations + workspace).
(2) The boundary: with the process capped at a memory budget
    (``torch.cuda.set_per_process_memory_fraction``), ``max_batch_inference`` predicts the largest
    batch; that batch must run, and 10% more must raise an out-of-memory error. If either fails, the
    results say by how much the prediction was off (the largest batch that really ran).

Saves benchmarks/results/inference_memory.json with a hardware fingerprint. 76 s on an H200.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # the cap applies to reserved memory

import torch  # noqa: E402

from llmsys_lab.benchmarking import save_results  # noqa: E402
from llmsys_lab.configs import ModelConfig  # noqa: E402
from llmsys_lab.estimators.memory import inference_memory, max_batch_inference  # noqa: E402

V = 32000
NEW = 32
BLOCK = 16
MODELS = {
    "llama-200m-gqa": ModelConfig(name="llama-200m-gqa", hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=4,
                                  intermediate_size=2816, vocab_size=V, max_position_embeddings=8192),
    "llama-1b-mha": ModelConfig(name="llama-1b-mha", hidden_size=2048, num_layers=16, num_heads=16,
                                intermediate_size=5632, vocab_size=V, max_position_embeddings=8192),
}
GRID = [(1, 2048), (8, 512), (8, 2048), (32, 512), (32, 2048)]     # (batch, prompt)
BOUNDARY = {"model": "llama-200m-gqa", "budget_gib": 6.0, "prompt": 2048}


def hf_model(cfg):
    hf_cfg = cfg.to_hf()
    hf_cfg.eos_token_id = None
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = __import__("transformers").AutoModelForCausalLM.from_config(
            hf_cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def kit_model(cfg):
    from llmsys_lab.model import LlamaLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaLM(cfg).to(torch.bfloat16).eval()


def run_contiguous(model, batch, prompt):
    ids = torch.randint(1, V, (batch, prompt), device="cuda")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False)
    assert out.shape == (batch, prompt + NEW), out.shape


def run_paged(model, batch, prompt):
    from llmsys_lab.engine import serve

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, V, (batch, prompt), generator=g).tolist()
    blocks = batch * math.ceil((prompt + NEW) / BLOCK)
    _, done = serve(model, prompts, NEW, num_blocks=blocks, block_size=BLOCK, max_batch=batch,
                    token_budget=batch * prompt, eos_token_id=None,
                    cuda_graphs=False)     # the estimator counts weights, KV and activations, not a graph pool
    assert len(done) == batch and all(len(r.output) == NEW for r in done.values())


RUN = {"contiguous": run_contiguous, "paged": run_paged}


def peak_of(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def fits(fn) -> bool:
    try:
        peak_of(fn)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def boundary(cache, model, cfg) -> dict:
    """Cap the process at the budget; the predicted max batch must run and 10% more must not."""
    total = torch.cuda.get_device_properties(0).total_memory
    budget = BOUNDARY["budget_gib"] * 2**30
    prompt = BOUNDARY["prompt"]
    predicted = max_batch_inference(cfg, budget, prompt, NEW, "bf16", cache, BLOCK)
    over = max(predicted + 1, math.ceil(1.1 * predicted))
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(budget / total)
    try:
        ok = fits(lambda: RUN[cache](model, predicted, prompt))
        over_fails = not fits(lambda: RUN[cache](model, over, prompt))
        largest = None
        if not (ok and over_fails):      # how far off: the largest batch that really runs (bisection)
            lo, hi = (predicted, over) if ok else (0, predicted)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(lambda: RUN[cache](model, mid, prompt)) else (lo, mid)
            largest = lo if ok or lo else 0
            if ok and not over_fails:    # even 10% more ran: search upwards
                b = over
                while fits(lambda: RUN[cache](model, b, prompt)) and b < 8 * predicted:
                    b = math.ceil(b * 1.1)
                largest = f">= {b - 1}" if b >= 8 * predicted else b - 1
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    return {"cache": cache, "model": cfg.name, "budget_bytes": budget, "prompt": prompt, "new_tokens": NEW,
            "predicted_max_batch": predicted, "predicted_runs": ok, "plus_10_percent": over,
            "plus_10_percent_fails": over_fails, "largest_batch_that_ran": largest}


def main(out: Path = Path(__file__).parent / "results" / "inference_memory.json") -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 0
    start = time.perf_counter()
    rows, checks = [], []
    for cache, build in (("contiguous", hf_model), ("paged", kit_model)):
        for name, cfg in MODELS.items():
            model = build(cfg)
            RUN[cache](model, 1, 64)                         # warm-up: kernels compiled, workspaces allocated
            for batch, prompt in GRID:
                est = inference_memory(cfg, batch, prompt, NEW, "bf16", cache, BLOCK)
                measured = peak_of(lambda: RUN[cache](model, batch, prompt))
                rows.append({"cache": cache, "model": name, "config": cfg.to_dict(), "batch": batch, "prompt": prompt,
                             "new_tokens": NEW, **{k: v for k, v in est.as_dict().items() if k != "cache"},
                             "estimate": est.peak, "measured": measured, "error": est.peak / measured - 1})
                r = rows[-1]
                print(f"{cache:<10} {name:<15} b={batch:<3} prompt={prompt:<5} peak at {r['phase']:<7} "
                      f"estimate {r['estimate'] / 2**30:6.2f} GiB  measured {measured / 2**30:6.2f} GiB  "
                      f"error {r['error']:+6.1%}", flush=True)
            if name == BOUNDARY["model"]:
                checks.append(boundary(cache, model, cfg))
                print(checks[-1], flush=True)
            del model
            torch.cuda.empty_cache()
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"\n{len(rows)} points, {time.perf_counter() - start:.0f} s; largest error {worst['error']:+.1%} "
          f"({worst['cache']} {worst['model']} b={worst['batch']} prompt={worst['prompt']})")
    save_results(out, {"rows": rows, "boundary": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main(*(Path(a) for a in sys.argv[1:])))
