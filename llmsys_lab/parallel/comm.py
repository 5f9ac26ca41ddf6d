"""Collectives that count the bytes they move, and a shape check that every rank agrees on.

Every strategy of lesson 08 is "split something, then communicate"; ``Traffic`` records what each
rank *sends* per call, so the estimators can be checked against the implementations:

* point-to-point ``send``: the tensor's bytes, measured.
* ``all_reduce`` through the library (``dist.all_reduce``): the library picks its algorithm, so
  the count is the ring's 2(N-1)/N x bytes per rank, the bandwidth-optimal cost that NCCL's ring
  reaches and that ``ring.ring_all_reduce`` measures with its own sends.
* ``all_gather`` / ``reduce_scatter``: (N-1)/N x the full tensor's bytes each (half a ring all-reduce).
* ``all_to_all``: (N-1)/N x the local tensor's bytes (each rank keeps 1/N of its data).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from ..validate import ShapeError, check_int


class Traffic:
    """Bytes sent by this rank, per kind of communication."""

    def __init__(self):
        self.bytes = defaultdict(float)
        self.calls = defaultdict(int)

    def add(self, kind: str, nbytes: float) -> None:
        self.bytes[kind] += nbytes
        self.calls[kind] += 1

    @property
    def total(self) -> float:
        return sum(self.bytes.values())

    def as_dict(self) -> dict:
        return {k: {"bytes": self.bytes[k], "calls": self.calls[k]} for k in sorted(self.bytes)}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def ring_factor(world: int) -> float:
    """Bytes each rank sends in a ring all-reduce, per byte of the tensor: 2(N-1)/N."""
    world = check_int(world, "world", minimum=1)
    return 2 * (world - 1) / world


def check_rank(rank: int, world: int) -> tuple[int, int]:
    """world >= 1 ranks and 0 <= rank <= world - 1; returns (rank, world)."""
    world = check_int(world, "world", minimum=1)
    return check_int(rank, "rank", minimum=0, maximum=world - 1), world


def check_sizes(**sizes) -> None:
    """Counts (tokens, elements, parameters) are ints >= 0; `world` is an int >= 1."""
    for name, v in sizes.items():
        check_int(v, name, minimum=1 if name == "world" else 0)


def check_same_shape(t: torch.Tensor, name: str, group=None) -> None:
    """Raise ShapeError on *every* rank if the ranks hold tensors of different shapes or dtypes.

    A collective over mismatched tensors may hang or read garbage; one tiny all-gather of the
    shapes first turns that into the same clear error everywhere.
    """
    world = dist.get_world_size(group)
    shapes = [None] * world
    dist.all_gather_object(shapes, (tuple(t.shape), str(t.dtype)), group=group)
    if any(s != shapes[0] for s in shapes):
        listing = ", ".join(f"rank {r}: {s[0]} {s[1]}" for r, s in enumerate(shapes))
        raise ShapeError(f"{name} must have the same shape and dtype on every rank, got {listing}")


def all_reduce(t: torch.Tensor, traffic: Traffic | None = None, group=None, kind: str = "all_reduce"):
    """Sum in place over the ranks (the library's algorithm); counts the ring's bytes."""
    dist.all_reduce(t, group=group)
    if traffic is not None:
        traffic.add(kind, ring_factor(dist.get_world_size(group)) * nbytes(t))
    return t


def all_gather(t: torch.Tensor, traffic: Traffic | None = None, group=None, dim: int = 0,
               kind: str = "all_gather") -> torch.Tensor:
    """Concatenate every rank's t along dim."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    if traffic is not None:
        traffic.add(kind, (world - 1) * nbytes(t))
    return torch.cat(parts, dim=dim)


_NO_ALL_TO_ALL: set[str] = set()      # backends found without all_to_all in this process


def _exchange(recv: list, send: list, group=None) -> None:
    """dist.all_to_all where the backend has it; older PyTorch's gloo (e.g. 2.11) answers "Backend
    gloo does not support alltoall" (on every rank, before sending anything): then the same exchange
    from point-to-point messages, remembered for the rest of the process."""
    backend = dist.get_backend(group)
    if backend not in _NO_ALL_TO_ALL:
        try:
            dist.all_to_all(recv, send, group=group)
            return
        except RuntimeError as err:
            if "does not support" not in str(err):
                raise
            _NO_ALL_TO_ALL.add(backend)
    _pairwise_all_to_all(recv, send, group)


def _pairwise_all_to_all(recv: list, send: list, group=None) -> None:
    """The same exchange from point-to-point messages: every rank posts all its sends and receives
    at once (non-blocking), so no pair waits on another; the bytes on the wire are the same."""
    me = dist.get_rank(group)
    recv[me].copy_(send[me])
    ops = []
    for peer in range(dist.get_world_size(group)):
        if peer != me:
            ops.append(dist.P2POp(dist.isend, send[peer], dist.get_global_rank(group, peer) if group else peer, group))
            ops.append(dist.P2POp(dist.irecv, recv[peer], dist.get_global_rank(group, peer) if group else peer, group))
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def all_to_all(t: torch.Tensor, scatter_dim: int, gather_dim: int, traffic: Traffic | None = None,
               group=None, kind: str = "all_to_all") -> torch.Tensor:
    """Split t in N pieces along scatter_dim, send piece j to rank j, concatenate what arrives along gather_dim."""
    world = dist.get_world_size(group)
    if t.shape[scatter_dim] % world:
        raise ShapeError(f"all_to_all: dim {scatter_dim} of size {t.shape[scatter_dim]} does not split "
                         f"into {world} ranks")
    send = [p.contiguous() for p in t.chunk(world, dim=scatter_dim)]
    recv = [torch.empty_like(p) for p in send]
    _exchange(recv, send, group)
    if traffic is not None:
        traffic.add(kind, (world - 1) / world * nbytes(t))
    return torch.cat(recv, dim=gather_dim)


def send(t: torch.Tensor, dst: int, traffic: Traffic | None = None, kind: str = "send") -> None:
    dist.send(t.contiguous(), dst)
    if traffic is not None:
        traffic.add(kind, nbytes(t))


def recv(shape, dtype, src: int, device=None) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(t, src)
    return t
