"""Scheduler, simulator and engine: the lecture's timelines and real requests served exactly."""
import random

import pytest
import torch

from llmsys_lab.engine import Engine, serve
from llmsys_lab.generate import generate
from llmsys_lab.metrics import percentile, summarize
from llmsys_lab.paged import BlockManager
from llmsys_lab.scheduler import Request, RequestError, Scheduler
from llmsys_lab.simulator import LECTURE_REQUESTS, SimRequest, simulate

# Lecture 002's tables (tests/test_lecture_examples.py checks them cell by cell against llmsys_lab.lecture)
STATIC = """      T1   T2   T3   T4   T5   T6   T7   T8
slot 1 S1   S1   S1   S1   S1   END
slot 2 S2   S2   S2   S2   S2   S2   S2   END
slot 3 S3   S3   S3   S3   END
slot 4 S4   S4   S4   S4   S4   S4   END"""
CONTINUOUS = """      T1   T2   T3   T4   T5   T6   T7   T8
slot 1 S1   S1   S1   S1   S1   END  S6   S6
slot 2 S2   S2   S2   S2   S2   S2   S2   END
slot 3 S3   S3   S3   S3   END  S5   S5   S5
slot 4 S4   S4   S4   S4   S4   S4   END  S7"""


def test_lecture_tables():
    assert simulate(LECTURE_REQUESTS[:4], "static", max_batch=4).table(1, 8) == STATIC
    assert simulate(LECTURE_REQUESTS, "continuous", max_batch=4).table(1, 8) == CONTINUOUS
    static = simulate(LECTURE_REQUESTS, "static", max_batch=4)
    assert static.requests["S5"].first_token_at > static.requests["S1"].finished_at   # waits for the batch


def test_r1_to_r5_walkthrough_with_max_batch_3():
    reqs = [SimRequest("R1", 3, 6), SimRequest("R2", 3, 2), SimRequest("R3", 2, 4, arrival=2),
            SimRequest("R4", 2, 3, arrival=3), SimRequest("R5", 2, 3, arrival=3)]
    sim = simulate(reqs, "continuous", max_batch=3)
    running = [sorted(rid for rid, _ in it.values()) for it in sim.timeline]
    assert running[0] == ["R1", "R2"]                    # iteration 1: R1 and R2
    assert running[1] == ["R1", "R2", "R3"]              # iteration 2: R3 joins, R2 ends
    assert ("R2", "END") in sim.timeline[1].values()
    assert running[2] == ["R1", "R3", "R4"]              # iteration 3: R4 takes R2's slot, R5 waits
    assert sim.requests["R5"].admitted_at > 3


def test_continuous_batching_beats_static_on_a_mixed_workload():
    rng = random.Random(0)
    reqs = [SimRequest(f"q{i}", rng.randint(10, 200), rng.randint(2, 300)) for i in range(64)]
    static = simulate(reqs, "static", max_batch=16)
    cont = simulate(reqs, "continuous", max_batch=16)
    assert len(cont.timeline) < 0.8 * len(static.timeline)
    assert cont.iteration_end[-1] < static.iteration_end[-1]


def test_preemption_when_blocks_run_out_in_the_simulator():
    reqs = [SimRequest(f"q{i}", 8, 40) for i in range(4)]
    sim = simulate(reqs, "continuous", max_batch=4, block_size=4, num_blocks=20)
    assert sum(r.preemptions for r in sim.requests.values()) > 0
    assert all(r.finished and len(r.output) == 40 for r in sim.requests.values())


@pytest.mark.parametrize("req,msg", [
    (Request("a", list(range(500)), 20), "needs up to 520 tokens, more than the model's context of 512"),
    (Request("b", [1] * 30, 40), "can never fit: up to 70 tokens need 18 blocks, the whole KV pool has 16"),
    (Request("c", [1, 2], 0), "max_new_tokens must be a positive int, got 0"),
    (Request("d", [1, 2], -3), "max_new_tokens must be a positive int, got -3"),
    (Request("e", [], 3), "empty prompt"),
    (Request("f", [1] * 40, 3), "exceeds the per-iteration token budget of 32"),
])
def test_bad_requests_are_rejected_with_a_reason(req, msg):
    sched = Scheduler(BlockManager(16, 4), max_context=512, token_budget=32)
    with pytest.raises(RequestError, match=msg):
        sched.add(req)
    assert not sched.waiting


