#!/usr/bin/env python3
"""Speculative decoding at batch 1: measured speed-up beside the speed-up model's prediction.

Part A, llmsys-tiny as the target (real acceptance rates): tokens/s of plain greedy decoding
(the kit's `generate` with its KV cache) and of speculative decoding with gamma = 1..8, for
  * the model drafter (llmsys-tiny-draft if trained, else the target's first layer), and
  * prompt lookup, on in-domain prompts and on repetitive text (a passage the output quotes).
For each: acceptance rate, alpha (per judged token), tokens per target step, c = draft time per
draft token / plain decode step time, predicted speed-up (1 - a^(g+1)) / ((1 - a)(g c + 1)) and
the measured one (plain time / speculative time for the same number of tokens). A second prediction
also charges the verify pass its measured cost v (gamma + 1 tokens in one pass, in decode steps: 1 when
the step is memory- or launch-bound, more on a CPU) and the drafts actually proposed:
tokens/step(alpha, g) / (mean drafts per step * c + v).

Part B, step costs of larger targets: the tiny models are launch-bound on a GPU (a step costs
about the same at any size, so c = draft/target step is large). Random-weight targets of growing
size give c for the same draft, and the speed-up model with part A's alpha predicts where
speculative decoding starts to pay. (Random weights make acceptance meaningless, so only c is
measured there.)

    python benchmarks/speculative.py            # GPU: < 2 minutes on an H200
    python benchmarks/speculative.py --tiny     # CPU: a quick check at small sizes
    python benchmarks/speculative.py --static   # part A on static caches: plain decoding with
                                                # generate(compile=True), the target's verify passes and the
                                                # draft's steps compiled and replayed from CUDA graphs (on a GPU)

Saves benchmarks/results/speculative.json (--static: speculative_static.json) with a hardware fingerprint.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from llmsys_lab.benchmarking import save_results
from llmsys_lab.configs import ModelConfig
from llmsys_lab.drafters import ModelDrafter, PromptLookupDrafter, load_draft, truncated_model
from llmsys_lab.generate import generate
from llmsys_lab.model import LlamaLM, load_tiny
from llmsys_lab.speculative import expected_speedup, expected_tokens_per_step, make_runner, speculative_generate

RESULTS = Path(__file__).resolve().parent / "results" / "speculative.json"
PROMPTS = ["ROMEO.\n", "KING.\nMy lords,", "HAMLET.\nWhat is", "JULIET.\nO Romeo, Romeo", "PORTIA.\nThe quality of mercy"]
PASSAGE = ("PORTIA.\nThe quality of mercy is not strain'd,\nIt droppeth as the gentle rain from heaven\n"
           "Upon the place beneath. It is twice blest;\nIt blesseth him that gives and him that takes.\n")
REPETITIVE = [PASSAGE + PASSAGE + PASSAGE[:40]]
LARGE = [ModelConfig(name="llama-100m", hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                     intermediate_size=2048, vocab_size=4096, max_position_embeddings=1024),
         ModelConfig(name="llama-1b", hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=4,
                     intermediate_size=5632, vocab_size=4096, max_position_embeddings=1024),
         ModelConfig(name="llama-7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                     intermediate_size=11008, vocab_size=4096, max_position_embeddings=1024)]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_target(cfg: ModelConfig, device) -> LlamaLM:
    """Random weights, built directly on the device in bf16 (a 7B model would take minutes on a CPU)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)


def plain_seconds(model, prompts, n, static: bool = False) -> float:
    kw = {"compile": torch.cuda.is_available(), "static_cache": True} if static else {}
    generate(model, [prompts[0]], max_new_tokens=n, eos_token_id=None, **kw)      # warm-up (compiles)
    sync()
    t = time.perf_counter()
    for p in prompts:
        generate(model, [p], max_new_tokens=n, eos_token_id=None, **kw)
    sync()
    return time.perf_counter() - t


def decode_step_seconds(model, steps: int, context: int = 32, tokens: int = 1, static: bool = False) -> float:
    """Time of one forward pass of `tokens` new tokens (1: a decode step; gamma + 1: a verify pass)
    on the kit's contiguous cache (static: the static runner's), after `context` cached tokens (rolled
    back after every pass)."""
    runner = make_runner(model, context + tokens, "static" if static else "contiguous")
    runner.forward(list(range(1, context + 1)))
    for _ in range(3):
        runner.forward([1] * tokens)
        runner.truncate(context)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        runner.forward([1] * tokens)
        runner.truncate(context)
    sync()
    return (time.perf_counter() - t) / steps


