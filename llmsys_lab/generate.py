"""Autoregressive generation, with and without a KV cache, for a batch of prompts.

Prompts of different lengths are left-padded (so every sequence's newest token sits in the
last column) with an attention mask; positions count real tokens only. Both paths produce
the same tokens; transformers' `generate` with the same padding produces them too (tests).

* without a cache, every step runs the model over the whole sequence so far;
* with a cache, a *prefill* step runs the prompt once and fills the cache, then every
  *decode* step runs one token per sequence against the cached keys and values.

Timings are recorded as the lectures define them: TTFT (time to first token: the prefill
and the first sample), TPOT (time per output token after the first), end-to-end latency
and throughput (generated tokens per second).
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .kv_cache import KVCache
from .sampling import SamplingParams, sample_rows
from .sampling import probs as sampling_probs
from .validate import ShapeError


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft: float = 0.0                         # seconds until every sequence has its first new token
    step_times: list[float] = field(default_factory=list)   # seconds of each later step
    compile_seconds: float = 0.0              # static path: compiling and capturing the step (in step 1's time)

    @property
    def tpot(self) -> float:
        return sum(self.step_times) / len(self.step_times) if self.step_times else 0.0

    @property
    def e2e(self) -> float:
        return self.ttft + sum(self.step_times)

    @property
    def throughput(self) -> float:
        return self.generated_tokens / self.e2e if self.e2e else 0.0


@dataclass
class GenerationOutput:
    sequences: torch.Tensor                   # (B, T0 + steps): left padding, prompt, new tokens, padding
    new_tokens: list[list[int]]               # per prompt, up to and including EOS
    stats: GenerationStats
    cache: KVCache | None = None


def pad_left(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, longest prompt)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = True
    return ids.to(device), mask.to(device)


def _is_int(x) -> bool:
    """A Python or NumPy integer (not a bool, not a float that happens to be whole)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def check_max_new_tokens(max_new_tokens) -> int:
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return int(max_new_tokens)


