"""Assignment 05 (continuous batching) graded by the trusted harness: the Batcher runs to completion on workloads
drawn per submission (the lecture's shapes with fresh lengths, pools that preempt, requests handed over in
adversarial orders) and is compared iteration by iteration, outside the sandbox, with the harness's own simulation
of the stated rules; the kit's scheduler and simulator are refused while the probe calls the answer."""
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
import torch

from llmsys_lab.grading import harness
from llmsys_lab.grading.judges.a05 import simulate
from harness_cases import grade_variants, variant
from test_grading_sandbox import needs_sandbox

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "solutions" / "05_continuous_batching" / "continuous_batching.ipynb"
STUB = ROOT / "assignments" / "05_continuous_batching" / "continuous_batching.ipynb"

ALTERNATIVE = (   # admission and release in helpers; the token counted first, then stored
    "class Batcher:\n"
    "    def __init__(self, requests, policy='continuous', max_batch=4, num_blocks=1024, block_size=16):\n"
    "        self.policy, self.max_batch, self.block_size = policy, max_batch, block_size\n"
    "        self.free_blocks = num_blocks\n"
    "        self.waiting = deque(sorted(requests, key=lambda r: r.arrival))\n"
    "        self.running = []\n"
    "        self.finished = []\n"
    "    def blocks_for(self, num_tokens):\n"
    "        return -(-num_tokens // self.block_size)\n"
    "    def _admit(self, now):\n"
    "        new = []\n"
    "        if self.policy == 'static' and self.running:\n"
    "            return new\n"
    "        while len(self.running) < self.max_batch and self.waiting:\n"
    "            head = self.waiting[0]\n"
    "            if head.arrival > now or self.blocks_for(head.tokens) > self.free_blocks:\n"
    "                break\n"
    "            self.waiting.popleft()\n"
    "            head.blocks = self.blocks_for(head.tokens)\n"
    "            self.free_blocks -= head.blocks\n"
    "            self.running.append(head)\n"
    "            new.append(head)\n"
    "        return new\n"
    "    def _release(self, r):\n"
    "        self.free_blocks += r.blocks\n"
    "        r.blocks = 0\n"
    "        self.running.remove(r)\n"
    "    def step(self, now):\n"
    "        old = self.running[:]\n"
    "        out = {}\n"
    "        for r in self._admit(now) + old:\n"
    "            if r not in self.running:\n"
    "                continue\n"
    "            r.generated += 1\n"
    "            if r.generated == r.output_len:\n"
    "                out[r.id] = 'END'\n"
    "                self._release(r)\n"
    "                self.finished.append(r)\n"
    "                continue\n"
    "            out[r.id] = 'token'\n"
    "            if r.tokens > r.blocks * self.block_size:\n"
    "                if self.free_blocks == 0:\n"
    "                    victim = self.running[-1]\n"
    "                    self._release(victim)\n"
    "                    self.waiting.appendleft(victim)\n"
    "                    out.pop(victim.id, None)\n"
    "                    if victim is r:\n"
    "                        continue\n"
    "                self.free_blocks -= 1\n"
    "                r.blocks += 1\n"
    "        return out\n")
KIT_SIMULATOR = (   # the kit's simulator computes the timeline; step replays it
    "from llmsys_lab.simulator import SimRequest as _SR, simulate as _sim\n"
    "class Batcher:\n"
    "    def __init__(self, requests, policy='continuous', max_batch=4, num_blocks=1024, block_size=16):\n"
    "        self.reqs = {r.id: r for r in requests}\n"
    "        sim = _sim([_SR(r.id, r.prompt_len, r.output_len, r.arrival) for r in requests], policy,\n"
    "                   max_batch=max_batch, num_blocks=num_blocks, block_size=block_size)\n"
    "        self.timeline = list(zip(sim.timeline, sim.waiting, sim.kv_reserved))\n"
    "        self.block_size = block_size\n"
    "        self.waiting, self.running, self.finished = deque(requests), [], []\n"
    "    def step(self, now):\n"
    "        cells, waiting, reserved = self.timeline[now - 1]\n"
    "        produced = {rid: what for rid, what in cells.values()}\n"
    "        done = now >= len(self.timeline)\n"
    "        self.waiting = deque() if done else deque(self.reqs[i] for i in waiting)\n"
    "        self.running = [] if done else [self.reqs[i] for i, w in produced.items() if w == 'token']\n"
    "        for r in self.running:\n"
    "            r.blocks = 0\n"
    "        if self.running:\n"
    "            self.running[0].blocks = reserved // self.block_size\n"
    "        return produced\n")


def _variant(base, answer=None, forge=False):
    return variant(base, None if answer is None else {"batcher": answer}, forge)


