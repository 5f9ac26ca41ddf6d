"""benchmarks/decode_step.py and benchmarks/decode_profile.py run (``--tiny``, on the CPU) and write
the JSON lesson 07 reads: the same keys as the GPU run, with the graph rungs reported as not available."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def benchmarks_on_path():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    yield
    sys.path.remove(str(ROOT / "benchmarks"))


def test_plain_decode_step_is_the_model():
    """The plain step decoding token by token reproduces the model's forward pass; a wrong K/V slot fails."""
    from llmsys_lab.model import load_tiny
    from llmsys_lab.plain_decode import PlainDecode, check_plain_step

    model, _ = load_tiny()
    assert check_plain_step(model, batch=2, length=6) < 1e-4
    ids = torch.tensor([5, 9, 13])
    want = model(ids[None])[0, -1]
    plain = PlainDecode(model, 1, 6)
    for t in range(3):
        plain.tokens.fill_(int(ids[t]))
        plain.positions.fill_(t)
        got = plain.step()[0]
    assert (got - want).abs().max() < 1e-4
    broken = PlainDecode(model, 1, 6)
    for t in range(3):                              # every token written at slot 0: the K/V history is lost
        broken.tokens.fill_(int(ids[t]))
        broken.positions.fill_(0)
        got = broken.step()[0]
    assert (got - want).abs().max() > 1e-3
    with pytest.raises(ValueError, match="batch must be a positive int, got 0"):
        PlainDecode(model, 0, 6)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        PlainDecode(model, 1, model.config.max_position_embeddings + 1)
    with pytest.raises(ValueError, match=r"context must be in 0..5"):
        PlainDecode(model, 1, 6).fill_random(6)


def test_decode_step_tiny_writes_every_rung(benchmarks_on_path, tmp_path):
    import decode_step as ds

    out = tmp_path / "decode_step.json"
    assert ds.main(["--tiny", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["tiny"] is True and r["copy_bandwidth"] > 0 and r["plain_step_max_abs_err"] < 1e-3
    assert r["rungs"] == list(ds.RUNGS) and r["baseline"] == "plain + CUDA graph"
    assert [(x["batch"], x["context"]) for x in r["rows"]] == [(b, c) for c in ds.TINY_PLAN.contexts
                                                               for b in ds.TINY_PLAN.batches]
    for row in r["rows"]:
        rungs = row["rungs"]
        assert set(rungs) == set(ds.RUNGS)
        for name in ("engine eager", "plain eager", "roofline"):
            assert rungs[name]["ms"] > 0 and rungs[name]["tok_s"] > 0, (name, rungs[name])
        assert "CPU" in rungs["plain + CUDA graph"]["not_available"]
        assert "not_available" in rungs["engine + CUDA graphs"]
        assert rungs["roofline"]["weight_bytes"] > 0 and rungs["roofline"]["kv_bytes"] > 0
        assert rungs["plain eager"]["vs_plain_eager"] == 1.0


def test_decode_profile_tiny_summarises_the_trace(benchmarks_on_path, tmp_path):
    import decode_profile as dp

    out = tmp_path / "decode_profile.json"
    assert dp.main(["--tiny", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    p = r["profiles"]["eager"]
    assert "error" not in p, p
    assert p["iterations"] == 2 and p["cpu_ms"] > 0 and p["gpu_busy_ms"] is None
    ops = {o["name"] for o in p["cpu_ops"]}
    assert "aten::linear" in ops                       # the projections, called from the engine's forward
    t = p["timeline"]
    assert 0 < len(t["cpu"]) <= t["cap"] and t["cpu_total"] >= len(t["cpu"]) and t["gpu"] == []
    assert all(0 <= e["start"] <= e["end"] for e in t["cpu"])


def test_trace_summary_counts_kernels_gaps_and_launches(benchmarks_on_path):
    """summarise() on a hand-made trace: kernels are assigned to their iteration through the launch's
    correlation id, even when they run after the iteration's CPU range ended."""
    import decode_profile as dp

    def ev(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, "args": args}

    trace = {"traceEvents": [
        ev("user_annotation", dp.ANNOTATION, 0, 100), ev("user_annotation", dp.ANNOTATION, 200, 100),
        ev("cpu_op", "aten::linear", 10, 30), ev("cpu_op", "aten::mm", 12, 20),
        ev("cuda_runtime", "cudaLaunchKernel", 15, 5, correlation=1),
        ev("cuda_runtime", "cudaLaunchKernel", 50, 5, correlation=2),
        ev("kernel", "void gemm<float>(int)", 60, 10, correlation=1),
        ev("kernel", "void gemm<float>(int)", 90, 20, correlation=2),          # 20 us gap before it
        ev("cuda_runtime", "cudaGraphLaunch", 210, 5, correlation=3),
        ev("kernel", "rmsnorm_kernel", 220, 10, correlation=3),
    ]}
    s = dp.summarise(trace, 2)
    assert s["launches_per_iteration"] == 1.5                     # 2 kernel launches, then 1 graph launch
    assert s["kernels"][0] == {"name": "gemm", "calls": 1.0, "gpu_us": 15.0}
    first = s["per_iteration"][0]
    assert first["gpu_busy_us"] == 30 and first["gpu_idle_us"] == 20 and first["gaps"] == [20]
    assert s["cpu_ops"][0] == {"name": "aten::linear", "calls": 0.5, "cpu_us": 15.0}    # aten::mm is nested
    with pytest.raises(RuntimeError, match="expected 3"):
        dp.summarise(trace, 3)


def test_kernel_names_are_shortened_for_tables(benchmarks_on_path):
    import decode_profile as dp

    assert dp.short("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>(int)") == \
        "at::native::vectorized_elementwise_kernel"
    assert dp.short("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>(float*)") == \
        "at::native::cunn_SoftMaxForward"
    assert dp.short("_paged_decode_kernel") == "_paged_decode_kernel"


def test_decode_latency_tiny_runs_every_rung_and_checks_tokens(benchmarks_on_path, tmp_path):
    import decode_latency as dl

    out = tmp_path / "decode_latency.json"
    assert dl.main(["--tiny", "--new-tokens", "6", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["rungs"] == list(dl.RUNGS) and r["new_tokens"] == 6 and r["tiny"]
    rungs = r["rows"][0]["rungs"]
    assert set(rungs) == set(dl.RUNGS)
    for name in ("kit eager", "kit static + CUDA graph", "roofline"):
        assert rungs[name]["ms"] > 0 and 0 < rungs[name]["bandwidth_fraction"] <= 1.0 + 1e-9, (name, rungs[name])
    assert rungs["kit static + CUDA graph"]["same_tokens_as_kit_eager"] is True
    assert rungs["kit static + CUDA graph"]["cuda_graph"] is False
    for name in ("kit compiled + CUDA graph", "kit compiled step", "transformers static + compile"):
        assert "not_available" in rungs[name]
    with pytest.raises(SystemExit, match="--new-tokens must be >= 2"):
        dl.main(["--tiny", "--new-tokens", "1", "--out", str(out)])
