"""Replay the scheduler with a cost model instead of a model: schedules at any scale, on a CPU.

Each request has a known prompt length and output length (its last token is END/EOS). Every
iteration, a request being prefilled processes its prompt (or a chunk of it) and, when the prompt
is complete, produces its first token; a running request produces one token. The cost model
turns an iteration's work into seconds: a fixed cost, plus a cost per prefill token, per decode
sequence and per cached token read by attention. The tokens are applied by
``Scheduler.postprocess``, exactly as in the engine (``SimResult.schedule`` equals the engine's log).

The timeline records, per iteration, which request occupies which batch slot (a freed slot is
reused by the next admitted request, most recently freed first) and whether it produced a token
or END, which is how the lecture draws static and continuous batching.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .paged import BlockManager
from .scheduler import Outcome, Request, Scheduler, SchedulerStalled


@dataclass(frozen=True, init=False)
class SimRequest:
    id: str
    prompt_len: int
    output_len: int                 # tokens generated, the last one being END
    arrival_step: int = 1           # first iteration it may be admitted in

    def __init__(self, id: str, prompt_len: int, output_len: int, arrival_step: int = 1, *,
                 arrival: int | None = None):
        # `arrival=` is the older name of arrival_step, still accepted
        if arrival is not None:
            arrival_step = arrival
        for name, v in (("id", id), ("prompt_len", prompt_len), ("output_len", output_len),
                        ("arrival_step", arrival_step)):
            object.__setattr__(self, name, v)

    @property
    def arrival(self) -> int:
        return self.arrival_step


@dataclass(frozen=True)
class CostModel:
    """Seconds per iteration = base + per_prefill_token * P + per_decode_seq * D + per_kv_token * K."""
    base: float = 4e-3
    per_prefill_token: float = 2e-5
    per_decode_seq: float = 1e-4
    per_kv_token: float = 2e-7

    def time(self, prefill_tokens: int, decode_seqs: int, kv_tokens: int) -> float:
        return (self.base + self.per_prefill_token * prefill_tokens + self.per_decode_seq * decode_seqs
                + self.per_kv_token * kv_tokens)


@dataclass
class SimResult:
    timeline: list[dict[int, tuple[str, str]]]       # per iteration: slot -> (request id, 'token' | 'END' | 'prefill')
    requests: dict[str, Request]
    iteration_end: list[float]                       # modeled seconds at the end of each iteration
    kv_used: list[int] = field(default_factory=list)         # tokens in the cache per iteration
    kv_reserved: list[int] = field(default_factory=list)     # slots of allocated blocks per iteration
    waiting: list[list[str]] = field(default_factory=list)   # arrived but not admitted, per iteration
    schedule: list[dict] = field(default_factory=list)       # per iteration: Outcome.record (the engine logs the same)

    def table(self, first: int = 1, last: int | None = None, width: int = 5) -> str:
        """The lecture's grid: one row per batch slot, one column per iteration T1, T2, ..."""
        last = last or len(self.timeline)
        slots = sorted({s for it in self.timeline for s in it})
        head = "".join(f"{'T' + str(t):<{width}}" for t in range(first, last + 1))
        rows = [f"{'':<6}{head}".rstrip()]
        for s in slots:
            cells = []
            for t in range(first, last + 1):
                cell = self.timeline[t - 1] if t <= len(self.timeline) else {}
                rid, what = cell.get(s, ("", ""))
                cells.append(f"{'END' if what == 'END' else rid:<{width}}")
            rows.append(f"slot {s + 1} " + "".join(cells).rstrip())
        return "\n".join(rows)


