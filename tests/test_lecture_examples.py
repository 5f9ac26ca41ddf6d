"""Every worked example of the lectures (llmsys_lab.lecture), reproduced by the kit's own code."""
from llmsys_lab import lecture


def test_examples_have_sources():
    for ex in lecture.EXAMPLES.values():
        assert ex.source and ex.slide, ex.name


# ---- serving: KV cache, continuous batching, PagedAttention, goodput, Orca ----
import pytest

from llmsys_lab.metrics import summarize
from llmsys_lab.paged import BlockManager
from llmsys_lab.simulator import CostModel, SimRequest, disaggregated_goodput, simulate
from llmsys_lab.viz.block_view import SINGLE_REQUEST_ORDER, TWO_REQUEST_ORDER


def _table(m: BlockManager, seq) -> list[tuple[int, int]]:
    t = m.table(seq)
    return list(zip(t.blocks, t.filled))


def test_paged_single_request_slide():
    ex = lecture.get("paged_single_request")
    d = ex.data
    assert SINGLE_REQUEST_ORDER[:3] == d["allocation_order"]
    m = BlockManager(d["num_blocks"], d["block_size"], order=SINGLE_REQUEST_ORDER)
    words = d["prompt"].split()
    m.add("A", list(range(len(words))))
    assert _table(m, "A") == d["steps"]["prompt"]
    for word in d["completion"].split():
        m.append("A", len(words))
        words.append(word)
        assert _table(m, "A") == d["steps"][word], word
    assert _table(m, "A") == [(7, 4), (1, 4), (5, 1)]             # "renowned" in physical block 5


def test_paged_two_request_figure():
    d = lecture.get("paged_two_requests").data
    assert TWO_REQUEST_ORDER[:5] == d["allocation_order"]
    m = BlockManager(d["num_blocks"], d["block_size"], order=TWO_REQUEST_ORDER)
    a = "Alan Turing is a computer scientist and mathematician renowned".split()
    b = "Artificial Intelligence is the future of technology".split()
    m.add("A", list(range(6)))
    for i in range(6, len(a)):
        m.append("A", i)
    m.add("B", list(range(len(b))))
    assert _table(m, "A") == d["A"] and _table(m, "B") == d["B"]
    words = {"A": a, "B": b}
    physical = {blk: " ".join(words[s][i * 4:i * 4 + n]) for s in "AB" for i, (blk, n) in enumerate(_table(m, s))}
    assert physical == d["physical"]
    assert list(physical) != sorted(physical) and sorted(physical) == [1, 2, 3, 5, 7]


def _requests_002():
    static = lecture.get("static_batching_T1_T8").data["lengths"]
    later = lecture.get("continuous_batching_T1_T8").data
    return ([SimRequest(rid, 4, n) for rid, n in static.items()]
            + [SimRequest(rid, 3, later["lengths"][rid], arrival=t) for rid, t in later["arrivals"].items()])


def _rows(table: str) -> dict[str, str]:
    """The simulator's grid as {first request in the row: cells, '.' for idle}."""
    out = {}
    for line in table.splitlines()[1:]:
        cells = [line[7 + 5 * i: 12 + 5 * i].strip() or "." for i in range(8)]
        out[cells[0]] = " ".join(cells)
    return out


def test_static_batching_table_of_lecture_002():
    sim = simulate(_requests_002()[:4], "static", max_batch=4)
    assert _rows(sim.table(1, 8)) == lecture.get("static_batching_T1_T8").data["rows"]


def test_continuous_batching_table_of_lecture_002():
    reqs = _requests_002()
    assert _rows(simulate(reqs, "continuous", max_batch=4).table(1, 8)) == \
        lecture.get("continuous_batching_T1_T8").data["rows"]
    static = simulate(reqs, "static", max_batch=4)
    assert all(("S5", "token") not in cell.values() for cell in static.timeline[:8])     # static: S5 waits past T8


