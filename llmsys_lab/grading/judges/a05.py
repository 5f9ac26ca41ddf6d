"""Assignment 05 (continuous batching): the student's Batcher run to completion (llmsys_lab.grading.drivers.a05)
on workloads drawn per submission -- the lecture's shapes with fresh lengths and arrivals, pools small enough to
preempt, requests handed over in adversarial orders (reversed, shuffled, tied arrivals, late arrivals first) --
and compared iteration by iteration with the harness's own simulation of the rules the assignment states."""
from __future__ import annotations

from collections import deque

import torch

from ..harness import Call, Spec, _err

ASSIGNMENT = "05_continuous_batching"
DRIVER = "llmsys_lab.grading.drivers.a05:drive_batcher"
NONE, TOKEN, END = 0, 1, 2


class _R:
    def __init__(self, rid, prompt_len, output_len, arrival):
        self.id, self.prompt_len, self.output_len, self.arrival = rid, prompt_len, output_len, arrival
        self.generated = self.blocks = 0
        self.preemptions = 0

    @property
    def tokens(self):
        return self.prompt_len + self.generated


def simulate(requests, policy="continuous", max_batch=4, num_blocks=1024, block_size=16, max_iters=5000):
    """The assignment's rules, iteration by iteration: [(produced {id: 'token'|'END'}, arrived waiting ids,
    blocks in use)], and the number of preemptions; None if the workload does not finish in max_iters."""
    reqs = [_R(*r) for r in requests]
    waiting = deque(sorted(reqs, key=lambda r: r.arrival))          # FCFS by arrival, ties in the given order
    running, free, history, preempted = [], num_blocks, [], 0
    blocks_for = lambda n: -(-n // block_size)  # noqa: E731
    for now in range(1, max_iters + 1):
        if not (waiting or running):
            return history, preempted
        before = list(running)
        admitted = []
        if policy == "continuous" or not running:
            while waiting and len(running) < max_batch:
                head = waiting[0]
                if head.arrival > now or blocks_for(head.tokens) > free:
                    break
                waiting.popleft()
                head.blocks = blocks_for(head.tokens)
                free -= head.blocks
                running.append(head)
                admitted.append(head)
        produced = {}
        for r in admitted + before:
            if r not in running:
                continue
            if r.generated + 1 == r.output_len:
                produced[r.id] = "END"
                r.generated += 1
                free += r.blocks
                r.blocks = 0
                running.remove(r)
                continue
            produced[r.id] = "token"
            if r.tokens == r.blocks * block_size:
                if free == 0:
                    victim = running.pop()
                    free += victim.blocks
                    victim.blocks = 0
                    victim.preemptions += 1
                    preempted += 1
                    waiting.appendleft(victim)
                    produced.pop(victim.id, None)
                    if victim is r:
                        r.generated += 1
                        continue
                free -= 1
                r.blocks += 1
            r.generated += 1
        history.append((produced, [r.id for r in waiting if r.arrival <= now], sum(r.blocks for r in running)))
    return None


# ---- workloads drawn per submission ----------------------------------------------------------------------
def _randint(g, lo, hi):
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _adversarial(g, reqs, k):
    """The same workload handed over in an order that a scheduler relying on the list order gets wrong."""
    kind = k % 4
    if kind == 0:
        return list(reversed(reqs))                                     # late arrivals first
    if kind == 1:
        return [reqs[i] for i in torch.randperm(len(reqs), generator=g).tolist()]
    if kind == 2:                                                       # ties: several arrive together
        return [[rid, p, o, 1 + (a - 1) // 3 * 3] for rid, p, o, a in reqs]
    return sorted(reqs, key=lambda r: -r[3])                            # arrivals descending


def _workload(g, n_lo, n_hi, prompt_hi, out_hi, arrival_hi, prefix="r"):
    return [[f"{prefix}{i}", _randint(g, 1, prompt_hi), _randint(g, 1, out_hi), _randint(g, 1, arrival_hi)]
            for i in range(_randint(g, n_lo, n_hi))]


def _tight_pool(g, reqs, block_size, slack):
    need = max(-(-(p + o) // block_size) for _, p, o, _ in reqs)
    return need + _randint(g, 0, slack)


_LECTURE = [["S1", 4, 6, 1], ["S2", 3, 8, 1], ["S3", 4, 5, 1], ["S4", 5, 7, 1], ["S5", 3, 4, 6], ["S6", 3, 3, 7],
            ["S7", 2, 3, 8]]
_WALK = [["R1", 3, 6, 1], ["R2", 3, 2, 1], ["R3", 2, 4, 2], ["R4", 2, 3, 3], ["R5", 2, 3, 3]]


def _calls(g: torch.Generator):
    calls = []

    def add(test, i, reqs, kwargs):
        result = simulate(reqs, **kwargs)
        if result is None:
            return False
        calls.append(Call(f"{test}/{i}", "Batcher", [reqs, kwargs, len(result[0]) + 2], via=DRIVER))
        return True

    # static and continuous: the lecture's table, then fresh lecture-sized workloads (four at T1, three later)
    for test, policy in (("static", "static"), ("continuous", "continuous")):
        add(test, "lecture", _LECTURE, dict(policy=policy, max_batch=4))
        for i in range(6):
            first = [[f"S{j + 1}", _randint(g, 1, 8), _randint(g, 1, 10), 1] for j in range(4)]
            later = [[f"S{j + 5}", _randint(g, 1, 8), _randint(g, 1, 6), _randint(g, 2, 10)] for j in range(3)]
            reqs = first + later
            if i >= 2:
                reqs = _adversarial(g, reqs, i)
            add(test, i, reqs, dict(policy=policy, max_batch=_randint(g, 1, 4) if i % 2 else 4))
    # the walk-through: max batch 3, arrivals over the first iterations
    add("walk", "lecture", _WALK, dict(max_batch=3))
    for i in range(6):
        reqs = [[f"R{j + 1}", _randint(g, 1, 5), _randint(g, 1, 7), _randint(g, 1, 4)] for j in range(5)]
        add("walk", i, _adversarial(g, reqs, i) if i >= 2 else reqs, dict(max_batch=3))
    # preemption: pools that run dry; only workloads that do preempt (and finish) are kept
    add("preempt", "abc", [["A", 3, 8, 1], ["B", 2, 7, 1], ["C", 4, 5, 1]], dict(max_batch=3, num_blocks=6, block_size=2))
    add("preempt", "xz", [["x", 1, 4, 1], ["z", 2, 3, 2]], dict(max_batch=2, num_blocks=3, block_size=2))
    made = tries = 0
    while made < 10 and tries < 500:
        tries += 1
        reqs = _workload(g, 2, 5, 8, 12, 4)
        block_size = [1, 2, 4][_randint(g, 0, 2)]
        kwargs = dict(policy="continuous", max_batch=_randint(g, 2, 4), num_blocks=_tight_pool(g, reqs, block_size, 2),
                      block_size=block_size)
        reqs = _adversarial(g, reqs, made) if made % 2 else reqs
        result = simulate(reqs, **kwargs)
        if result is not None and result[1] > 0:
            made += add("preempt", made, reqs, kwargs)
    # random workloads, both policies, every order
    for i in range(40):
        reqs = _workload(g, 1, 8, 10, 12, 6)
        block_size = [1, 2, 4][_randint(g, 0, 2)]
        kwargs = dict(policy=["static", "continuous"][i % 2], max_batch=_randint(g, 1, 4),
                      num_blocks=_tight_pool(g, reqs, block_size, 8), block_size=block_size)
        add("random", i, _adversarial(g, reqs, i // 2) if i % 3 else reqs, kwargs)
    return calls, {"drawn": torch.zeros(1)}


# ---- the judge -------------------------------------------------------------------------------------------
def _judge(prefix):
    def judge(t, outputs, errors):
        for call in (c for c in t["__calls__"] if c.id.startswith(prefix + "/")):
            if _err(errors, call.id):
                return _err(errors, call.id)
            reqs, kwargs, _ = call.args
            history, _ = simulate(reqs, **kwargs)
            ids = [r[0] for r in reqs]
            n = len(ids)
            where = f"Batcher({[tuple(r) for r in reqs]}, {', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
            got = outputs.get(call.id)
            if not isinstance(got, torch.Tensor) or got.dtype != torch.int64 or got.numel() % (2 * n + 1):
                return f"{where}: no complete record of the iterations came back"
            rows = got.reshape(-1, 2 * n + 1).tolist()
            for it, (row, (produced, waiting, used)) in enumerate(zip(rows, history), start=1):
                mine = {ids[i]: "token" if v == TOKEN else "END" for i, v in enumerate(row[:n]) if v != NONE}
                mine_waiting = [ids[i] for i in row[n:2 * n] if i >= 0]
                prev = f" (iteration {it - 1}: batch {history[it - 2][0]}, waiting {history[it - 2][1]})" if it > 1 else ""
                if mine != produced:
                    return f"{where}, iteration {it}: batch {mine}, expected {produced}{prev}"[:900]
                if mine_waiting != waiting:
                    return f"{where}, iteration {it}: arrived requests waiting {mine_waiting}, expected {waiting}{prev}"[:900]
                if row[2 * n] != used:
                    return f"{where}, iteration {it}: the running requests hold {row[2 * n]} blocks, expected {used}{prev}"[:900]
            if len(rows) != len(history):
                return f"{where}: all requests finished after {len(history)} iterations; yours " + (
                    f"after {len(rows)}" if len(rows) < len(history) else "were still running")
        return None
    return judge


SPEC = Spec(
    hide=[], calls=_calls,
    forbid=("kit:scheduler.py", "kit:simulator.py", "kit:engine.py", "kit:selective_batching.py", "kit:paged.py"),
    judge={"test_static": _judge("static"), "test_continuous": _judge("continuous"), "test_walkthrough": _judge("walk"),
           "test_preemption": _judge("preempt"), "test_random_traces": _judge("random")})
