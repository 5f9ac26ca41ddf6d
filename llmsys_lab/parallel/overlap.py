"""Measure DDP's overlap: when each bucket's all-reduce starts and ends against the backward pass,
and the time of a training step for bucket sizes from one per parameter to one for the whole model.

Run on ranks (``launch(ddp_timeline, 2)``, ``launch(time_bucket_sizes, 2)``). Times are seconds
after the step's start (``time.perf_counter()`` of each rank); a bucket's end is when its
collective completed (the handle's future), which for the buckets launched early is before the
backward pass ends: communication hidden behind computation.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..model import LlamaLM
from ..validate import check_int, check_number
from .data_parallel import lm_loss, shard_batch, tiny_config
from .ddp import DDP, MB
from .launcher import device


def timing_config():
    """A model large enough (~2.6 M parameters, 10 MB of fp32 gradients) for the backward pass and
    the all-reduces to take milliseconds on a CPU."""
    return tiny_config(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512,
                       vocab_size=512, max_position_embeddings=128)


def _batch(batch_size: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, timing_config().vocab_size, (batch_size, seq), generator=g).to(device())


def _step(ddp: DDP, opt, batch: torch.Tensor) -> dict:
    """One step; the times of its phases after its start."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    t0 = time.perf_counter()
    opt.zero_grad()
    loss = lm_loss(ddp, shard_batch(batch, rank, world))
    t_forward = time.perf_counter()
    ddp.events.clear()
    loss.backward()
    t_backward = time.perf_counter()
    ddp.finish_gradient_synchronization()
    t_sync = time.perf_counter()
    opt.step()
    t_end = time.perf_counter()
    return {"forward_end": t_forward - t0, "backward_end": t_backward - t0, "sync_end": t_sync - t0,
            "step_end": t_end - t0,
            "buckets": [{"bucket": e["bucket"], "bytes": e["bytes"], "launched": e["launched"] - t0,
                         "done": e["done"] - t0} for e in ddp.events]}


def ddp_timeline(bucket_size_mb: float | None = 1.0, batch_size: int = 8, seq: int = 65, warmup: int = 2) -> dict:
    """One measured step (after warm-up) of DDP: forward/backward/sync ends and every bucket's times."""
    if bucket_size_mb is not None:
        check_number(bucket_size_mb, "bucket_size_mb", positive=True)
    check_int(warmup, "warmup", minimum=0)
    torch.manual_seed(0)
    model = LlamaLM(timing_config()).to(device())
    ddp = DDP(model, bucket_size_mb=bucket_size_mb, record=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    batch = _batch(batch_size, seq)
    for _ in range(warmup):
        _step(ddp, opt, batch)
    return _step(ddp, opt, batch)


def time_bucket_sizes(sizes=(None, 1.0, 4.0, "one"), batch_size: int = 8, seq: int = 65,
                      steps: int = 3, warmup: int = 1) -> dict:
    """Median time of a training step (forward, backward, gradient sync, SGD) per bucket size.

    sizes: MB per bucket, None (one all-reduce per parameter) or "one" (a single bucket holding every
    gradient: nothing is sent before the backward pass ends, as in ``data_parallel_step``)."""
    check_int(steps, "steps", minimum=1)
    check_int(warmup, "warmup", minimum=0)
    torch.manual_seed(0)
    model = LlamaLM(timing_config()).to(device())
    total_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
    batch = _batch(batch_size, seq)
    out = {}
    for size in sizes:
        mb = total_mb * 1.01 if size == "one" else size
        ddp = DDP(model, bucket_size_mb=mb, record=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
        for _ in range(warmup):
            _step(ddp, opt, batch)
        runs = [_step(ddp, opt, batch) for _ in range(steps)]
        ddp.remove_hooks()
        last = runs[-1]
        out[size] = {"buckets": len(ddp.buckets), "step_s": statistics.median(r["step_end"] for r in runs),
                     "backward_s": statistics.median(r["backward_end"] - r["forward_end"] for r in runs),
                     "wait_after_backward_s": statistics.median(r["sync_end"] - r["backward_end"] for r in runs),
                     "sent_before_backward_end": sum(b["done"] <= last["backward_end"] for b in last["buckets"])}
    out["grad_mb"] = total_mb
    return out
