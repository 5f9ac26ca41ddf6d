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
to be prefilled again with its prompt plus what it had generated. Without chunked prefill that
recomputation can be longer than the token budget (prompt + output > budget); such a request is
recomputed in budget-sized chunks, so it can always come back.

After the model (or the cost model) has run an iteration, ``Scheduler.postprocess`` applies its
tokens: the engine and the simulator both call it, so they cannot disagree on the bookkeeping.
Requests are processed in batch order (prefill rows, then decode rows). A request that produced a
token keeps it, even when it is preempted in the same iteration (possibly by its own need for a
block): the token is in its output and is recomputed into the cache with the rest at readmission.
A request preempted before its turn in the batch order has not produced its token this iteration
(its row is discarded and recomputed later).

Clocks: fields ending in ``_step`` count iterations (1, 2, ...), fields ending in ``_time`` are
seconds (wall clock in the engine, modelled seconds in the simulator). A watchdog raises
``SchedulerStalled`` with the scheduler's state when an iteration can run nothing although
requests have arrived: no configuration hangs.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .errors import LabError
from .paged import BlockManager
from .validate import check_bool


class RequestError(LabError, ValueError):
    """A request cannot be accepted (and is never silently dropped)."""


class SchedulerStalled(LabError, RuntimeError):
    """No request can make progress: raised instead of looping forever."""


@dataclass(eq=False)                           # requests are compared by identity (fast `in` / remove)
class Request:
    id: object
    prompt: list[int]
    max_new_tokens: int
    arrival_step: int = 0                      # first iteration in which it may be admitted
    output: list[int] = field(default_factory=list)
    prefilled: int = 0                         # tokens of prompt + output whose K/V are in the cache
    finished: bool = False
    preemptions: int = 0
    admitted_step: int | None = None           # iteration of its first admission
    arrival_time: float | None = None          # seconds: when it arrived (the start of iteration arrival_step)
    first_token_time: float | None = None      # seconds: when its first token was produced
    finished_time: float | None = None         # seconds: when its last token was produced
    token_times: list[float] = field(default_factory=list)   # seconds: when each token was produced
    sampling: object = None                    # llmsys_lab.sampling.SamplingParams; None = greedy
    stop_token_ids: frozenset = frozenset()    # tokens that end it besides EOS
    aborted: bool = False                      # cancelled (Engine.abort) before it finished

    # the older names, read-only (lessons written before the fields were named by unit)
    @property
    def arrival(self) -> int:
        return self.arrival_step

    @property
    def admitted_at(self) -> int | None:
        return self.admitted_step

    @property
    def first_token_at(self) -> float | None:
        return self.first_token_time

    @property
    def finished_at(self) -> float | None:
        return self.finished_time

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

    @property
    def requests(self) -> list[Request]:
        return [r for r, _ in self.prefill] + self.decode

    @property
    def rows(self) -> list[tuple[Request, int]]:
        """(request, tokens) in batch order: prefill chunks, then decode rows; one new token per row."""
        return self.prefill + [(r, 1) for r in self.decode]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefill) + len(self.decode)


@dataclass
class Outcome:
    """What ``Scheduler.postprocess`` did with one iteration's tokens."""
    produced: list[Request] = field(default_factory=list)     # appended a token (batch order)
    finished: list[Request] = field(default_factory=list)     # produced their last token (EOS or max_new_tokens)
    preempted: list[Request] = field(default_factory=list)    # back at the head of the queue
    self_preempted: list[Request] = field(default_factory=list)   # of those, preempted for their own next token
    left: list[Request] = field(default_factory=list)         # finished or preempted, in the order they left
    copies: list = field(default_factory=list)                # copy-on-write block copies the KV store must do

    @staticmethod
    def record(work: Work, outcome: "Outcome") -> dict:
        """The iteration as plain data (ids), equal for the engine and the simulator on the same workload."""
        return {"prefill": [(r.id, n) for r, n in work.prefill], "decode": [r.id for r in work.decode],
                "produced": [r.id for r in outcome.produced], "finished": [r.id for r in outcome.finished],
                "preempted": [r.id for r in outcome.preempted],
                "self_preempted": [r.id for r in outcome.self_preempted]}


