"""Equality checks that run on ranks, grouped so that one launch runs many of them.

Starting N Python processes costs seconds; a test or a lesson cell launches once and runs every
check it needs on the same process group. Each check returns plain numbers (max errors, bytes).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .comm import Traffic, check_same_shape
from .launcher import device
from .data_parallel import check_data_parallel
from .ddp import check_ddp, check_ddp_errors
from .fsdp_checks import check_fsdp
from .overlap import ddp_timeline, time_bucket_sizes
from .pipeline import check_pipeline
from .ring import ring_all_reduce
from .sequence_parallel import check_sequence_parallel, ring_attention, ulysses_attention
from .tensor_parallel import check_tensor_parallel
from .zero import check_zero


def check_ring(sizes=(1, 5, 1000, 4099), seed: int = 0) -> dict:
    """ring_all_reduce vs dist.all_reduce on tensors whose sizes do not divide by N; bytes sent."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for n in sizes:
        g = torch.Generator().manual_seed(seed + 100 * rank + n)
        x = torch.randn(n, generator=g, dtype=torch.float64).to(device())
        ref = x.clone()
        dist.all_reduce(ref)
        traffic = Traffic()
        mine = ring_all_reduce(x.clone(), traffic)
        out[n] = {"err": (mine - ref).abs().max().item(), "bytes_sent": traffic.total,
                  "bytes_formula": 2 * (world - 1) / world * x.numel() * x.element_size()}
    return out


def _error_of(fn, *args, **kwargs) -> str | None:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return None


def check_bad_input() -> dict:
    """Bad input must fail with the same clear error on every rank, never hang."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    # a tensor of a different shape on the last rank
    out["ring_mismatch"] = _error_of(ring_all_reduce, torch.ones(4 + (rank == world - 1), device=device()))
    out["shape_mismatch"] = _error_of(check_same_shape, torch.ones(2, 3 if rank else 2, device=device()), "x")
    # heads not divisible by the ranks (Ulysses), sequence shards of different lengths (Ring Attention)
    q = torch.randn(1, world + 1, 4, 8, device=device())
    out["ulysses_heads"] = _error_of(ulysses_attention, q, q, q)
    q = torch.randn(1, 2, 4 + rank, 8, device=device())
    out["ring_attention_shards"] = _error_of(ring_attention, q, q, q)
    # a model whose heads (tensor parallel) or layers (pipeline) do not divide by the ranks
    from ..layers import LlamaBlock
    from ..model import LlamaLM
    from .data_parallel import tiny_config
    from .pipeline import Stage
    from .tensor_parallel import TensorParallelLlamaBlock

    odd = tiny_config(hidden_size=8 * (world + 1), num_heads=world + 1, num_kv_heads=world + 1,
                      num_layers=world + 1)
    out["tp_heads"] = _error_of(TensorParallelLlamaBlock, LlamaBlock(odd), rank, world)
    out["pp_layers"] = _error_of(Stage, LlamaLM(odd), rank, world)
    # DDP, FSDP and the sharded optimizer on ranks that disagree: a clear error everywhere, no hang
    from .ddp import DDP
    from .fsdp import FSDP
    from .zero import ShardedOptimizer

    last = rank == world - 1
    out["ddp_model"] = _error_of(DDP, nn.Linear(4, 5 if last else 4))
    out["ddp_buckets"] = _error_of(DDP, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
                                   bucket_size_mb=1e-6 if last else 1.0)
    out["fsdp_model"] = _error_of(FSDP, nn.Linear(4, 5 if last else 4))
    out["zero_params"] = _error_of(ShardedOptimizer, [nn.Parameter(torch.ones(3 if last else 2))],
                                   torch.optim.SGD, lr=0.1)
    dist.barrier()
    return out


CHECKS = {"ring": check_ring, "data_parallel": check_data_parallel, "zero": check_zero,
          "tensor_parallel": check_tensor_parallel, "pipeline": check_pipeline,
          "sequence_parallel": check_sequence_parallel, "bad_input": check_bad_input,
          "ddp": check_ddp, "ddp_errors": check_ddp_errors, "ddp_timeline": ddp_timeline,
          "ddp_buckets": time_bucket_sizes,
          "fsdp": check_fsdp}


def run_checks(names=tuple(CHECKS), options: dict | None = None) -> dict:
    """Run several checks in one process group; options maps a check's name to its keyword arguments."""
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise KeyError(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    options = options or {}
    return {n: CHECKS[n](**options.get(n, {})) for n in names}


def raise_on(rank_that_fails: int = 1) -> None:
    """For the launcher's tests: one rank raises while the others wait in a collective."""
    if dist.get_rank() == rank_that_fails:
        raise ValueError(f"rank {rank_that_fails} was told to fail")
    dist.all_reduce(torch.ones(1, device=device()))


def hang(seconds: float = 600.0) -> None:
    """For the launcher's tests: a rank that never finishes."""
    import time
    time.sleep(seconds)


def die_on(rank_that_dies: int = 1) -> None:
    """For the launcher's tests: one rank's process ends abruptly (as if killed)."""
    import os
    if dist.get_rank() == rank_that_dies:
        os._exit(3)
    dist.all_reduce(torch.ones(1, device=device()))