def check_token_ids(ids, vocab: int, what: str) -> list[int]:
    """A list of Python ints in 0..vocab-1 (NumPy integers are converted exactly); else a clear error."""
    if isinstance(ids, torch.Tensor) or isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ShapeError(f"{what} must be one sequence of token ids, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    out = []
    for i, t in enumerate(ids):
        if not _is_int(t):
            raise ValueError(f"{what}, token {i}: {t!r} is not an integer token id")
        if not 0 <= t < vocab:
            raise ValueError(f"{what}, token {i}: {int(t)} is outside 0..{vocab - 1} (the vocabulary)")
        out.append(int(t))
    return out


def _check_prompts(prompts, vocab: int, context: int, max_new_tokens: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ShapeError(f"a prompt tensor must be (batch, tokens), got shape {tuple(prompts.shape)}")
        if prompts.is_floating_point():
            raise TypeError(f"prompts must be integer token ids, got {prompts.dtype}")
        prompts = prompts.tolist()
    if isinstance(prompts, np.ndarray):
        if prompts.ndim not in (1, 2):
            raise ShapeError(f"a prompt array must be (tokens,) or (batch, tokens), got shape {prompts.shape}")
        if prompts.ndim == 1:
            prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    if _is_int(prompts[0]):
        prompts = [prompts]
    check_max_new_tokens(max_new_tokens)
    checked = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to condition on")
        p = check_token_ids(p, vocab, f"prompt {i}")
        if len(p) + max_new_tokens > context:
            raise ShapeError(f"prompt {i} has {len(p)} tokens; with max_new_tokens = {max_new_tokens} it would "
                             f"need {len(p) + max_new_tokens} positions, more than the model's context of {context}")
        checked.append(p)
    return checked


def check_sampling(temperature, top_k, top_p=1.0) -> None:
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                generator: torch.Generator | None, top_p: float = 1.0, seed: int | None = None,
                counter: int = 0) -> torch.Tensor:
    """(B, vocab) logits of the last position -> (B,) token ids (llmsys_lab.sampling's transform).
    With a `seed`, the draw is the serving engine's counter-based one (token number `counter` of every
    row): the same tokens as the engine serving the request with that seed. Else a `generator` drives
    torch.multinomial on the CPU."""
    if not do_sample:
        return logits.argmax(-1)
    check_sampling(temperature, top_k, top_p)
    if seed is not None:
        params = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=top_k, seed=seed)
        return sample_rows(logits, params, counter)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int = 32, use_cache: bool = True, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
             eos_token_id: int | None = 0, pad_token_id: int = 0, top_p: float = 1.0,
             seed: int | None = None, static_cache: bool = False, compile: bool = False,
             cuda_graph: bool | None = None) -> GenerationOutput:
    """Generate up to `max_new_tokens` for each prompt (lists of token ids, or a (B, T) tensor
    without padding). Sequences stop at `eos_token_id`; generation ends when all have.
    Sampling (do_sample=True): temperature, top_k, top_p; a `seed` makes the draws the serving
    engine's (llmsys_lab.sampling: every row is a request with that seed), else `generator` drives them.

    static_cache=True decodes over a StaticKVCache (llmsys_lab.static_decode: fixed shapes, no host
    sync in the step); compile=True also compiles the step with torch.compile (implies static_cache);
    cuda_graph (default: on for a CUDA model on the static path) replays the step from a CUDA graph.
    All paths give the same tokens (tests); ``stats.compile_seconds`` is the compile and capture time."""
    cfg = model.config
    prompts = _check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings, max_new_tokens)
    max_new_tokens = int(max_new_tokens)
    if do_sample:
        check_sampling(temperature, top_k, top_p)
        if seed is not None:
            SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=top_k, seed=seed)   # checks seed
    device = model.model.embed_tokens.weight.device
    ids, mask = pad_left(prompts, pad_token_id, device)
    b = len(prompts)
    stats = GenerationStats(prompt_tokens=sum(map(len, prompts)))
    static = bool(static_cache or compile)
    if static and not use_cache:
        raise ValueError("static_cache / compile decode over a KV cache: they need use_cache=True")
    decoder = None
    if static:
        from .static_decode import StaticDecoder

        decoder = StaticDecoder(model, b, ids.shape[1] + max_new_tokens, compile=compile,
                                cuda_graph=cuda_graph if cuda_graph is not None else device.type == "cuda")
        cache = decoder.cache
    elif use_cache:
        cache = KVCache.for_model(cfg, b, ids.shape[1] + max_new_tokens, model.lm_head.weight.dtype, device)
    else:
        cache = None
    done = torch.zeros(b, dtype=torch.bool, device=device)
    new = [[] for _ in range(b)]
    step_input = ids
    for step in range(max_new_tokens):
        _sync(device)
        start = time.perf_counter()
        if decoder is not None:                                               # prefill, then one token
            last = decoder.prefill(ids, mask) if step == 0 else decoder.decode(step_input[:, 0])
        elif use_cache:
            last = model(step_input, attention_mask=mask, kv_cache=cache)[:, -1]   # prefill, then one token
        else:
            last = model(ids, attention_mask=mask)[:, -1]                     # the whole sequence, again
        tok = next_tokens(last, do_sample, temperature, top_k, generator, top_p, seed, step)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        ids = torch.cat([ids, tok[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
        step_input = tok[:, None]
        for row in (~done).nonzero().flatten().tolist():
            new[row].append(int(tok[row]))
        if eos_token_id is not None:
            done |= tok == eos_token_id
        _sync(device)
        elapsed = time.perf_counter() - start
        if decoder is not None and step == 1:
            elapsed = max(0.0, elapsed - decoder.compile_seconds)     # compiling is reported apart
        if step == 0:
            stats.ttft = elapsed
        else:
            stats.step_times.append(elapsed)
        if bool(done.all()):
            break
    stats.generated_tokens = sum(map(len, new))
    if decoder is not None:
        stats.compile_seconds = decoder.compile_seconds
    return GenerationOutput(ids, new, stats, cache)
