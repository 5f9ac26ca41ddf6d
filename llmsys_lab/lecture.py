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


# ---- compute: attention, FLOPs, memory, scaling laws, FlashAttention, latency (000, 001, 003, 004) ----
example(
    "memory_hierarchy", "004",
    "Memory is arranged hierarchically: GPU SRAM is small, and supports the fastest access; GPU HBM is larger "
    "but with much slower access; CPU DRAM is huge, but the slowest of all",
    data={"GPU SRAM": {"size": "20 MB", "bandwidth_TBps": 19.0},
          "GPU HBM": {"size": "40 GB", "bandwidth_TBps": 1.5},
          "CPU DRAM": {"size": "> 1 TB", "bandwidth_TBps": 0.0128}},
    note="The figure is the FlashAttention paper's (A100 40 GB: 1.5 TB/s HBM). Lesson 06 adds the H200's "
         "141 GB at 4.8 TB/s as the other end of the HBM range.",
)

example(
    "online_softmax_two_blocks", "004",
    "m(x) = max(m(x1), m(x2)); f(x) = [e^(m(x1)-m(x)) f(x1), e^(m(x2)-m(x)) f(x2)]; "
    "l(x) = e^(m(x1)-m(x)) l(x1) + e^(m(x2)-m(x)) l(x2); softmax(x) = f(x) / l(x)",
    data={"x1": [1.0, 3.0, 2.0, 0.5], "x2": [4.0, 1.5, -1.0, 2.0],
          "m1": 3.0, "l1": 1.5853, "m2": 4.0, "l2": 1.2242, "m": 4.0, "l": 1.8074},
    note="The slide derives the merge symbolically; these two blocks (lesson 06, section 2) are the kit's worked "
         "numbers, m and l rounded to 4 decimals.",
)

example(
    "operator_classes", "004",
    "Table 1. Proportions for operator classes in PyTorch (% flop, % runtime): tensor contraction 99.80 / 61.0, "
    "stat. normalization 0.17 / 25.5, element-wise 0.03 / 13.5",
    data={"tensor contraction": (99.80, 61.0), "statistical normalisation": (0.17, 25.5),
          "element-wise": (0.03, 13.5)},
    note="From Ivanov et al., 'Data Movement Is All You Need' (a BERT encoder layer, PyTorch, V100). "
         "benchmarks/operator_classes.py measures the same split for a Llama training step; lesson 06 prints "
         "both tables. With softmax fused into the attention kernel (SDPA) the normalisation share shrinks.",
)

example(
    "flash_numeric_deviation", "004",
    "Flash Attention sees roughly an order of magnitude more numeric deviation as compared to Baseline "
    "Attention at BF16 when measured during an isolated forward pass (Golden et al.)",
    data={"flash_vs_baseline_order": 10},
    note="Golden et al.'s baseline computes attention with higher-precision intermediates (S and the softmax in "
         "fp32, only the output in BF16). Lesson 06's first comparison uses standard attention run in bf16, which "
         "rounds S and P to bf16 in memory: against that baseline flash is slightly better (about 0.8x). "
         "benchmarks/numeric_deviation.py measures against both baselines.",
)

example(
    "e2e_latency", "004",
    "E2E Latency = TTFT + (TPOT * the number of generated tokens)",
    data={"slide": "TTFT + TPOT * n", "kit": "TTFT + TPOT * (n - 1)"},
    note="The first generated token is already paid for by TTFT (prefill ends by sampling it), so only the "
         "n - 1 later tokens each cost one TPOT. The slide's TTFT + TPOT * n counts the first token twice "
         "(or defines TTFT as the prefill alone).",
)

example(
    "gqa_all_heads_share", "000",
    "GQA (group query attention): all heads share K, V but have different Q",
    data={"all query heads share one K/V head": "MQA", "groups of query heads share a K/V head": "GQA"},
    note="'All heads share K, V' is multi-query attention (MQA, num_kv_heads = 1). Grouped-query attention "
         "shares one K/V head within each *group* of query heads (1 < num_kv_heads < num_heads); lesson 01, "
         "section 7, shows all three.",
)
