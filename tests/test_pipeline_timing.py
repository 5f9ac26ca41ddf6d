"""run_pipeline measures idle time: waiting for a neighbour is not booked as busy time.

Real gloo ranks on the CPU. Stage 0 is made slow on purpose (it sleeps after each forward), so
stage 1 must wait for every activation: the wait is recorded in the receive, stage 1's busy time
stays that of its own compute, and the measured bubble is at least the formula's minimum
(p - 1) / (m + p - 1), which assumes equal stages and free communication.
"""
import pytest

from llmsys_lab.parallel import launch
from llmsys_lab.parallel.pipeline import Event, bubble_fraction, gpipe_bubble, run_pipeline, simulate
from llmsys_lab.validate import ConfigError

DELAY = 0.05          # seconds stage 0 sleeps after each forward
M = 4


@pytest.fixture(scope="module")
def timed():
    from llmsys_lab.parallel.pipeline import time_pipeline

    even = launch(time_pipeline, 2, kwargs={"micro_batches": M}, timeout=300)
    slow = launch(time_pipeline, 2, kwargs={"micro_batches": M, "slow_stage": 0, "extra_forward_s": DELAY},
                  timeout=300)
    return even, slow


def events_of(results, kind):
    return [Event(*e) for rank in results for e in rank[kind]]


def test_wait_for_a_slow_neighbour_is_recorded_as_wait_not_busy(timed):
    _, slow = timed
    for kind in ("gpipe", "1f1b"):
        ev = events_of(slow, kind)
        f0 = [e for e in ev if e.stage == 0 and e.kind == "F"]
        f1 = [e for e in ev if e.stage == 1 and e.kind == "F"]
        # stage 0's forwards include the sleep: busy
        assert all(e.end - e.start >= DELAY for e in f0), kind
        assert all(e.wait == 0.0 for e in f0), kind              # stage 0 receives no activation
        # stage 1's first forward waited for stage 0's first (slept) forward, and its busy time is its own compute
        first = min(f1, key=lambda e: e.start)
        assert first.wait >= DELAY * 0.9, (kind, first)
        assert all(e.end - e.start < DELAY for e in f1), (kind, f1)
        # every operation begins after the previous one of its stage ended (busy intervals do not overlap)
        for s in (0, 1):
            mine = sorted((e for e in ev if e.stage == s), key=lambda e: e.start)
            for a, b in zip(mine, mine[1:]):
                assert b.start - b.wait >= a.end - 1e-6, (kind, a, b)


def test_measured_bubble_is_at_least_the_formula(timed):
    formula = gpipe_bubble(2, M)
    for results in timed:
        for kind in ("gpipe", "1f1b"):
            ev = events_of(results, kind)
            measured = bubble_fraction(ev, 2)
            assert formula <= measured < 1, (kind, measured, formula)
            # the idle time is accounted for: the waits are part of the gap between busy intervals
            assert sum(e.wait for e in ev) > 0, kind
    # a stage that takes longer than its neighbour makes the bubble larger still
    even, slow = timed
    assert bubble_fraction(events_of(slow, "gpipe"), 2) > formula + 0.1


def test_simulated_events_have_no_wait_and_match_the_formula():
    ev = simulate("1f1b", 4, 8)
    assert all(e.wait == 0.0 for e in ev)
    assert abs(bubble_fraction(ev, 4) - gpipe_bubble(4, 8)) < 1e-12


def test_run_pipeline_refuses_a_bad_extra_forward_time():
    for bad in (-1, float("nan"), True, "0.1"):
        with pytest.raises(ConfigError, match="extra_forward_s"):
            run_pipeline(None, None, 1, extra_forward_s=bad)   # checked before anything else
