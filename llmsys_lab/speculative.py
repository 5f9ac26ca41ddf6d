"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): several tokens per target step, exactly.

Decoding is memory-bound: each step reads every weight and the whole KV cache to produce one
token, so latency = step latency x number of steps. A cheap *drafter* proposes gamma tokens; the
target scores all of them in **one** forward pass (gamma + 1 positions cost about as much as one
when the step is memory-bound) and keeps a prefix of them:

* draft token x_i (drafted with probability q_i(x_i)) is accepted with probability
  min(1, p_i(x_i) / q_i(x_i)), where p_i is the target's distribution at that position;
* at the first rejection, one *correction* token is sampled from norm(max(0, p_i - q_i)) and the
  step ends; if all gamma are accepted, a *bonus* token is sampled from p_gamma.

Every emitted token is then distributed exactly as the target alone would sample it (the proof is
one line: P(x) = min(p, q)(x) + (1 - sum min(p, q)) * max(0, p - q)(x) / sum max(0, p - q) = p(x),
since sum max(0, p - q) = 1 - sum min(p, q)). With greedy decoding p and q are one-hot: a draft
token is kept iff it equals the target's argmax, and the output equals target greedy decoding.

Rejected tokens' K/V were written into the caches during the verify pass; they are rolled back
with ``KVCache.truncate`` (contiguous) or ``BlockManager.truncate`` (paged: emptied blocks return
to the pool).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .generate import _check_prompts, _sync
from .kv_cache import KVCache
from .paged import BlockManager
from .paged_cache import PagedBatch, PagedKVCache
from .sampling import probs as sampling_probs
from .validate import ConfigError, check_bool, check_finite_logits, check_int, check_number, check_token_id, is_int


# ---- sampling: the same transform for draft and target ----------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How logits become a distribution. do_sample=False is greedy (a one-hot on the argmax).
    The transform is llmsys_lab.sampling's (temperature, then top-k, then top-p), shared with
    ``generate`` and the serving engine."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        check_bool(self.do_sample, "do_sample")
        check_number(self.temperature, "temperature")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if self.top_k is not None:
            check_int(self.top_k, "top_k (None for no limit)", minimum=1)
        top_p = check_number(self.top_p, "top_p")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> (..., V) float32 probabilities (temperature, then top-k, top-p, softmax)."""
        logits = logits.float()
        if not self.do_sample:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return sampling_probs(logits, self.temperature, self.top_k, self.top_p)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a (V,) distribution (on the CPU, so a seeded generator gives the same draw everywhere)."""
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _check_distributions(probs: torch.Tensor, name: str) -> None:
    """Every row of `probs` is a distribution: finite, >= 0, with a positive sum (rounding allowed)."""
    if bool(torch.isnan(probs).any()) or bool(torch.isinf(probs).any()):
        raise ValueError(f"{name} must hold probabilities, but it holds NaN or inf")
    if bool((probs < 0).any()):
        raise ValueError(f"{name} must hold probabilities, but it has negative entries")
    sums = probs.sum(-1)
    if probs.shape[0] and bool((sums <= 0).any()):
        row = int((sums <= 0).nonzero()[0, 0])
        raise ValueError(f"{name} must hold probabilities, but row {row} sums to 0")


