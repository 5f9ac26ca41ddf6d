"""Pipeline schedules, their simulated bubble, the schedule widget and the estimators (no processes)."""
import pytest

from llmsys_lab.parallel.data_parallel import tiny_config
from llmsys_lab.parallel.estimate import ParallelPlan, estimate_parallel, stage_params, strategy_table
from llmsys_lab.parallel.pipeline import (bubble_fraction, gpipe_bubble, peak_in_flight, schedule, simulate)
from llmsys_lab.parallel.zero import zero_memory, zero_table
from llmsys_lab.estimators import param_count
from llmsys_lab.presets import get_preset
from llmsys_lab.validate import ConfigError
from llmsys_lab.viz.pipeline_view import PipelineView


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(1, 3), (2, 1), (2, 4), (3, 5), (4, 4), (4, 8), (8, 32)])
def test_simulated_bubble_is_p_minus_1_over_m_plus_p_minus_1(kind, p, m):
    events = simulate(kind, p, m, t_f=1, t_b=2)
    assert len(events) == 2 * p * m
    assert bubble_fraction(events, p) == pytest.approx(gpipe_bubble(p, m), abs=1e-12)
    # every stage runs each micro-batch's forward before its backward, once each
    for ops in schedule(kind, p, m):
        assert sorted((o.kind, o.mb) for o in ops) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])


def test_1f1b_holds_at_most_p_micro_batches_gpipe_holds_all():
    assert peak_in_flight("gpipe", 4, 8) == [8, 8, 8, 8]
    assert peak_in_flight("1f1b", 4, 8) == [4, 3, 2, 1]
    assert peak_in_flight("1f1b", 4, 2) == [2, 2, 2, 1]


def test_schedule_rejects_bad_input():
    with pytest.raises(ConfigError, match="schedule must be one of gpipe, 1f1b"):
        schedule("zigzag", 2, 2)
    with pytest.raises(ConfigError, match="stages must be an int >= 1, got 0"):
        schedule("gpipe", 0, 2)


def test_pipeline_view_text_and_controls():
    v = PipelineView(stages=2, micro_batches=2, schedule="gpipe")
    assert v.text().splitlines()[:3] == [
        "GPipe, 2 stages, 2 micro-batches: time 9 of 9 (forward 1, backward 2 time units)",
        "stage 0 | F0 F1 .. .. .. B0 B0 B1 B1",
        "stage 1 | .. F0 F1 B0 B0 B1 B1 .. ..",
    ]
    assert "bubble fraction 0.333; (p - 1) / (m + p - 1) = 0.333" in v.text()
    box = v.widget()
    kind, mbs, time = v._controls
    kind.value = "1f1b"
    assert v.text().startswith("1F1B, 2 stages, 2 micro-batches")
    mbs.value = 4
    assert "4 micro-batches: time 15 of 15" in v.text() and time.max == 15
    time.value = 3
    assert v.text().splitlines()[1] == "stage 0 | F0 F1 .."
    assert "llmsys-pipeline-view" in box._dom_classes
    assert v.png()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="time must be in 0..15"):
        v.set(time=16)


def test_zero_memory_per_stage():
    n = param_count(get_preset("llama-2-7b"))
    rows = zero_table(get_preset("llama-2-7b"), 8)
    assert [r.total / n for r in rows] == pytest.approx([16, 4 + 12 / 8, 2 + 14 / 8, 16 / 8])
    assert zero_memory(100, 1, 4, "fp32").as_dict() == {"stage": 1, "weights": 400, "gradients": 400,
                                                        "optimizer": 200, "total": 1000}
    with pytest.raises(ConfigError, match="ZeRO stage must be 0, 1, 2 or 3"):
        zero_memory(100, 4, 2)


def test_estimates_for_llama_2_7b_on_8_gpus():
    cfg = get_preset("llama-2-7b")
    dp = estimate_parallel(cfg, 64, 4096, ParallelPlan(dp=8, micro_batches=8))
    zero3 = estimate_parallel(cfg, 64, 4096, ParallelPlan(dp=8, zero=3, micro_batches=8))
    tp = estimate_parallel(cfg, 64, 4096, ParallelPlan(tp=8, micro_batches=64))
    assert dp.params_per_device == param_count(cfg)
    assert zero3.weights == pytest.approx(dp.weights / 8) and zero3.dp_bytes == pytest.approx(1.5 * dp.dp_bytes)
    assert tp.params_per_device < param_count(cfg) / 7 and tp.dp_bytes == 0 and tp.tp_bytes > 0
    assert dp.dp_bytes == pytest.approx(2 * 7 / 8 * 2 * param_count(cfg))
    table = strategy_table(cfg, 64, 4096, [ParallelPlan(dp=8), ParallelPlan(tp=2, pp=2, dp=2, micro_batches=4)])
    assert "tp2 pp2 dp2 zero0 m4" in table


def test_estimates_reject_plans_that_do_not_fit_the_model():
    cfg = get_preset("llama-2-7b")
    with pytest.raises(ConfigError, match="tp = 3 must divide the 32 query heads"):
        estimate_parallel(cfg, 8, 128, ParallelPlan(tp=3))
    with pytest.raises(ConfigError, match="pp = 5 must divide the 32 layers"):
        estimate_parallel(cfg, 8, 128, ParallelPlan(pp=5))
    with pytest.raises(ConfigError, match="global batch 6 must split into dp = 4"):
        estimate_parallel(cfg, 6, 128, ParallelPlan(dp=4))


def test_stage_parameters_add_up_to_the_model():
    cfg = tiny_config()
    assert stage_params(cfg, 1, 1, 0) == param_count(cfg)
    assert stage_params(cfg, 1, 2, 0) + stage_params(cfg, 1, 2, 1) == param_count(cfg)