def sweep(target, drafter, name, prompts, n, gammas, t_plain, t_step, t_verify, cache="contiguous") -> list[dict]:
    rows = []
    for g in gammas:
        sync()
        t = time.perf_counter()
        acc = drafted = judged = steps = tokens = 0
        draft_s = 0.0
        for p in prompts:
            out = speculative_generate(target, drafter, p, n, gamma=g, eos_token_id=None, cache=cache)
            s = out.stats
            acc, drafted, judged = acc + s.accepted, drafted + s.drafted, judged + s.accepted + s.rejections
            steps, tokens, draft_s = steps + s.target_steps, tokens + s.generated, draft_s + s.draft_seconds
        sync()
        seconds = time.perf_counter() - t
        alpha = acc / judged if judged else 0.0
        c = (draft_s / drafted) / t_step if drafted else 0.0
        v = t_verify[g] / t_step                  # a verify pass of g + 1 tokens, in decode steps
        gamma_avg = drafted / steps               # prompt lookup may propose fewer than g tokens
        row = {"drafter": name, "gamma": g, "acceptance_rate": acc / drafted if drafted else 0.0, "alpha": alpha,
               "tokens_per_step": tokens / steps, "c": c, "predicted_speedup": expected_speedup(min(alpha, 1.0), g, c),
               "verify_cost": v,
               "predicted_with_verify_cost": expected_tokens_per_step(min(alpha, 1.0), g) / (gamma_avg * c + v),
               "measured_speedup": t_plain / seconds, "tokens_per_s": tokens / seconds}
        rows.append(row)
        print(f"{name:>22} g={g}  accept {row['acceptance_rate']:.2f}  alpha {alpha:.2f}  "
              f"tok/step {row['tokens_per_step']:.2f}  c {c:.3f}  verify {v:.2f}  predicted {row['predicted_speedup']:.2f}x "
              f"(with verify cost {row['predicted_with_verify_cost']:.2f}x)  "
              f"measured {row['measured_speedup']:.2f}x  ({row['tokens_per_s']:.0f} tok/s)", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small CPU run: fewer tokens, gammas, no large targets")
    ap.add_argument("--static", action="store_true", help="part A on static caches, compiled and graphed on a GPU")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.out = args.out or (RESULTS.with_name("speculative_static.json") if args.static else RESULTS)
    cache = "static" if args.static else "contiguous"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("no GPU: running the --tiny configuration")
        args.tiny = True
    n, gammas = (16, [1, 2, 4]) if args.tiny else (128, list(range(1, 9)))
    prompts_in = PROMPTS[:2] if args.tiny else PROMPTS
    torch.manual_seed(0)
    target, tok = load_tiny(device)
    try:
        draft, draft_name = load_draft(device=device), "llmsys-tiny-draft"
    except FileNotFoundError:
        draft, draft_name = truncated_model(target, 1), "llmsys-tiny first layer"
    print(f"target llmsys-tiny, draft {draft_name}, device {device}, {n} new tokens per prompt")
    results = {"config": {"new_tokens": n, "gammas": gammas, "draft": draft_name, "dtype": "float32", "cache": cache,
                          "batch": 1, "prompts": prompts_in, "repetitive_prompt": REPETITIVE[0]}, "rows": []}
    for label, texts in (("in-domain", prompts_in), ("repetitive", REPETITIVE)):
        prompts = [tok(t).input_ids for t in texts]
        generate(target, [prompts[0]], max_new_tokens=4)                          # warm-up
        t_plain = plain_seconds(target, prompts, n, static=args.static)
        t_step = decode_step_seconds(target, 32 if args.tiny else 200, static=args.static)
        t_verify = {g: decode_step_seconds(target, 16 if args.tiny else 100, tokens=g + 1, static=args.static)
                    for g in gammas}
        print(f"\n[{label}] plain decoding: {len(prompts) * n / t_plain:.0f} tok/s, "
              f"decode step {t_step * 1e3:.2f} ms")
        for name, drafter in ((draft_name, ModelDrafter(draft, cache=cache)), ("prompt lookup", PromptLookupDrafter())):
            for row in sweep(target, drafter, name, prompts, n, gammas, t_plain, t_step, t_verify, cache):
                results["rows"].append({"text": label, "plain_tokens_per_s": len(prompts) * n / t_plain, **row})
    model_rows = [r for r in results["rows"] if r["text"] == "in-domain" and r["drafter"] == draft_name]
    best = max(model_rows, key=lambda r: r["measured_speedup"])
    results["best_model_drafter"] = best
    print(f"\nbest gamma for the model drafter (in-domain): {best['gamma']}: measured {best['measured_speedup']:.2f}x, "
          f"predicted {best['predicted_speedup']:.2f}x")

    # Part B: how c falls as the target grows (same draft), and what part A's alpha then predicts.
    results["large_targets"] = []
    if not args.tiny and not args.static:
        t_draft = decode_step_seconds(draft, 200)
        alpha = best["alpha"]
        print(f"\n[larger targets] draft step {t_draft * 1e3:.2f} ms; alpha = {alpha:.2f} from part A")
        for cfg in LARGE:
            big = random_target(cfg, device)
            t_big = decode_step_seconds(big, 50)
            c = t_draft / t_big
            pred = {g: expected_speedup(alpha, g, c) for g in range(1, 9)}
            g_best = max(pred, key=pred.get)
            results["large_targets"].append({"name": cfg.name, "params": sum(p.numel() for p in big.parameters()),
                                             "step_ms": t_big * 1e3, "c": c, "alpha": alpha,
                                             "predicted_speedup": pred, "best_gamma": g_best})
            print(f"{cfg.name:>12}: step {t_big * 1e3:.2f} ms  c {c:.3f}  predicted best {pred[g_best]:.2f}x "
                  f"at gamma {g_best}", flush=True)
            del big
            if device == "cuda":
                torch.cuda.empty_cache()
    save_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