def simulate(requests: list[SimRequest], policy: str = "continuous", max_batch: int = 4, block_size: int = 16,
             num_blocks: int = 1024, token_budget: int = 4096, chunked_prefill: bool = False,
             cost: CostModel = CostModel(), max_iterations: int = 100_000) -> SimResult:
    """Run the requests to completion; raises SchedulerStalled if they are not all done after
    max_iterations (or as soon as an iteration can run nothing although requests have arrived)."""
    blocks = BlockManager(num_blocks, block_size)
    sched = Scheduler(blocks, policy, max_batch, token_budget, max_context=10**9, chunked_prefill=chunked_prefill)
    by_id = {}
    for sr in sorted(requests, key=lambda r: r.arrival_step):
        req = Request(sr.id, [0] * sr.prompt_len, sr.output_len, arrival_step=sr.arrival_step)
        sched.add(req)
        by_id[sr.id] = req
    result = SimResult([], by_id, [])
    free_slots, slot_of, clock = [], {}, 0.0
    pending = sorted(by_id.values(), key=lambda r: r.arrival_step)    # not yet arrived
    for it in range(1, max_iterations + 1):
        if not sched.has_work:
            break
        while pending and pending[0].arrival_step <= it:
            pending.pop(0).arrival_time = clock             # seconds at the start of its arrival iteration
        work = sched.schedule(it)
        cells: dict[int, tuple[str, str]] = {}
        for r in work.requests:
            if r.id not in slot_of:
                slot_of[r.id] = free_slots.pop() if free_slots else len(slot_of) + len(free_slots)
        kv_tokens = sum(r.num_tokens for r in work.decode)       # K/V read by this iteration's decode rows
        clock += cost.time(sum(n for _, n in work.prefill), len(work.decode), kv_tokens)
        # tokens, completion and preemption: the scheduler's one bookkeeping path (the engine's too);
        # every token is 0 and a request ends at its max_new_tokens (its last token stands for END)
        outcome = sched.postprocess(work, [0] * len(work.rows), clock)
        finished, preempted = set(outcome.finished), set(outcome.preempted)
        for r, n in work.prefill:
            if r in sched.running and r.to_prefill > 0:
                cells[slot_of[r.id]] = (r.id, "prefill")
        for r in outcome.produced:
            if r not in preempted:                       # a preempted request leaves this iteration's grid
                cells[slot_of[r.id]] = (r.id, "END" if r in finished else "token")
        for r in outcome.left:                           # slots freed in the order their requests left
            free_slots.append(slot_of.pop(r.id))
        result.schedule.append(Outcome.record(work, outcome))
        result.timeline.append(cells)
        result.iteration_end.append(clock)
        result.kv_used.append(sum(r.num_tokens for r in sched.running))
        result.kv_reserved.append((blocks.num_blocks - blocks.num_free) * block_size)
        result.waiting.append([r.id for r in sched.waiting if r.arrival_step <= it])
    if sched.has_work:
        left = [r.id for r in by_id.values() if not r.finished]
        raise SchedulerStalled(f"{len(left)} of {len(by_id)} requests unfinished after {max_iterations} iterations: "
                               f"{', '.join(map(str, left))}\n" + sched.describe(max_iterations))
    return result


def disaggregated_goodput(prefill_rps_per_gpu: float, decode_rps_per_gpu: float, prefill_gpus: int,
                          decode_gpus: int) -> float:
    """Requests/s per GPU when prefill and decode run on separate GPUs (lecture 002): the pipeline
    goes as fast as its slower stage, divided by the GPUs it uses."""
    return min(prefill_rps_per_gpu * prefill_gpus, decode_rps_per_gpu * decode_gpus) / (prefill_gpus + decode_gpus)


def lecture_requests() -> list[SimRequest]:
    """Lecture 002's T1..T8 example as requests (``llmsys_lab.lecture``): S1..S4 start together with
    4-token prompts; S5, S6, S7 arrive at T6, T7, T8 with 3-token prompts. (Lecture 000's copy of
    the slide lost cells; see the lecture examples' notes.)"""
    from . import lecture

    static = lecture.get("static_batching_T1_T8").data["lengths"]
    later = lecture.get("continuous_batching_T1_T8").data
    return ([SimRequest(rid, 4, n) for rid, n in static.items()]
            + [SimRequest(rid, 3, later["lengths"][rid], arrival_step=t) for rid, t in later["arrivals"].items()])


LECTURE_REQUESTS = lecture_requests()
