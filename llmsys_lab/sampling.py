"""Sampling: how a row of logits becomes the next token (the kit's one implementation).

``generate``, speculative decoding (``speculative.Sampling``) and the serving engine all use it.

* **Greedy** (``temperature == 0``, the default): the argmax, exactly (``logits.argmax(-1)``), so the
  engine's tokens equal ``generate``'s.
* **Sampling**: logits / temperature, then top-k (keep the k most likely tokens), then top-p
  (nucleus: keep the smallest set of most likely tokens whose probability reaches p), renormalise,
  draw. Rows of one batch may use different settings: ``sample`` takes them as (B,) tensors and works
  on the device with no host sync, so it can follow a CUDA-graph replay in the same iteration.

**Reproducible draws, whatever the batch.** A per-request ``torch.Generator`` advances with every
draw of every row sharing it, and one batched ``torch.multinomial`` call cannot take a generator per
row. So the draw is counter-based instead (the idea of Philox/Threefry, Salmon et al. 2011): token
number ``i`` of a request with seed ``s`` uses the uniform number ``u = hash(s, i)``, computed on the
device from the two integers, and picks the token where the cumulative probability (most likely
token first) passes ``u``: inverse-CDF sampling. The same seed gives the same tokens whether the
request runs alone or in a batch of 64, before or after a preemption. Requests without a seed get a
fresh random one.
"""
from __future__ import annotations

import numbers
import random
from dataclasses import dataclass, field

import torch

from .validate import ConfigError, check_int, check_number, is_int

MASK32 = 0xFFFFFFFF


class SamplingError(ConfigError):
    """A sampling parameter has an invalid value (a ValueError: servers answer it with a 400)."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings.

    temperature: 0 = greedy (argmax); > 0 divides the logits before the softmax.
    top_p: in (0, 1]; 1 keeps every token. top_k: None or 0 keeps every token, else an int >= 1.
    seed: None (a random one is drawn) or an int >= 0: the same seed gives the same tokens.
    stop_token_ids: tokens that end the request (besides the model's EOS); the token is not in the text.
    stop: strings that end the request; the text ends before the first of them (the server applies them).
    max_tokens: the most new tokens (>= 1).
    """
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    max_tokens: int = 16

    def __post_init__(self):
        t = check_number(self.temperature, "temperature", minimum=0.0, error=SamplingError)
        p = check_number(self.top_p, "top_p", error=SamplingError)
        if not 0 < p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {p}")
        k = self.top_k
        if k is not None:
            k = check_int(k, "top_k (None or 0 for no limit)", minimum=0, error=SamplingError) or None
        seed = self.seed
        if seed is not None:
            seed = check_int(seed, "seed", minimum=0, error=SamplingError)
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not isinstance(stops, (list, tuple)):
            raise TypeError(f"stop_token_ids must be a list of token ids, got {stops!r}")
        for i, s in enumerate(stops):
            if not is_int(s) or s < 0:
                raise SamplingError(f"stop_token_ids[{i}] must be a token id (an int >= 0), got {s!r}")
        strings = self.stop
        if isinstance(strings, str):
            strings = (strings,)
        if not isinstance(strings, (list, tuple)):
            raise TypeError(f"stop must be a string or a list of strings, got {strings!r}")
        for i, s in enumerate(strings):
            if not isinstance(s, str) or not s:
                raise SamplingError(f"stop[{i}] must be a non-empty string, got {s!r}")
        m = check_int(self.max_tokens, "max_tokens", minimum=1, error=SamplingError)
        for name, v in (("temperature", t), ("top_p", p), ("top_k", k), ("seed", seed),
                        ("stop_token_ids", tuple(int(s) for s in stops)), ("stop", tuple(strings)), ("max_tokens", m)):
            object.__setattr__(self, name, v)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_vocab(self, vocab_size: int) -> None:
        for i, s in enumerate(self.stop_token_ids):
            if s >= vocab_size:
                raise SamplingError(f"stop_token_ids[{i}] = {s} is outside the vocabulary 0 .. {vocab_size - 1}")

    def with_seed(self) -> "SamplingParams":
        """These settings with a seed: a fresh random one where none was given (greedy needs none)."""
        if self.seed is not None or self.greedy:
            return self
        return SamplingParams(self.temperature, self.top_p, self.top_k, random.getrandbits(63),
                              self.stop_token_ids, self.stop, self.max_tokens)


