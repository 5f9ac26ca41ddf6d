#!/usr/bin/env python3
"""Where the FLOPs are and where the time goes: the three operator classes of lecture 004.

The slide (after Ivanov et al., "Data Movement Is All You Need", a BERT encoder layer) splits a
training step's operators into three classes and compares their share of the FLOPs with their
share of the runtime:

    tensor contraction          99.80 % of FLOPs   61.0 % of runtime
    statistical normalisation    0.17 %            25.5 %
    element-wise                 0.03 %            13.5 %

This script measures the same split for one training step (forward + backward, no optimizer) of a
`transformers` Llama model with random weights:

* time: `torch.profiler`, each aten op's *self* device time (GPU) or self CPU time (CPU), so a
  kernel is counted once, under the op that launched it;
* FLOPs: contractions from `torch.utils.flop_counter.FlopCounterMode` on the same step (checked
  against an analytic count from the recorded shapes: matmuls 2MNK, attention 4BHMNd); the other
  classes analytically from the recorded input shapes (normalisations ~5 FLOPs per element:
  max, subtract, exp, sum, divide; element-wise ops 1 per element);
* classes: matmuls and attention are contractions; softmax, log-softmax, the cross-entropy's
  reductions and every op that runs inside an RMSNorm (forward, and its backward found through
  the autograd sequence number) are normalisations; everything else that runs (adds, muls, SiLU,
  RoPE, casts, copies, embedding gathers) is element-wise.

Two attention implementations: `eager` (softmax is its own kernel, as in the slide's BERT) and
`sdpa` (the softmax is fused into a FlashAttention kernel, so it counts as contraction).

    python benchmarks/operator_classes.py            # GPU: a 1.2B Llama, bf16, batch 4 x 2048
    python benchmarks/operator_classes.py --small    # anywhere (CPU): a tiny model, for testing

Saves benchmarks/results/operator_classes.json (GPU) with a hardware fingerprint, or the path
given with --out.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

CLASSES = ("tensor contraction", "statistical normalisation", "element-wise")
SLIDE = {"tensor contraction": (99.80, 61.0), "statistical normalisation": (0.17, 25.5),
         "element-wise": (0.03, 13.5)}
NORM_SCOPE = "llmsys::normalisation"

CONTRACTION_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::mv", "aten::dot")
ATTENTION_WORDS = ("flash_attention", "efficient_attention", "cudnn_attention", "_scaled_dot_product_attention_math")
NORM_WORDS = ("softmax", "nll_loss", "layer_norm", "rms_norm", "batch_norm", "group_norm", "logsumexp")
# ops whose own time is already counted in their children, or that move no data (views, bookkeeping)
_NO_WORK = ("aten::view", "aten::reshape", "aten::expand", "aten::transpose", "aten::t", "aten::permute",
            "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::as_strided",
            "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::detach", "aten::alias",
            "aten::_unsafe_view", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
            "aten::result_type", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense")


@dataclass
class Setup:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    dtype: torch.dtype
    device: str


# Multi-head attention (32 K/V heads) on the GPU: torch 2.11's FlopCounterMode cannot count SDPA
# with grouped K/V heads (enable_gqa) and stops with "query/key/value shapes are incompatible".
GPU_SETUP = Setup(2048, 16, 32, 32, 5632, 32000, 4, 2048, torch.bfloat16, "cuda")
SMALL_SETUP = Setup(64, 2, 4, 2, 176, 512, 2, 32, torch.float32, "cpu")


def op_class(name: str) -> str | None:
    """The class of an aten op by its name alone (None: decided by where it runs)."""
    if name in CONTRACTION_OPS or any(w in name for w in ATTENTION_WORDS):
        return CLASSES[0]
    if any(w in name for w in NORM_WORDS):
        return CLASSES[1]
    return None


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def op_flops(name: str, shapes: list) -> int:
    """FLOPs of one aten op from its input shapes (the analytic counts named in the docstring)."""
    shapes = [s for s in shapes if isinstance(s, list) and s and all(isinstance(x, int) for x in s)]
    if not shapes:
        return 0
    if name in ("aten::mm",):
        (m, k), (_, n) = shapes[0], shapes[1]
        return 2 * m * n * k
    if name in ("aten::addmm",):
        (m, k), (_, n) = shapes[1], shapes[2]
        return 2 * m * n * k
    if name in ("aten::bmm", "aten::baddbmm"):
        a, b = (shapes[0], shapes[1]) if name == "aten::bmm" else (shapes[1], shapes[2])
        return 2 * a[0] * a[1] * a[2] * b[2]
    if any(w in name for w in ATTENTION_WORDS):
        q, k = shapes[0], shapes[1]          # (B, H, M, d), (B, H, N, d)
        fwd = 4 * q[0] * q[1] * q[2] * k[2] * q[3]
        return int(2.5 * fwd) if "backward" in name else fwd
    biggest = max(_numel(s) for s in shapes)
    if op_class(name) == CLASSES[1] or name in ("aten::mean", "aten::sum", "aten::var", "aten::amax"):
        return 5 * biggest if op_class(name) == CLASSES[1] else biggest
    return biggest


def build_model(s: Setup, attn: str):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate,
                                   num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                   num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                                   max_position_embeddings=max(s.seq, 128), attn_implementation=attn)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(s.device, s.dtype).train()
    # mark every RMSNorm's forward, so its ops (pow, mean, rsqrt, mul) are classed as normalisation
    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            fwd = mod.forward

            def scoped(*a, _fwd=fwd, **kw):
                with torch.profiler.record_function(NORM_SCOPE):
                    return _fwd(*a, **kw)
            mod.forward = scoped
    return model


def train_step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def _in_scope(ev, names: set[str]) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.name in names:
            return True
        p = p.cpu_parent
    return False


def _backward_seq(ev) -> int | None:
    p = ev
    while p is not None:
        if p.name.startswith("autograd::engine::evaluate_function:"):
            return p.sequence_nr
        p = p.cpu_parent
    return None


def _works(ev) -> bool:
    return ev.name.startswith("aten::") and ev.name not in _NO_WORK


def _counts_flops(ev) -> bool:
    """Count an op's FLOPs once: at a contraction (not inside it), else at the innermost op that works."""
    p = ev.cpu_parent
    while p is not None:
        if op_class(p.name) == CLASSES[0]:
            return False                       # inside a matmul or attention op: already counted there
        p = p.cpu_parent
    if op_class(ev.name) == CLASSES[0]:
        return True
    return _works(ev) and not any(_works(c) for c in ev.cpu_children)


