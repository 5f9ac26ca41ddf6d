"""The lectures' worked examples, as data: one home for what the slides show.

Each example records where it comes from (the transcript file in the course material and the
slide's own words) and the numbers or tables the slide shows. Lessons print them beside what the
kit computes, and ``tests/test_lecture_examples.py`` asserts that the kit's code reproduces each
one. Where a slide is wrong or garbled, the example keeps the slide's version *and* says what is
wrong (``note``), so a lesson can show "slide says / kit shows / why".

Transcripts: 000 (attention, FLOPs, KV cache, continuous batching, PagedAttention), 001 (PagedAttention
recap, parallelism), 002 (KV cache, PagedAttention step by step, TTFT/TPOT, goodput, disaggregation),
003 (training memory, scaling laws, MoE), 004 (TTFT/TPOT, FlashAttention, Orca).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One worked example of a lecture.

    name:   short identifier used by lessons and tests (e.g. "paged_single_request").
    source: transcript file(s), e.g. "002".
    slide:  the slide's own words (quoted, shortened where long).
    data:   what the slide shows, as plain Python data (numbers, tables, lists).
    note:   where the slide is wrong, garbled or uses another convention, what and why; else "".
    """

    name: str
    source: str
    slide: str
    data: Any = field(default=None)
    note: str = ""


EXAMPLES: dict[str, Example] = {}


def example(name: str, source: str, slide: str, data: Any = None, note: str = "") -> Example:
    """Register an example (names are unique)."""
    if name in EXAMPLES:
        raise ValueError(f"lecture example {name!r} is defined twice")
    EXAMPLES[name] = ex = Example(name, source, slide, data, note)
    return ex


def get(name: str) -> Example:
    """The example called `name`, with a clear error listing the known names otherwise."""
    try:
        return EXAMPLES[name]
    except KeyError:
        raise KeyError(f"no lecture example {name!r}; known: {', '.join(sorted(EXAMPLES))}") from None


# ---- serving: KV cache, continuous batching, PagedAttention, goodput, Orca (000, 002, 004) ----


# ---- estimators: parameters, FLOPs, training memory, Chinchilla (000, 003) ----

example(
    "llama2_7b_forward_flops", "000",
    "LLama 2 7B Flops Forward: N(6bsh^2 + 4bs^2h + 3bs^2n + 2bsh^2) + N(6bshi) + 2bshv ~ 63 TFLOPs "
    "(b=1, s=4096, n=32, d=128, h=4096, i=11008, v=32000, N=32)",
    data={"batch": 1, "seq": 4096, "forward_tflops": 63},
)

example(
    "llama2_7b_training_flops", "000",
    "Training Computational Costs Breakdown: Total Training TeraFLOPs: 192.17 TFLOPs; FLOP Distribution by "
    "Layer: Embedding 1.676%, Normalization 0.007%, Residual 0.003%, Attention 41.276%, MLP 55.361%, Linear 1.676%",
    data={"batch": 1, "seq": 4096, "training_tflops": 192.17,
          "shares": {"embedding": 1.676, "norm": 0.007, "residual": 0.003, "attention": 41.276, "mlp": 55.361,
                     "lm_head": 1.676}},
    note="The slide's numbers follow one convention exactly (estimators.flops.slide_training_breakdown: 3 x forward; "
         "attention without RoPE; MLP 6bshi + 2bsi for Swish and the product together; residuals 4bsh per layer; "
         "embedding counted as a 2bshv one-hot matmul): 192.168 TFLOPs and all six shares. The slide's own "
         "per-operation table counts Swish 4bsi and the product bsi (5bsi, not 2bsi), RoPE 3bsnd and one bsh per "
         "residual add; counted that way (the kit's forward_flops_table) the total is 192.18 TFLOPs and MLP 55.364%, "
         "residual 0.002%. Without the embedding and forward only (the estimator view) the shares are attention "
         "42.0%, MLP 56.3%: the embedding's 1.676% is gone from the denominator.",
)

example(
    "chinchilla_law", "003",
    "Today's SoTA Law: L(N, D) = 406.4 / N^0.34 + 410.7 / D^0.29 + 1.69",
    data={"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta_slide": 0.29, "beta_paper": 0.28,
          "gopher_flops": 5.76e23, "chinchilla_params": 70e9, "chinchilla_tokens": 1.4e12},
    note="The slide writes D^0.29; Hoffmann et al. (2022, eq. 10) fit beta = 0.28, which the kit uses. The "
         "parametric fit (the paper's approach 3) with these published, rounded coefficients puts the compute-optimal "
         "model at Gopher's budget (5.76e23 FLOPs) at about 32B parameters and 3.0T tokens, 93 tokens per parameter "
         "(the paper's own approach-3 estimate is 40B). Chinchilla's 70B / 1.4T tokens (about 20 tokens per "
         "parameter) come from approaches 1 and 2 (minimum-loss envelope and IsoFLOP profiles: N_opt and D_opt both "
         "grow as C^0.5), which the paper followed. With the slide's 0.29 the same formula gives about 48B / 2.0T.",
)

example(
    "llama2_7b_training_memory", "003",
    "Memory for training: weights, gradients, optimizer states (AdamW: momentum and variance) and activations",
    data={"batch": 1, "seq": 4096, "precision": "mixed"},
    note="The peak of a step is not the sum of all parts: the activations are freed during the backward pass while "
         "the gradients are being written, so the estimate takes the largest of three moments (end of forward: weights, optimizer states, bf16 "
         "weight copies, activations, the loss's backward; the last layer's backward; the optimizer step: weights, "
         "gradients, optimizer states). For Llama-2-7B "
         "at b=1, s=4096 with AMP the kit's rows add up to 142.1 GiB; the peak is 117.0 GiB, at the end of the forward pass (where the loss's backward holds 1.0 GiB of fp32 gradients of the log-probabilities and logits), without the 25.1 GiB of gradients. (Before the estimator counted the loss's backward the table read 141.8 and 116.8.)",
)



# ---- compute: attention, FLOPs, memory, scaling laws, FlashAttention, latency (000, 001, 003, 004) ----
