"""Ring all-reduce from point-to-point send/recv (the algorithm behind NCCL's ring).

The tensor is cut into N chunks. Reduce-scatter: in N-1 steps every rank sends one chunk to its
right neighbour and adds the chunk arriving from its left; afterwards rank r holds the full sum of
chunk (r + 1) mod N. All-gather: N-1 more steps pass the finished chunks around the ring. Every
rank sends 2(N-1) chunks of size S/N: 2(N-1)/N x S bytes, almost independent of N, and every link
of the ring is busy at every step. A parameter server instead receives (N-1) x S bytes on one node.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import Traffic, check_same_shape, nbytes


def _exchange(send_buf: torch.Tensor, recv_buf: torch.Tensor, right: int, left: int) -> None:
    """Send to the right neighbour while receiving from the left (non-blocking send: no deadlock)."""
    req = dist.isend(send_buf.contiguous(), right)
    dist.recv(recv_buf, left)
    req.wait()


def ring_reduce_scatter(chunks: list, traffic: Traffic | None = None) -> int:
    """First half of the ring: N-1 steps; returns the index of the chunk this rank now holds summed.

    chunks: this rank's tensor cut into N pieces (views; summed in place). Rank r ends with the
    full sum of chunk (r + 1) mod N; the other chunks hold partial sums.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    right, left = (rank + 1) % world, (rank - 1) % world
    buf = torch.empty_like(chunks[0])
    for step in range(world - 1):
        out_i, in_i = (rank - step) % world, (rank - step - 1) % world
        incoming = buf[: chunks[in_i].numel()]
        _exchange(chunks[out_i], incoming, right, left)
        chunks[in_i].add_(incoming)
        if traffic is not None:
            traffic.add("ring_reduce_scatter", nbytes(chunks[out_i]))
    return (rank + 1) % world


def ring_all_gather(chunks: list, traffic: Traffic | None = None) -> None:
    """Second half: rank r starts with chunk (r + 1) mod N final; N-1 steps pass every chunk to every rank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    right, left = (rank + 1) % world, (rank - 1) % world
    buf = torch.empty_like(chunks[0])
    for step in range(world - 1):
        out_i, in_i = (rank + 1 - step) % world, (rank - step) % world
        incoming = buf[: chunks[in_i].numel()]
        _exchange(chunks[out_i], incoming, right, left)
        chunks[in_i].copy_(incoming)
        if traffic is not None:
            traffic.add("ring_all_gather", nbytes(chunks[out_i]))


def ring_all_reduce(t: torch.Tensor, traffic: Traffic | None = None, check: bool = True) -> torch.Tensor:
    """Sum t over all ranks in place, with send/recv only; counts the bytes this rank sends."""
    if check:
        check_same_shape(t, "ring_all_reduce's tensor")
    if dist.get_world_size() == 1:
        return t
    flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
    chunks = list(flat.tensor_split(dist.get_world_size()))     # N chunks, sizes differ by at most 1
    ring_reduce_scatter(chunks, traffic)
    ring_all_gather(chunks, traffic)
    if not t.is_contiguous():
        t.copy_(flat.view_as(t))
    return t


def time_all_reduce(numels=(2**10, 2**16, 2**20), repeats: int = 5) -> dict:
    """Run on ranks: median seconds of ring_all_reduce and dist.all_reduce per tensor size (fp32)."""
    import statistics
    import time

    from .launcher import device

    out = {}
    for n in numels:
        x = torch.ones(n, device=device())
        row = {}
        for name, fn in (("ring", lambda t: ring_all_reduce(t, check=False)), ("library", dist.all_reduce)):
            times = []
            for _ in range(repeats + 1):                      # the first call warms up
                dist.barrier()
                if x.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row[name] = statistics.median(times[1:])
        out[n] = row
    return out
