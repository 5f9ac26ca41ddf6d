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