# ---- the verify step ----------------------------------------------------------------------------
def verify(draft_tokens: list[int], q: torch.Tensor | None, p: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """Modified rejection sampling: how many draft tokens to keep, and the token that follows them.

    draft_tokens: the gamma proposed ids. q: (gamma, V) the drafter's distributions they were drawn
    from, or None for a deterministic drafter (q is then one-hot on each draft token). p: (gamma + 1, V)
    the target's distributions at the same positions plus the one after the last draft token.
    Returns (n_accepted, next_token): the output continues with draft_tokens[:n] + [next_token].
    """
    gamma = len(draft_tokens)
    if p.dim() != 2 or p.shape[0] != gamma + 1:
        raise ValueError(f"p must be (gamma + 1, vocab) = ({gamma + 1}, V) for {gamma} draft tokens, "
                         f"got {tuple(p.shape)}")
    if q is not None and tuple(q.shape) != (gamma, p.shape[1]):
        raise ValueError(f"q must be (gamma, vocab) = {(gamma, p.shape[1])}, got {tuple(q.shape)}")
    vocab = p.shape[1]
    for i, x in enumerate(draft_tokens):
        if not is_int(x):
            raise TypeError(f"draft_tokens[{i}] must be a token id (an int), got {x!r}")
        if not 0 <= x < vocab:
            raise ValueError(f"draft_tokens[{i}] = {x} is outside the vocabulary 0 .. {vocab - 1}")
    p = p.float().cpu()
    q = q.float().cpu() if q is not None else None
    _check_distributions(p, "p")
    if q is not None:
        _check_distributions(q, "q")
    for i, x in enumerate(draft_tokens):
        px = float(p[i, x])
        qx = float(q[i, x]) if q is not None else 1.0
        if qx <= 0:
            raise ValueError(f"draft token {x} at position {i} has draft probability 0: it cannot have been "
                             "drawn from q (draft and target must use the same sampling settings)")
        if px >= qx or _uniform(generator) < px / qx:
            continue                                              # accepted
        residual = p[i].clone()                                   # max(0, p - q), normalised
        if q is not None:
            residual = (residual - q[i]).clamp(min=0)
        else:
            residual[x] = 0.0
        total = float(residual.sum())
        if total <= 0:        # p <= q everywhere yet x was rejected: only possible through rounding
            residual, total = p[i], float(p[i].sum())
        return i, _draw(residual / total, generator)
    return gamma, _draw(p[gamma], generator)


# ---- the target's (and a model drafter's) cache ---------------------------------------------------
class Runner:
    """What speculative decoding needs from the target's cache for one sequence: ``forward(new) -> logits``
    (len(new), V), ``truncate(n) -> freed blocks``, ``tokens`` (whose K/V it holds), ``release()`` and
    ``blocks_in_use()`` (0 where nothing is allocated per token)."""

    tokens: list[int]

    def release(self) -> None:
        pass

    def blocks_in_use(self) -> int:
        return 0


class ContiguousRunner(Runner):
    """A model and its contiguous KV cache for one sequence: forward new tokens, roll back."""

    def __init__(self, model, max_len: int):
        w = model.lm_head.weight
        self.model = model
        self.cache = KVCache.for_model(model.config, 1, max_len, w.dtype, w.device)
        self.tokens: list[int] = []                     # the tokens whose K/V the cache holds

    def forward(self, new: list[int]) -> torch.Tensor:
        """Append `new` tokens; return their logits (len(new), V)."""
        ids = torch.tensor([new], dtype=torch.long, device=self.model.lm_head.weight.device)
        logits = self.model(ids, kv_cache=self.cache)[0]
        self.tokens.extend(new)
        return logits

    def truncate(self, n: int) -> list[int]:
        self.cache.truncate(n)
        del self.tokens[n:]
        return []


class PagedRunner(Runner):
    """The same on a paged KV cache: blocks are allocated as drafted tokens arrive, freed on rollback."""

    SEQ = 0

    def __init__(self, model, max_len: int, block_size: int = 16, num_blocks: int | None = None):
        w = model.lm_head.weight
        self.model = model
        num_blocks = num_blocks if num_blocks is not None else -(-max_len // block_size)
        self.manager = BlockManager(num_blocks, block_size)
        self.cache = PagedKVCache(model.config, self.manager, w.dtype, w.device)
        self.tokens: list[int] = []

    def forward(self, new: list[int]) -> torch.Tensor:
        if not self.tokens:
            self.manager.add(self.SEQ, new)
        else:
            for tok in new:
                self.cache.copy_block(self.manager.append(self.SEQ, tok))
        batch = PagedBatch(self.cache, [self.SEQ], [len(new)])
        ids = torch.tensor([new], dtype=torch.long, device=self.model.lm_head.weight.device)
        logits = self.model(ids, attention_mask=batch.attention_mask(), kv_cache=batch)[0]
        self.tokens.extend(new)
        return logits

    def truncate(self, n: int) -> list[int]:
        dropped = self.manager.truncate(self.SEQ, n)
        del self.tokens[n:]
        return dropped

    def release(self) -> None:
        if self.tokens:
            self.manager.free(self.SEQ)

    def blocks_in_use(self) -> int:
        return self.manager.num_blocks - self.manager.num_free


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


RUNNER_CACHES = ("contiguous", "paged", "static")


def make_runner(model, max_len: int, cache: str = "contiguous", block_size: int = 16):
    """'contiguous' (KVCache), 'paged' (blocks freed on rollback) or 'static' (StaticKVCache: short forwards
    compiled and replayed from CUDA graphs on a GPU, llmsys_lab.static_decode.StaticRunner)."""
    check_int(block_size, "block_size", minimum=1)
    if cache == "contiguous":
        return ContiguousRunner(model, max_len)
    if cache == "paged":
        return PagedRunner(model, max_len, block_size)
    if cache == "static":
        from .static_decode import StaticRunner

        return StaticRunner(model, max_len)
    raise ValueError(f"cache must be one of {', '.join(map(repr, RUNNER_CACHES))}, got {cache!r}")


# ---- the loop -------------------------------------------------------------------------------------
@dataclass
class StepRecord:
    """One draft -> verify -> accept/reject -> rollback round (for the lesson's step-through)."""
    context_len: int              # tokens before this step
    draft: list[int]              # proposed tokens
    accepted: int                 # how many of them were kept
    next_token: int               # the correction (accepted < len(draft)) or bonus token
    blocks_freed: list[int] = field(default_factory=list)   # paged target: blocks returned on rollback
    blocks_in_use: int = 0        # paged target: blocks held after the rollback
    blocks_at_verify: int = 0     # paged target: blocks held during the verify pass (drafts included)


@dataclass
class SpeculativeStats:
    target_steps: int = 0         # target forward passes after the prefill (= verify steps)
    drafted: int = 0              # draft tokens proposed
    accepted: int = 0             # draft tokens kept
    rejections: int = 0           # steps that ended in a rejection (the others accepted every draft token)
    generated: int = 0            # tokens emitted
    seconds: float = 0.0          # wall time of the whole call, prefill included
    draft_seconds: float = 0.0    # of which spent drafting

    @property
    def acceptance_rate(self) -> float:
        """Fraction of proposed draft tokens that were kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def alpha(self) -> float:
        """Per-token acceptance probability, estimated from the tokens the target actually judged:
        accepted / (accepted + rejected). Tokens after a rejection are never judged, so this is the
        alpha of the speed-up model (Leviathan et al.), not acceptance_rate."""
        judged = self.accepted + self.rejections
        return self.accepted / judged if judged else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.generated / self.target_steps if self.target_steps else 0.0


@dataclass
class SpeculativeOutput:
    new_tokens: list[int]
    stats: SpeculativeStats
    steps: list[StepRecord]


def _check_proposal(drafter, draft, q, k: int, vocab: int) -> list[int]:
    """A drafter's proposal keeps the contract: at most k token ids of the vocabulary, q (len, V) or None."""
    who = f"drafter {type(drafter).__name__}.propose"
    if not isinstance(draft, (list, tuple)):
        raise TypeError(f"{who} must return a list of token ids, got {type(draft).__name__}")
    draft = list(draft)
    if len(draft) > k:
        raise ValueError(f"{who} returned {len(draft)} tokens for gamma = {k}: it may propose at most "
                         f"gamma tokens (fewer, or none, is fine)")
    for i, x in enumerate(draft):
        if not is_int(x) or not 0 <= x < vocab:
            raise ValueError(f"{who} returned token {x!r} at position {i}: not a token id in 0 .. {vocab - 1}")
    if q is not None and (not isinstance(q, torch.Tensor) or tuple(q.shape) != (len(draft), vocab)):
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"{who} returned q of shape {shape} for {len(draft)} tokens: expected "
                         f"({len(draft)}, {vocab}) or None")
    return [int(x) for x in draft]


@torch.no_grad()
def speculative_generate(target, drafter, prompt: list[int], max_new_tokens: int = 32, gamma: int = 4,
                         sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
                         eos_token_id: int | None = 0, cache: str = "contiguous", block_size: int = 16,
                         on_step=None, check_finite: bool = True) -> SpeculativeOutput:
    """Generate up to `max_new_tokens` after `prompt` (a list of ids) with draft-and-verify.

    drafter: a ``drafters.ModelDrafter`` or ``drafters.PromptLookupDrafter`` (anything with
    ``propose(context, gamma, sampling, generator) -> (tokens, q or None)``). cache: the target's
    KV cache, 'contiguous', 'paged' or 'static' (compiled and graph-replayed verify passes on a GPU). Greedy (the default) returns target greedy decoding exactly;
    with sampling, every token is distributed as the target's (temperature and top-k applied to
    draft and target alike). on_step(record, runner) is called after each verify step.
    check_finite: raise FloatingPointError if the target's logits hold NaN or inf (a free check
    here: every step already copies its probabilities to the CPU).
    """
    if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
        raise ValueError(f"gamma (draft tokens per step) must be an int >= 1, got {gamma!r}")
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    cfg = target.config
    (prompt,) = _check_prompts([prompt], cfg.vocab_size, cfg.max_position_embeddings, max_new_tokens)
    eos_token_id = check_token_id(eos_token_id, "eos_token_id", cfg.vocab_size)
    check_bool(check_finite, "check_finite")
    check_int(block_size, "block_size", minimum=1)
    drafter.check_target(target)
    drafter.begin(len(prompt) + max_new_tokens)
    device = target.lm_head.weight.device
    runner = make_runner(target, len(prompt) + max_new_tokens, cache, block_size)
    stats, records, out = SpeculativeStats(), [], []
    _sync(device)
    start = time.perf_counter()
    try:
        # Prefill: the cache holds every context token but the last, whose logits the next step needs.
        if len(prompt) > 1:
            runner.forward(prompt[:-1])
        context = list(prompt)
        while len(out) < max_new_tokens:
            k = min(gamma, max_new_tokens - len(out) - 1)   # draft no further than the output can go
            t0 = time.perf_counter()
            draft, q = drafter.propose(context, k, sampling, generator)
            _sync(device)
            stats.draft_seconds += time.perf_counter() - t0
            draft = _check_proposal(drafter, draft, q, k, cfg.vocab_size)
            logits = runner.forward([context[-1]] + draft)                 # (1 + k, V): one pass
            if check_finite:
                check_finite_logits(logits, f"the target's verify pass after {len(out)} new tokens")
            n, nxt = verify(draft, q, sampling.probs(logits), generator)
            held = runner.blocks_in_use()
            freed = runner.truncate(len(context) + n)                      # drop the rejected drafts' K/V
            emitted = draft[:n] + [nxt]
            stats.target_steps += 1
            stats.drafted += len(draft)
            stats.accepted += n
            stats.rejections += n < len(draft)
            record = StepRecord(len(context), list(draft), n, nxt, freed, runner.blocks_in_use(), held)
            records.append(record)
            if on_step is not None:
                on_step(record, runner)
            context += emitted
            for tok in emitted:
                out.append(tok)
                if tok == eos_token_id or len(out) == max_new_tokens:
                    break
            if out[-1] == eos_token_id:
                break
    finally:
        runner.release()
    _sync(device)
    stats.seconds = time.perf_counter() - start
    stats.generated = len(out)
    return SpeculativeOutput(out, stats, records)


# ---- the speed-up model ---------------------------------------------------------------------------
def _check_model_args(alpha: float, gamma: int) -> None:
    check_number(alpha, "alpha (per-token acceptance probability, in [0, 1])", minimum=0, maximum=1)
    check_int(gamma, "gamma", minimum=1)


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """E[tokens per target step] = (1 - alpha^(gamma+1)) / (1 - alpha): accepted drafts plus one."""
    _check_model_args(alpha, gamma)
    if alpha == 1:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_speedup(alpha: float, gamma: int, c: float) -> float:
    """Speed-up over plain decoding: tokens per step / (cost of gamma draft steps + one target step),
    in units of a target step; c = draft step time / target step time."""
    check_number(c, "c (draft step / target step cost)", minimum=0)
    return expected_tokens_per_step(alpha, gamma) / (gamma * c + 1)


def best_gamma(alpha: float, c: float, max_gamma: int = 16) -> int:
    """The gamma in 1..max_gamma with the largest expected speed-up."""
    check_int(max_gamma, "max_gamma", minimum=1)
    return max(range(1, max_gamma + 1), key=lambda g: expected_speedup(alpha, g, c))


def check_same_vocab(draft_config, target_config) -> None:
    if draft_config.vocab_size != target_config.vocab_size:
        raise ConfigError(f"the draft model's vocabulary has {draft_config.vocab_size} tokens but the target's "
                          f"has {target_config.vocab_size}: draft and target must share one tokenizer")