def test_orca_walkthrough_R1_R5():
    d = lecture.get("orca_walkthrough_R1_R5").data
    walk = [SimRequest("R1", 3, 6), SimRequest("R2", 3, 2), SimRequest("R3", 2, 4, arrival=2),
            SimRequest("R4", 2, 3, arrival=3), SimRequest("R5", 2, 3, arrival=3)]
    sim = simulate(walk, "continuous", max_batch=d["max_batch"])
    for it, batch in d["batches"].items():
        assert sorted(rid for rid, _ in sim.timeline[it - 1].values()) == batch
    assert sim.timeline[1][1] == ("R2", "END")                     # R2 completes in iteration 2
    assert sim.waiting[2] == d["waiting_after_3"]


def test_goodput_slide_example_from_metrics():
    """10 requests finish in one second; only the first batch of 3 meets a 200 ms TTFT SLO."""
    d = lecture.get("goodput_vs_throughput").data
    reqs = [SimRequest(f"q{i}", 4, 5) for i in range(10)]
    # batches of 3, 3, 3, 1 requests x 5 iterations = 20 iterations of 50 ms: one second
    sim = simulate(reqs, "static", max_batch=3, cost=CostModel(base=0.05, per_prefill_token=0, per_decode_seq=0,
                                                               per_kv_token=0))
    s = summarize(list(sim.requests.values()), sim.iteration_end[-1], slo_ttft=0.2)
    assert s["requests"] / s["duration"] == pytest.approx(d["throughput_rps"])
    assert s["goodput"] == pytest.approx(d["goodput_rps"]) and s["slo_attainment"] == pytest.approx(0.3)


def test_disaggregation_goodput():
    d = lecture.get("disaggregation_goodput").data
    two_p_one_d = disaggregated_goodput(d["prefill_rps_per_gpu"], d["decode_rps_per_gpu"], 2, 1)
    assert round(two_p_one_d, 1) == d["2P1D_rps_per_gpu"]
    assert round(two_p_one_d / d["colocated_rps_per_gpu"]) == d["gain"]
    # without interference a colocated GPU would do better than the slide's measured 1.6 rps
    shared = 1 / (1 / d["prefill_rps_per_gpu"] + 1 / d["decode_rps_per_gpu"])
    assert d["colocated_rps_per_gpu"] < shared < d["prefill_rps_per_gpu"]


def test_orca_selective_batching_with_the_engine():
    from llmsys_lab.engine import Engine
    from llmsys_lab.model import load_tiny
    from llmsys_lab.selective_batching import trace_step

    d = lecture.get("orca_selective_batching").data
    model, _ = load_tiny()
    engine = Engine(model, num_blocks=32, block_size=4, max_batch=4, eos_token_id=None)
    reqs = {"x1": engine.add_request("x1", [11, 12, 13], 4), "x2": engine.add_request("x2", [21, 22], 4)}
    engine.step()                                              # x1, x2 prefilled: from now on they decode
    reqs["x3"] = engine.add_request("x3", [31, 32], 4)
    reqs["x4"] = engine.add_request("x4", [41, 42, 43], 4)
    packed = trace_step(engine)
    assert packed.shape == (d["packed_rows"], model.config.hidden_size)
    assert {rid: len(rows) for rid, rows in packed.rows.items()} == d["lengths"]
    covered = sorted(i for rows in packed.rows.values() for i in rows)
    assert covered == list(range(d["packed_rows"]))            # every row belongs to exactly one request
    for rid, rows in packed.rows.items():                      # the rows hold that request's tokens
        r = reqs[rid]
        expect = r.prompt if packed.kinds[rid] == "prefill" else [r.output[-2]]
        assert packed.token_ids[rows.start:rows.stop] == expect, rid



# ---- estimators: parameters, FLOPs, training memory, Chinchilla ----


# ---- compute: attention, FLOPs, memory, scaling laws, FlashAttention, latency ----