CASES = {   # name -> (notebook, score it deserves)
    "solution": (lambda: _variant(SOLUTION), 10),
    "stub": (lambda: _variant(STUB), 0),
    "forged": (lambda: _variant(STUB, forge=True), 0),
    "borrowed": (lambda: _variant(SOLUTION, KIT_SIMULATOR, forge=True), 0),
    "alternative": (lambda: _variant(SOLUTION, ALTERNATIVE), 10),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness05")
    return grade_variants(folder, {name: make() for name, (make, _) in CASES.items()})


@needs_sandbox
@pytest.mark.parametrize("name", list(CASES))
def test_assignment_05_scores_what_each_submission_deserves(graded, name):
    sub = graded[name]
    detail = [(t.test, t.points, t.feedback) for t in sub.tests]
    assert sub.error is None, sub.error
    assert (sub.score, sub.max_score) == (CASES[name][1], 10), detail
    if name in ("forged", "borrowed"):      # every in-kernel verdict was forged: the harness took the points
        assert all(t.feedback.startswith("the grader's own check of your outputs failed") for t in sub.tests), detail
    if name == "borrowed":
        assert all("of llmsys_lab/simulator.py" in t.feedback for t in sub.tests), detail


# ---- the harness's simulation and judge, without notebooks ----------------------------------------------
def test_the_harness_simulation_agrees_with_the_kit_simulator_on_every_drawn_workload():
    """The harness's model of the rules is written independently of the kit; on the workloads it draws (three
    seeds) it gives the kit simulator's timeline, waiting queue and blocks in use, iteration by iteration."""
    from llmsys_lab.simulator import SimRequest
    from llmsys_lab.simulator import simulate as kit_simulate

    spec = harness.SPECS["05_continuous_batching"]
    for seed in range(3):
        calls, _ = spec.calls(torch.Generator().manual_seed(seed))
        assert {c.id.split("/")[0] for c in calls} == {"static", "continuous", "walk", "preempt", "random"}
        assert sum(c.id.startswith("preempt/") for c in calls) >= 10
        for call in calls:
            reqs, kwargs, _ = call.args
            sim = kit_simulate([SimRequest(*r) for r in reqs], kwargs.get("policy", "continuous"),
                               **{k: v for k, v in kwargs.items() if k != "policy"})
            bs = kwargs.get("block_size", 16)
            kit = [(dict(c.values()), w, r // bs) for c, w, r in zip(sim.timeline, sim.waiting, sim.kv_reserved)]
            mine, preempted = simulate(reqs, **kwargs)
            assert [(dict(a), b, c) for a, b, c in mine] == kit, call.id
            if call.id.startswith("preempt/"):
                assert preempted > 0, call.id


@dataclass
class _Req:
    id: str
    prompt_len: int
    output_len: int
    arrival: int = 1
    generated: int = 0
    blocks: int = 0

    @property
    def tokens(self):
        return self.prompt_len + self.generated


def _verdicts(answer, seed=0):
    from collections import deque

    from llmsys_lab.grading.drivers.a05 import drive_batcher

    ns = {"deque": deque, "Req": _Req}
    exec(answer, ns)
    spec = harness.SPECS["05_continuous_batching"]
    calls, tensors = spec.calls(torch.Generator().manual_seed(seed))
    outputs, errors = {}, {}
    for call in calls:
        try:
            outputs[call.id] = drive_batcher(ns["Batcher"], "Batcher", ns)(*call.args)
        except Exception as err:  # noqa: BLE001
            errors[call.id] = [type(err).__name__, str(err)]
    return {tid: judge({**tensors, "__calls__": calls}, outputs, errors) for tid, judge in spec.judge.items()}


def test_the_judges_accept_a_correct_batcher_and_catch_each_broken_rule():
    assert all(v is None for v in _verdicts(ALTERNATIVE).values()), _verdicts(ALTERNATIVE)
    bugs = {   # one rule broken each; the test that must notice it
        "the requester preempted": (("victim = self.running[-1]", "victim = r"), "test_preemption"),
        "no FCFS blocking": (("        while len(self.running) < self.max_batch and self.waiting:\n"
                              "            head = self.waiting[0]\n"
                              "            if head.arrival > now or self.blocks_for(head.tokens) > self.free_blocks:\n"
                              "                break\n"
                              "            self.waiting.popleft()\n",
                              "        for head in list(self.waiting):\n"
                              "            if len(self.running) >= self.max_batch:\n"
                              "                break\n"
                              "            if head.arrival > now or self.blocks_for(head.tokens) > self.free_blocks:\n"
                              "                continue\n"
                              "            self.waiting.remove(head)\n"), "test_random_traces"),
        "the list order, not arrival": (("deque(sorted(requests, key=lambda r: r.arrival))", "deque(requests)"),
                                        "test_random_traces"),
        "preempted to the back": (("self.waiting.appendleft(victim)", "self.waiting.append(victim)"),
                                  "test_preemption"),
        "static admits at any time": (("if self.policy == 'static' and self.running:", "if False:"), "test_static"),
    }
    for name, ((old, new), test) in bugs.items():
        assert old in ALTERNATIVE, name
        verdicts = _verdicts(ALTERNATIVE.replace(old, new))
        assert verdicts[test] is not None, (name, verdicts)


def test_every_graded_test_of_assignment_05_has_a_judge():
    nb = nbformat.read(next((ROOT / "solutions" / "05_continuous_batching").glob("*.ipynb")), as_version=4)
    graded_ids = {c.metadata["nbgrader"]["grade_id"] for c in nb.cells
                  if c.metadata.get("nbgrader", {}).get("grade") and c.metadata["nbgrader"].get("points")}
    assert graded_ids and graded_ids == set(harness.SPECS["05_continuous_batching"].judge)