def test_duplicate_ids_are_rejected():
    sched = Scheduler(BlockManager(16, 4))
    sched.add(Request("x", [1], 2))
    with pytest.raises(RequestError, match="duplicate request id 'x'"):
        sched.add(Request("x", [2], 2))


# ---- the engine on the real model --------------------------------------------------------------

# `tiny` (the bundled model), `tiny_prompts` (of TINY_TEXTS) and `greedy` (memoised references): tests/conftest.py
TEXTS = ["ROMEO.\n", "To be, or not", "KING.\nMy lords, I pray you", "HAMLET.\nWhat", "JULIET.\nO Romeo",
         "FIRST CITIZEN.\nWe are", "PORTIA.\nThe quality of mercy"]


@pytest.fixture(scope="module")
def reference(tiny, tiny_prompts, greedy):
    assert [tiny[1](t).input_ids for t in TEXTS] == tiny_prompts
    return tiny_prompts, [greedy(tiny[0], p, 40) for p in tiny_prompts]


@pytest.mark.parametrize("kw", [
    dict(policy="continuous", max_batch=3, num_blocks=200),
    dict(policy="static", max_batch=3, num_blocks=200),
    dict(policy="continuous", max_batch=7, num_blocks=14),                       # preemption
    dict(policy="continuous", max_batch=7, num_blocks=200, token_budget=8, chunked_prefill=True),
])
def test_engine_outputs_equal_generation_alone(tiny, reference, kw):
    model, _ = tiny
    prompts, ref = reference
    engine, done = serve(model, prompts, 40, block_size=4, **kw)
    assert [done[i].output for i in range(len(prompts))] == ref
    assert engine.blocks.num_free == engine.blocks.num_blocks
    if kw["num_blocks"] == 14:
        assert sum(r.preemptions for r in done.values()) > 0


def test_engine_matches_transformers_generate(tiny, reference):
    from transformers import AutoModelForCausalLM

    from llmsys_lab.model import TINY_MODEL_PATH

    model, _ = tiny
    prompts, _ = reference
    hf = AutoModelForCausalLM.from_pretrained(TINY_MODEL_PATH, dtype=torch.float32).eval()
    _, done = serve(model, prompts[::-1], 30, num_blocks=100, block_size=8, max_batch=4)
    for i, p in enumerate(prompts[::-1]):
        out = hf.generate(input_ids=torch.tensor([p]), max_new_tokens=30, pad_token_id=0, eos_token_id=0)
        assert done[i].output == out[0, len(p):].tolist()


def test_random_arrivals_every_request_completes_exactly_once(tiny, reference):
    model, _ = tiny
    prompts, ref = reference
    rng = random.Random(1)
    engine = Engine(model, num_blocks=40, block_size=4, max_batch=5)
    expected = {}
    for i in range(30):
        k, n = rng.randrange(len(prompts)), rng.randint(1, 40)
        engine.add_request(f"r{i}", prompts[k], n, arrival_step=rng.randint(0, 60))
        expected[f"r{i}"] = ref[k][:n]
    seen = [r.id for r in engine.run()]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    for r in engine.scheduler.finished:
        assert r.output == expected[r.id], r.id


def test_metrics(tiny, reference):
    model, _ = tiny
    prompts, _ = reference
    engine, done = serve(model, prompts, 20, num_blocks=100, block_size=4, max_batch=4)
    s = summarize(list(done.values()), engine.log[-1]["seconds"], slo_ttft=10.0, slo_tpot=10.0)
    assert s["requests"] == len(prompts) and s["output_tokens"] == sum(len(r.output) for r in done.values())
    assert s["ttft"]["p50"] <= s["e2e"]["p50"] and s["slo_attainment"] == 1.0
    assert percentile([1, 2, 3, 4], 50) == 2.5


