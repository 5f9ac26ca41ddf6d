"""Measurements on the current GPU that the estimators are checked against.

* ``measure_training_peak``: peak ``torch.cuda.max_memory_allocated`` of one AdamW training
  step of a randomly initialised transformers Llama model (the second step, so the optimizer
  states exist, as in every step of a real run).
* ``measure_peaks``: the GPU's achieved bf16 matmul rate and device-to-device copy bandwidth,
  the two ceilings of its roofline.
"""
from __future__ import annotations

from ..configs import ModelConfig


def _require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("this measurement needs a CUDA GPU")
    return torch


def measure_training_peak(cfg: ModelConfig, batch: int, seq: int, precision: str = "mixed",
                          recompute: bool = False, seed: int = 0) -> int:
    """Bytes: peak allocated memory during the second training step."""
    return measure_training_step(cfg, batch, seq, precision, recompute, seed)["peak"]


def sdpa_backend_ran(fn) -> str:
    """Run `fn()` under the profiler and name the SDPA backend its attention used (from the aten
    operator names: flash / memory-efficient / cuDNN each have their own op; math runs plain ops)."""
    from torch.profiler import ProfilerActivity, profile

    from .attention_path import backend_from_ops

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return backend_from_ops({e.name for e in prof.events()})


def measure_training_step(cfg: ModelConfig, batch: int, seq: int, precision: str = "mixed",
                          recompute: bool = False, seed: int = 0) -> dict:
    """{'peak': bytes allocated at the peak of the second training step, 'backend': the SDPA
    backend the first step ran (profiler)}."""
    torch = _require_cuda()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    torch.cuda.empty_cache()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg.to_hf(), attn_implementation="sdpa",
                                                 dtype=torch.float32)
    if recompute:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "mixed"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    backend = sdpa_backend_ran(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, opt, ids
    torch.cuda.empty_cache()
    return {"peak": peak, "backend": backend}


def measure_peaks(n: int = 8192, copy_bytes: int = 2 << 30) -> dict:
    """Achieved bf16 matmul FLOP/s and copy bandwidth (bytes read + written per second)."""
    torch = _require_cuda()
    from .._runtime import require_triton

    require_triton("measure_peaks (it times with triton.testing.do_bench)")
    from triton.testing import do_bench

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    flops = 2 * n**3 / (ms * 1e-3)
    src = torch.empty(copy_bytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    bandwidth = 2 * copy_bytes / (ms * 1e-3)
    return {"gpu": torch.cuda.get_device_name(0), "bf16_flops": flops, "bandwidth": bandwidth}