def measure(s: Setup, attn: str) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(s, attn)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), device=s.device, generator=None)
    gpu = s.device == "cuda"
    for _ in range(2):                                          # warm-up: kernels selected, memory pooled
        train_step(model, ids)
    if gpu:
        torch.cuda.synchronize()
    with FlopCounterMode(display=False) as fc:
        train_step(model, ids)
    counted = fc.get_total_flops()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts, record_shapes=True) as prof:
        train_step(model, ids)
        if gpu:
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.name.startswith("aten::")]

    # forward ops inside an RMSNorm: their sequence numbers mark the matching backward nodes
    norm_seq = {e.sequence_nr for e in events if e.sequence_nr >= 0 and _in_scope(e, {NORM_SCOPE})}
    time_us = dict.fromkeys(CLASSES, 0.0)
    flops = dict.fromkeys(CLASSES, 0)
    ops = dict.fromkeys(CLASSES, 0)
    for e in events:
        cls = op_class(e.name)
        if cls is None:
            in_norm = _in_scope(e, {NORM_SCOPE}) or _backward_seq(e) in norm_seq
            cls = CLASSES[1] if in_norm else CLASSES[2]
        t = e.self_device_time_total if gpu else e.self_cpu_time_total
        time_us[cls] += t
        if _counts_flops(e):
            flops[cls] += op_flops(e.name, e.input_shapes)
            ops[cls] += 1
    analytic = flops[CLASSES[0]]
    flops[CLASSES[0]] = counted              # contractions: FlopCounterMode's count (the real thing)
    total_t, total_f = sum(time_us.values()), sum(flops.values())
    return {"attention": attn, "time_us": time_us, "flops": flops, "ops": ops,
            "flops_pct": {c: 100 * flops[c] / total_f for c in CLASSES},
            "time_pct": {c: 100 * time_us[c] / total_t for c in CLASSES},
            "flop_counter_total": counted,
            "contraction_analytic_vs_flop_counter": analytic / counted if counted else None,
            "step_ms": total_t / 1e3}


def format_table(runs: list[dict]) -> str:
    lines = [f"{'class':<27}{'slide % FLOPs':>14}{'slide % time':>13}" +
             "".join(f"{r['attention'] + ' % FLOPs':>17}{r['attention'] + ' % time':>15}" for r in runs)]
    for c in CLASSES:
        lines.append(f"{c:<27}{SLIDE[c][0]:>14.2f}{SLIDE[c][1]:>13.1f}" +
                     "".join(f"{r['flops_pct'][c]:>17.2f}{r['time_pct'][c]:>15.1f}" for r in runs))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a tiny model on the CPU (tests the script)")
    ap.add_argument("--out", type=Path, default=None, help="where to save the JSON results")
    args = ap.parse_args(argv)
    if args.small:
        setup = SMALL_SETUP
    elif torch.cuda.is_available():
        setup = GPU_SETUP
    else:
        print("no CUDA GPU: run with --small for the CPU version")
        return 0
    runs = [measure(setup, attn) for attn in ("eager", "sdpa")]
    print(f"Llama, hidden {setup.hidden}, {setup.layers} layers, {setup.heads}/{setup.kv_heads} heads, "
          f"batch {setup.batch} x {setup.seq}, {str(setup.dtype).split('.')[1]}, {setup.device}: "
          "one training step (forward + backward)")
    print(format_table(runs))
    for r in runs:
        print(f"{r['attention']}: step {r['step_ms']:.1f} ms of profiled op time; contraction FLOPs (FlopCounterMode) "
              f"{r['flop_counter_total']:.3g}, analytic / FlopCounterMode = {r['contraction_analytic_vs_flop_counter']:.3f}")
    out = args.out or (Path(__file__).parent / "results" / ("operator_classes_small.json" if args.small
                                                            else "operator_classes.json"))
    if args.small and args.out is None:
        return 0                                              # the CPU check saves nothing unless asked
    from llmsys_lab.benchmarking import save_results

    save_results(out, {"setup": {k: str(v) for k, v in vars(setup).items()}, "slide": SLIDE, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