def test_timeline_view_widget_and_text():
    from llmsys_lab.viz.timeline_view import TimelineView

    view = TimelineView(LECTURE_REQUESTS, max_batch=4, iteration=8)
    assert view.text().splitlines()[1:6] == CONTINUOUS.splitlines()
    assert "running: S2, S5, S6, S7" in view.text()
    box = view.widget()
    (policy, slider), image, table = box.children[0].children, box.children[1], box.children[2]
    png = image.value
    policy.value = "static"
    assert "static batching" in table.value and image.value != png and slider.max == 12
    slider.value = 3
    assert "iteration 3 of 12" in table.value
    with pytest.raises(ValueError, match="iteration must be in 1..12, got 0"):
        view.set_iteration(0)
    assert view._repr_mimebundle_()["text/plain"] == view.text()


def test_disaggregation_arithmetic():
    from llmsys_lab.simulator import disaggregated_goodput

    assert disaggregated_goodput(5.6, 10, 2, 1) == pytest.approx(10 / 3)


@pytest.mark.interpreter
def test_engine_decode_through_the_triton_kernel(device):
    """The GPU path (decode rows read K/V with llmsys_lab/kernels/paged_attention.py): compiled on a GPU, through
    the interpreter on a CPU. Compared with generation on the same device."""
    from llmsys_lab.model import LlamaLM, load_tiny

    _, tok = load_tiny()
    model = LlamaLM.from_pretrained(device=device)
    prompts = [tok(t).input_ids for t in TEXTS[:3]]
    ref = [generate(model, [p], 12).new_tokens[0] for p in prompts]
    _, done = serve(model, prompts, 12, num_blocks=60, block_size=16, max_batch=3, use_kernel=True)
    assert [done[i].output for i in range(3)] == ref


def test_request_token_slice_matches_the_full_token_list():
    r = Request("t", [5, 6, 7], 10)
    r.output = [8, 9]
    for start in range(6):
        for stop in range(start, 6):
            assert r.token_slice(start, stop) == r.tokens[start:stop]
    assert r.num_tokens == 5 and r.to_prefill == 5
    assert r != Request("t", [5, 6, 7], 10)          # identity, not field equality


# ---- no hang, no silent loss --------------------------------------------------------------------

def test_preempted_request_longer_than_the_token_budget_is_readmitted():
    """Chunked prefill off: r1 is preempted holding 9 + 5 tokens > the budget of 13; it used to block the queue."""
    reqs = [SimRequest("r0", 3, 9), SimRequest("r1", 9, 10)]
    sim = simulate(reqs, "static", max_batch=3, block_size=2, num_blocks=11, token_budget=13, max_iterations=500)
    assert sum(r.preemptions for r in sim.requests.values()) > 0
    assert all(r.finished and len(r.output) == r.max_new_tokens for r in sim.requests.values())