# ---- counter-based uniforms ---------------------------------------------------------------------
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (murmur3's finaliser) of int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32         # the product stays below 2^64: low 32 bits exact
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def seed32(seed: int) -> int:
    """A 64-bit seed folded to the 32 bits the hash takes (both halves count)."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    return int(_mix32(torch.tensor(lo ^ int(_mix32(torch.tensor(hi + 0x9E3779B9)))))) & MASK32


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """(B,) float32 in [0, 1) from (B,) int64 32-bit seeds and token counters: u = hash(seed, counter)."""
    h = _mix32(seeds ^ _mix32((counters * 0x9E3779B1 + 0x7F4A7C15) & MASK32))
    h = _mix32(h ^ 0x5BD1E995)
    return (h >> 8).float() / float(1 << 24)


# ---- the transform and the draw -------------------------------------------------------------------
def _scaled(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / temperature in float32, shifted by the row maximum first: a tiny temperature then
    tends to the argmax instead of overflowing finite logits to inf (inf - inf = NaN)."""
    logits = logits.float()
    return (logits - logits.amax(-1, keepdim=True)) / temperature[:, None]


def _sorted_probs(logits, temperature, top_k, top_p):
    """Tokens sorted by probability (stable: ties keep the lower id first, as argmax does), and their
    probabilities after temperature, top-k and top-p, renormalised. All (B, V)."""
    vals, order = torch.sort(_scaled(logits, temperature), dim=-1, descending=True, stable=True)
    rank = torch.arange(vals.shape[-1], device=vals.device)[None, :]
    vals = vals.masked_fill(rank >= top_k[:, None], float("-inf"))        # top-k (k = V keeps all)
    probs = torch.softmax(vals, dim=-1)
    before = probs.cumsum(-1) - probs                                      # mass of the more likely tokens
    probs = probs.masked_fill((before >= top_p[:, None]) & (rank > 0), 0.0)    # top-p: the nucleus
    return probs / probs.sum(-1, keepdim=True), order


@dataclass
class SamplingBatch:
    """The per-row settings of one batch, as device tensors (built once per iteration on the host)."""
    greedy: torch.Tensor            # (B,) bool
    temperature: torch.Tensor       # (B,) float32 (1 on greedy rows: unused)
    top_k: torch.Tensor             # (B,) int64 (V where unlimited)
    top_p: torch.Tensor             # (B,) float32
    seeds: torch.Tensor             # (B,) int64, 32-bit
    counters: torch.Tensor          # (B,) int64: the index of the token being drawn
    all_greedy: bool = field(default=False)

    @staticmethod
    def build(params: list[SamplingParams | None], counters: list[int], vocab_size: int, device) -> "SamplingBatch":
        """params[i] (None = greedy) and the index of the token row i draws (its output length so far)."""
        ps = [p if p is not None else GREEDY for p in params]
        if any(not p.greedy and p.seed is None for p in ps):
            raise SamplingError("a sampling row needs a seed (SamplingParams.with_seed() draws one)")
        ints = torch.tensor([[int(p.greedy), (p.top_k or vocab_size), seed32(p.seed or 0), c]
                             for p, c in zip(ps, counters)], dtype=torch.int64).reshape(-1, 4)
        floats = torch.tensor([[p.temperature if not p.greedy else 1.0, p.top_p] for p in ps],
                              dtype=torch.float32).reshape(-1, 2)
        ints, floats = ints.to(device), floats.to(device)
        return SamplingBatch(ints[:, 0].bool(), floats[:, 0], ints[:, 1], floats[:, 1], ints[:, 2], ints[:, 3],
                             all_greedy=all(p.greedy for p in ps))


GREEDY = SamplingParams()


def probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 probabilities after temperature (> 0), top-k and top-p: the
    distribution ``sample`` draws from, as a dense tensor (speculative decoding's p and q, tests).
    Without top-p this is softmax(logits / temperature) bit for bit (top-k keeps ties with the k-th)."""
    logits = logits.float()
    scaled = logits / temperature
    if temperature < 1 and bool((torch.isinf(scaled) & torch.isfinite(logits)).any()):
        # a tiny temperature overflows finite logits to +-inf: shift first (softmax and top-k ignore it)
        scaled = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k:
        kth = torch.topk(scaled, min(int(top_k), scaled.shape[-1]), dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    p = torch.softmax(scaled, dim=-1)
    if top_p < 1:
        sp, order = torch.sort(p, dim=-1, descending=True, stable=True)
        rank = torch.arange(p.shape[-1], device=p.device)
        sp = sp.masked_fill(((sp.cumsum(-1) - sp) >= top_p) & (rank > 0), 0.0)
        p = torch.zeros_like(p).scatter_(-1, order, sp / sp.sum(-1, keepdim=True))
    return p


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: the argmax on greedy rows, a counter-based draw elsewhere.
    Device ops only (no host sync)."""
    greedy = logits.argmax(-1)
    if batch.all_greedy:
        return greedy
    p, order = _sorted_probs(logits, batch.temperature, batch.top_k, batch.top_p)
    cdf = p.cumsum(-1)
    u = uniforms(batch.seeds, batch.counters)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True)
    pick = pick.clamp(max=logits.shape[-1] - 1)
    drawn = order.gather(1, pick)[:, 0]
    return torch.where(batch.greedy, greedy, drawn)


def sample_rows(logits: torch.Tensor, params: SamplingParams, counters: list[int] | int) -> torch.Tensor:
    """(B, V) logits, one setting for all rows (with a seed, or greedy) -> (B,) tokens; `counters`:
    each row's token index (an int: the same for all rows)."""
    b = logits.shape[0]
    if isinstance(counters, numbers.Integral):
        counters = [int(counters)] * b
    return sample(logits, SamplingBatch.build([params] * b, counters, logits.shape[-1], logits.device))