class Scheduler:
    def __init__(self, blocks: BlockManager, policy: str = "continuous", max_batch: int = 8,
                 token_budget: int = 4096, max_context: int = 4096, chunked_prefill: bool = False):
        if policy not in ("static", "continuous"):
            raise RequestError(f"policy must be 'static' or 'continuous', got {policy!r}")
        for name, v in (("max_batch", max_batch), ("token_budget", token_budget), ("max_context", max_context)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RequestError(f"{name} must be an int >= 1, got {v!r}")
        if token_budget < max_batch:
            raise RequestError(f"token_budget = {token_budget} must be >= max_batch = {max_batch}: every running "
                               f"request decodes one token per iteration")
        check_bool(chunked_prefill, "chunked_prefill")
        self.blocks, self.policy, self.max_batch = blocks, policy, max_batch
        self.token_budget, self.max_context, self.chunked_prefill = token_budget, max_context, chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self.ids: set = set()

    # ---- the request pool ------------------------------------------------------------------
    def add(self, request: Request) -> None:
        try:
            hash(request.id)
        except TypeError:
            raise RequestError(f"request_id must be hashable (a str, an int, a tuple), got {request.id!r} "
                               f"({type(request.id).__name__})") from None
        if request.id in self.ids:
            raise RequestError(f"duplicate request id {request.id!r}")
        if not request.prompt:
            raise RequestError(f"request {request.id!r} has an empty prompt")
        if not isinstance(request.max_new_tokens, int) or isinstance(request.max_new_tokens, bool) \
                or request.max_new_tokens < 1:
            raise RequestError(f"request {request.id!r}: max_new_tokens must be a positive int, "
                               f"got {request.max_new_tokens!r}")
        if not isinstance(request.arrival_step, int) or isinstance(request.arrival_step, bool):
            raise RequestError(f"request {request.id!r}: arrival_step must be an int (an iteration), "
                               f"got {request.arrival_step!r}")
        if request.arrival_step < 0:
            raise RequestError(f"request {request.id!r}: arrival_step must be an int >= 0 (an iteration), "
                               f"got {request.arrival_step}")
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
        # first come, first served by arrival: behind every request that arrives no later
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].arrival_step > request.arrival_step:
            i -= 1
        self.waiting.insert(i, request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one iteration ---------------------------------------------------------------------
    def schedule(self, step: int = 0) -> Work:
        """The work of iteration `step`. Raises SchedulerStalled if requests have arrived but none can run."""
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
            self._admit(work, budget, step)
        if work.num_tokens == 0 and (self.running or (self.waiting and self.waiting[0].arrival_step <= step)):
            raise SchedulerStalled(f"iteration {step}: no request can run although requests have arrived\n"
                                   + self.describe(step))
        return work

    def _admit(self, work: Work, budget: int, step: int) -> None:
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            r = self.waiting[0]
            if r.arrival_step > step:
                break
            need = r.num_tokens
            # a whole prompt in one iteration, unless chunked prefill is on, or this is the
            # recomputation of a preempted request that would never fit (prompt + output > budget)
            if need > budget and not (self.chunked_prefill or need > self.token_budget):
                break
            if not self.blocks.can_allocate(need):
                break                                   # FCFS: later requests wait behind it
            self.waiting.popleft()
            self.blocks.add(r.id, r.tokens)
            r.prefilled = 0
            if r.admitted_step is None:
                r.admitted_step = step
            self.running.append(r)
            n = min(need, budget)
            work.prefill.append((r, n))
            budget -= n

    # ---- after the iteration ran --------------------------------------------------------------
    def postprocess(self, work: Work, new_tokens: list[int], time: float, eos: int | None = None) -> Outcome:
        """Apply iteration `work`'s results: `new_tokens[i]` is the token predicted for `work.rows[i]`
        (ignored for a chunk that does not finish its prefill); `time` (seconds) stamps the tokens.

        In batch order, each request still running: its processed tokens are now cached; if nothing
        is left to prefill it appends its token; it completes on `eos` or at max_new_tokens (its
        blocks go back to the pool); otherwise its token is stored, preempting the most recently
        admitted request (possibly itself) if the pool has no block for it. A preempted request keeps
        every token it has produced, this iteration's included.
        """
        rows = work.rows
        if len(new_tokens) != len(rows):
            raise ValueError(f"{len(new_tokens)} new tokens for an iteration of {len(rows)} rows")
        out = Outcome()
        for (r, n), tok in zip(rows, new_tokens):
            if r not in self.running:
                continue                                # preempted earlier in this iteration: recomputed later
            r.prefilled += n
            if r.to_prefill > 0:
                continue                                # a chunk of a longer prompt: no token yet
            r.output.append(tok)
            r.token_times.append(time)
            if r.first_token_time is None:
                r.first_token_time = time
            out.produced.append(r)
            if tok == eos or tok in r.stop_token_ids or len(r.output) == r.max_new_tokens:
                self.complete(r, time)
                out.finished.append(r)
                out.left.append(r)
                continue
            victim = self.reserve_next_token(r)
            if victim is not None:
                out.preempted.append(victim)
                out.left.append(victim)
                if victim is r:
                    out.self_preempted.append(r)
                    continue                            # it keeps the token; the cache gets it at recomputation
            cow = self.blocks.append(r.id, tok)
            if cow is not None:
                out.copies.append(cow)
        return out

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
        self.blocks.free(r.id, reuse_id=True)           # the same id comes back later
        self.running.remove(r)
        r.prefilled = 0
        r.preemptions += 1
        self.waiting.appendleft(r)

    def complete(self, r: Request, time: float) -> None:
        r.finished, r.finished_time = True, time
        self.blocks.free(r.id)
        self.running.remove(r)
        self.finished.append(r)

    def describe(self, step: int) -> str:
        """The scheduler's state in a few lines (for errors)."""
        def fmt(rs):
            return ", ".join(f"{r.id} ({r.num_tokens} tokens, arrived at step {r.arrival_step})" for r in rs) or "-"
        return (f"  policy: {self.policy}, max_batch {self.max_batch}, token_budget {self.token_budget}, "
                f"chunked_prefill {self.chunked_prefill}\n"
                f"  waiting: {fmt(self.waiting)}\n  running: {fmt(self.running)}\n"
                f"  free blocks: {self.blocks.num_free} of {self.blocks.num_blocks} "
                f"(block size {self.blocks.block_size})")