def test_random_small_pool_traces_all_finish():
    rng = random.Random(0)
    for trial in range(300):
        reqs = [SimRequest(f"r{i}", rng.randint(1, 10), rng.randint(1, 12), rng.randint(1, 6))
                for i in range(rng.randint(1, 8))]
        bs = rng.choice([1, 2, 4])
        need = max(-(-(r.prompt_len + r.output_len) // bs) for r in reqs)
        kw = dict(policy=rng.choice(["static", "continuous"]), max_batch=rng.randint(1, 4), block_size=bs,
                  num_blocks=rng.randint(need, need + 4), token_budget=rng.randint(10, 16))
        sim = simulate(reqs, max_iterations=2000, **kw)
        assert all(r.finished for r in sim.requests.values()), (trial, reqs, kw)


def test_watchdog_raises_with_the_scheduler_state():
    from llmsys_lab.scheduler import SchedulerStalled

    blocks = BlockManager(4, 2)
    blocks.add("outside", [1] * 7)                          # the pool is held by someone the scheduler doesn't know
    sched = Scheduler(blocks, max_batch=2, token_budget=16)
    sched.add(Request("r", [1, 2, 3], 2))
    with pytest.raises(SchedulerStalled, match=r"(?s)iteration 1: no request can run.*waiting: r \(3 tokens, arrived at "
                                               r"step 0\).*running: -.*free blocks: 0 of 4"):
        sched.schedule(1)


def test_simulate_raises_when_it_runs_out_of_iterations():
    from llmsys_lab.scheduler import SchedulerStalled

    with pytest.raises(SchedulerStalled, match=r"1 of 1 requests unfinished after 3 iterations: S1"):
        simulate([SimRequest("S1", 4, 10)], max_iterations=3)


def test_scheduler_config_is_validated():
    with pytest.raises(RequestError, match="token_budget = 4 must be >= max_batch = 8"):
        Scheduler(BlockManager(16, 4), max_batch=8, token_budget=4)


def test_time_fields_have_one_unit_and_ttft_starts_at_arrival():
    from llmsys_lab.metrics import request_metrics

    reqs = [SimRequest("a", 4, 30), SimRequest("late", 3, 5, arrival_step=10)]
    sim = simulate(reqs, max_batch=2)
    late = sim.requests["late"]
    assert late.arrival_step == 10 and late.admitted_step == 10
    assert late.arrival_time == pytest.approx(sim.iteration_end[8])         # the start of iteration 10, seconds
    m = request_metrics(late)
    assert m["ttft"] == pytest.approx(sim.iteration_end[9] - sim.iteration_end[8])   # one iteration, not 10
    assert m["e2e"] == pytest.approx(late.finished_time - late.arrival_time)
    assert (late.arrival, late.admitted_at, late.first_token_at, late.finished_at) == (     # the older names
        late.arrival_step, late.admitted_step, late.first_token_time, late.finished_time)
    with pytest.raises(ValueError, match="request 'x' has not finished"):
        request_metrics(Request("x", [1], 2))


def test_engine_time_fields(tiny):
    model, tok = tiny
    engine = Engine(model, num_blocks=40, block_size=4, max_batch=2)
    a = engine.add_request("a", tok("ROMEO.\n").input_ids, 6)
    b = engine.add_request("b", tok("HAMLET.\nWhat").input_ids, 3, arrival_step=4)
    list(engine.run())
    assert (a.arrival_step, a.admitted_step, b.arrival_step, b.admitted_step) == (0, 1, 4, 4)
    assert 0 <= a.arrival_time <= a.first_token_time <= a.finished_time
    assert a.arrival_time < b.arrival_time <= b.first_token_time <= b.finished_time


@pytest.mark.parametrize("limits", [[5, 5], [5, 5, 5, 5]])
def test_serve_refuses_limits_of_another_length(tiny, limits):
    model, tok = tiny
    prompts = [tok(t).input_ids for t in TEXTS[:3]]
    with pytest.raises(ValueError, match=f"3 prompts but {len(limits)} max_new_tokens"):
        serve(model, prompts, limits, num_blocks=40)


def test_engine_does_not_hang_when_the_pool_is_held_elsewhere(tiny):
    from llmsys_lab.scheduler import SchedulerStalled

    model, tok = tiny
    engine = Engine(model, num_blocks=4, block_size=4)
    engine.blocks.add("outside", [1] * 16)
    engine.add_request("a", tok("ROMEO.\n").input_ids, 3)
    with pytest.raises(SchedulerStalled, match="no request can run"):
        list(engine.run())


# ---- one bookkeeping path: the engine and the simulator apply tokens the same way ---------------

# Workloads on the bundled model's prompts (TEXTS), with preemption, self-preemption (the request that
# needs a block is itself the most recently admitted) and chunked prefill on and off:
# (output limits, arrival steps, scheduler settings)
AGREEMENT_WORKLOADS = [
    ([6, 8, 13, 6], [1, 3, 4, 4], dict(num_blocks=11, block_size=2, max_batch=2, policy="continuous", token_budget=16)),
    ([12, 14, 8, 7], [1, 2, 3, 3], dict(num_blocks=13, block_size=2, max_batch=3, policy="continuous",
                                        token_budget=7, chunked_prefill=True)),
    ([12, 12, 6], [2, 2, 2], dict(num_blocks=10, block_size=2, max_batch=3, policy="static", token_budget=10,
                                  chunked_prefill=True)),
    ([10, 9, 13, 10], [1, 1, 2, 3], dict(num_blocks=14, block_size=2, max_batch=2, policy="static", token_budget=16)),
]


@pytest.mark.parametrize("limits,arrivals,kw", AGREEMENT_WORKLOADS)
def test_engine_and_simulator_agree_iteration_by_iteration(tiny, reference, limits, arrivals, kw):
    """Same per-iteration schedule (prefill chunks, decodes, tokens produced, completions, preemptions)
    and the same token counts: both go through Scheduler.postprocess. The engine's requests end at
    EOS or their limit; the simulator is given the lengths they reached."""
    model, _ = tiny
    prompts, ref = reference
    engine = Engine(model, **kw)
    for i, (n, t) in enumerate(zip(limits, arrivals)):
        engine.add_request(f"r{i}", prompts[i], n, arrival_step=t)
    done = {r.id: r for r in engine.run()}
    sim = simulate([SimRequest(f"r{i}", len(prompts[i]), len(done[f"r{i}"].output), t)
                    for i, t in enumerate(arrivals)], **kw)
    # the engine logs the iterations that ran something; the simulator every iteration
    assert {x["iteration"]: x["schedule"] for x in engine.log} == {
        it: x for it, x in enumerate(sim.schedule, start=1) if x["prefill"] or x["decode"]}
    assert engine.iteration == len(sim.schedule)
    for rid, r in done.items():
        s = sim.requests[rid]
        assert (len(r.output), r.preemptions, r.admitted_step) == (len(s.output), s.preemptions, s.admitted_step)
        assert r.output == ref[int(rid[1:])][:len(r.output)]                   # and the tokens are right
    # the scheduler ran through every preempted iteration's victims and the queue is empty
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.scheduler.has_work


@pytest.mark.parametrize("limits,arrivals,kw", AGREEMENT_WORKLOADS)
def test_a_preempted_request_keeps_the_token_of_its_iteration_in_the_simulator(limits, arrivals, kw):
    """The rule (lesson 05, assignment 05): a preempted request keeps every token it generated,
    this iteration's included; nothing is generated twice. Each token is produced once: one
    timestamp per output token, and the iteration that preempts a request that produced a token
    leaves it one token longer than before."""
    lens = [6, 5, 9, 6, 7, 6, 8]                                               # the TEXTS prompts' lengths
    reqs = [SimRequest(f"r{i}", lens[i], n, t) for i, (n, t) in enumerate(zip(limits, arrivals))]
    sim = simulate(reqs, **kw)
    preempted = [rid for x in sim.schedule for rid in x["preempted"]]
    self_preempted = [rid for x in sim.schedule for rid in x["self_preempted"]]
    assert self_preempted and len(preempted) > len(self_preempted), "a check of the workload: both kinds"
    for r in sim.requests.values():
        assert len(r.token_times) == len(r.output) == r.max_new_tokens, r.id
    produced = {}
    for x in sim.schedule:
        for rid in x["produced"]:
            produced[rid] = produced.get(rid, 0) + 1
        for rid in x["self_preempted"]:
            assert rid in x["produced"] and rid in x["preempted"]
    assert produced == {r.id: r.output_len for r in reqs}                      # every token exactly once


def test_a_self_preempted_request_keeps_its_token_in_the_engine(tiny, reference):
    """The engine side of the rule, on a workload with self-preemption: the tokens equal generating
    alone, and each was produced once (one timestamp per token)."""
    model, _ = tiny
    prompts, ref = reference
    limits, arrivals, kw = AGREEMENT_WORKLOADS[0]
    engine = Engine(model, **kw)
    for i, (n, t) in enumerate(zip(limits, arrivals)):
        engine.add_request(f"r{i}", prompts[i], n, arrival_step=t)
    done = {r.id: r for r in engine.run()}
    selfp = [rid for x in engine.log for rid in x["schedule"]["self_preempted"]]
    assert selfp
    for rid in selfp:
        r = done[rid]
        assert r.output == ref[int(rid[1:])][:len(r.output)] and len(r.token_times) == len(r.output)


def test_postprocess_refuses_a_token_list_of_another_length():
    sched = Scheduler(BlockManager(16, 4))
    sched.add(Request("a", [1, 2], 3))
    work = sched.schedule(1)
    with pytest.raises(ValueError, match="2 new tokens for an iteration of 1 rows"):
        sched.postprocess(work, [5, 6], 0.0)
