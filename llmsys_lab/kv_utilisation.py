"""How much KV-cache memory holds tokens: max-length reservation vs paged blocks.

A serving system that stores each request's KV cache contiguously must reserve room for the
longest possible answer when the request starts (it cannot know the real length). Paging
allocates a block only when a token needs it, so the only waste is the unfilled part of each
sequence's last block (< block_size tokens). Everything here is counted in token slots.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    prompt: int
    output: int

    @property
    def total(self) -> int:
        return self.prompt + self.output


def sample_requests(n: int, seed: int = 0, mean_prompt: float = 160, mean_output: float = 220,
                    max_len: int = 2048) -> list[Request]:
    """A seeded mix with long tails (log-normal lengths), every request within max_len."""
    rng = random.Random(seed)

    def lognormal(mean):
        sigma = 0.8
        return rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)

    out = []
    while len(out) < n:
        p, o = max(1, round(lognormal(mean_prompt))), max(1, round(lognormal(mean_output)))
        if p + o <= max_len:
            out.append(Request(p, o))
    return out


@dataclass
class Utilisation:
    static: float           # tokens / reserved slots, max-length reservation, averaged over decode steps
    paged: float            # tokens / slots of allocated blocks
    paged_waste_per_seq: float   # average unfilled slots in the last block (always < block_size)


def utilisation(requests: list[Request], max_len: int, block_size: int) -> Utilisation:
    """All requests start together and decode one token per step until each ends."""
    used = reserved_static = reserved_paged = 0
    waste, samples = 0, 0
    for t in range(max(r.output for r in requests) + 1):
        for r in requests:
            if t > r.output:
                continue                             # finished: its memory is released
            tokens = r.prompt + t
            used += tokens
            reserved_static += max_len
            blocks = -(-tokens // block_size)
            reserved_paged += blocks * block_size
            waste += blocks * block_size - tokens
            samples += 1
    return Utilisation(used / reserved_static, used / reserved_paged, waste / samples)


def max_batch(requests: list[Request], budget_tokens: int, max_len: int, block_size: int) -> tuple[int, int]:
    """(static, paged): how many of these requests fit in a KV budget at once, each at its peak
    length (paged) or its max_len reservation (static)."""
    static = min(len(requests), budget_tokens // max_len)
    paged, used = 0, 0
    for r in requests:
        need = -(-r.total // block_size) * block_size
        if used + need > budget_tokens:
            break
        used += need
        paged += 1
    return static, paged
