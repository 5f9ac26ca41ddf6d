"""Request pool and iteration-level scheduler (Orca), on the paged KV cache's block budget.

Every iteration the scheduler decides which requests run:

* ``static``: a batch is formed only when the previous one has completely finished; requests that
  end early leave their slot idle, and new requests wait for the whole batch.
* ``continuous``: finished requests leave after every iteration and waiting requests are admitted
  at once (first come, first served), as long as the batch has a free slot (``max_batch``), the
  iteration's token budget allows their prefill (``token_budget``) and the KV pool has blocks for
  their prompt. With ``chunked_prefill`` a long prompt is prefilled over several iterations.

When a running request needs a new block and none is free, the most recently admitted request
is preempted by recomputation: its blocks are freed and it goes back to the front of the queue,
to be prefilled again with its prompt plus what it had generated.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .paged import BlockManager


class RequestError(ValueError):
    """A request cannot be accepted (and is never silently dropped)."""


@dataclass(eq=False)                           # requests are compared by identity (fast `in` / remove)
class Request:
    id: object
    prompt: list[int]
    max_new_tokens: int
    arrival: float = 0.0                       # iteration (simulator) or seconds (engine)
    output: list[int] = field(default_factory=list)
    prefilled: int = 0                         # tokens of prompt + output whose K/V are in the cache
    finished: bool = False
    preemptions: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token_slice(self, start: int, stop: int) -> list[int]:
        """tokens[start:stop] without building the whole list."""
        p = len(self.prompt)
        if stop <= p:
            return self.prompt[start:stop]
        if start >= p:
            return self.output[start - p:stop - p]
        return self.prompt[start:] + self.output[:stop - p]

    @property
    def to_prefill(self) -> int:
        """Tokens whose K/V must still be computed before this request can decode."""
        return self.num_tokens - self.prefilled


@dataclass
class Work:
    """One iteration: which requests run, and how many of their tokens each processes."""
    prefill: list[tuple[Request, int]] = field(default_factory=list)   # (request, tokens this iteration)
    decode: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def requests(self) -> list[Request]:
        return [r for r, _ in self.prefill] + self.decode

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefill) + len(self.decode)


class Scheduler:
    def __init__(self, blocks: BlockManager, policy: str = "continuous", max_batch: int = 8,
                 token_budget: int = 4096, max_context: int = 4096, chunked_prefill: bool = False):
        if policy not in ("static", "continuous"):
            raise RequestError(f"policy must be 'static' or 'continuous', got {policy!r}")
        if max_batch < 1 or token_budget < 1:
            raise RequestError(f"max_batch and token_budget must be >= 1, got {max_batch} and {token_budget}")
        self.blocks, self.policy, self.max_batch = blocks, policy, max_batch
        self.token_budget, self.max_context, self.chunked_prefill = token_budget, max_context, chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self.ids: set = set()

    # ---- the request pool ------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.id in self.ids:
            raise RequestError(f"duplicate request id {request.id!r}")
        if not request.prompt:
            raise RequestError(f"request {request.id!r} has an empty prompt")
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            raise RequestError(f"request {request.id!r}: max_new_tokens must be a positive int, "
                               f"got {request.max_new_tokens!r}")
        longest = len(request.prompt) + request.max_new_tokens
        if longest > self.max_context:
            raise RequestError(f"request {request.id!r} needs up to {longest} tokens, more than the model's "
                               f"context of {self.max_context}")
        if self.blocks.blocks_needed(longest) > self.blocks.num_blocks:
            raise RequestError(f"request {request.id!r} can never fit: up to {longest} tokens need "
                               f"{self.blocks.blocks_needed(longest)} blocks, the whole KV pool has "
                               f"{self.blocks.num_blocks}")
        if not self.chunked_prefill and len(request.prompt) > self.token_budget:
            raise RequestError(f"request {request.id!r}: a {len(request.prompt)}-token prompt exceeds the "
                               f"per-iteration token budget of {self.token_budget} (enable chunked_prefill)")
        self.ids.add(request.id)
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one iteration ---------------------------------------------------------------------
    def schedule(self, now: float = 0.0) -> Work:
        work = Work()
        budget = self.token_budget
        # requests already running: finish chunked prefills, else decode one token
        for r in list(self.running):
            if r.output and r.to_prefill == 1:          # only its newest token is new: decode
                work.decode.append(r)
                budget -= 1
            elif r.to_prefill > 0:                      # (the rest of) a prompt: prefill
                n = min(r.to_prefill, budget)
                if n > 0:
                    work.prefill.append((r, n))
                    budget -= n
        if self.policy == "continuous" or not self.running:
            self._admit(work, budget, now)
        return work

    def _admit(self, work: Work, budget: int, now: float) -> None:
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            r = self.waiting[0]
            if r.arrival > now:
                break
            need = r.num_tokens
            if not self.chunked_prefill and need > budget:
                break
            if not self.blocks.can_allocate(need):
                break                                   # FCFS: later requests wait behind it
            self.waiting.popleft()
            self.blocks.add(r.id, r.tokens)
            r.prefilled = 0
            if r.admitted_at is None:
                r.admitted_at = now
            self.running.append(r)
            n = min(need, budget)
            work.prefill.append((r, n))
            budget -= n

    def reserve_next_token(self, r: Request) -> Request | None:
        """Before r appends a token: make sure a block is there, preempting if the pool is dry.
        Returns the request that was preempted (possibly r itself), or None."""
        table = self.blocks.table(r.id)
        if table.filled[-1] < self.blocks.block_size or self.blocks.num_free > 0:
            return None
        victim = self.running[-1]                       # the most recently admitted
        self.preempt(victim)
        return victim

    def preempt(self, r: Request) -> None:
        self.blocks.free(r.id)
        self.blocks.finished.discard(r.id)              # the same id comes back later
        self.running.remove(r)
        r.prefilled = 0
        r.preemptions += 1
        self.waiting.appendleft(r)

    def complete(self, r: Request, now: float) -> None:
        r.finished, r.finished_at = True, now
        self.blocks.free(r.id)
        self.running.remove(r)
        self.finished.append(r)
