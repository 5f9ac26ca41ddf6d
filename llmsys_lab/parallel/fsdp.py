"""Fully sharded data parallelism (ZeRO stage 3, the idea of PyTorch's FSDP), minimal and readable.

Each wrapped module (a transformer block; the root holds what is left: embedding, final norm, LM
head) flattens its trainable parameters into one buffer, pads it to a multiple of N and keeps only
its 1/N: ``shard``, an ``nn.Parameter`` the optimizer sees. Weights, gradients and optimizer state
of the module therefore exist once across the ranks (16/N bytes per parameter in the ZeRO table).

* **Forward**: all-gather the shards into the full flat buffer, point the module's parameters at
  views of it, run the module, drop the buffer: the next module gathers its own. Only one block's
  weights (plus the root's) are whole at any time.
* **Backward**: autograd saves tensors for the backward pass; a saved tensor that is a view of the
  gathered buffer (a weight) is *not* kept: ``saved_tensors_hooks`` store where it was, and the
  first time the backward pass needs one, the module's shards are all-gathered again.
* **Gradients**: the gathered buffer's gradient (every use of every weight summed, a tied one's both)
  is reduce-scattered: each rank receives the sum of its own shard's gradient, divided by N.

Frozen parameters (``requires_grad=False``) are not flattened: they stay whole on every rank (no
gradient, no optimizer state to shard). ``compute_dtype`` (e.g. ``torch.bfloat16``) gathers the
weights in low precision and reduce-scatters gradients in it, while the shards (the optimizer's
master weights) stay fp32: mixed precision.
"""
from __future__ import annotations

import time
import weakref

import torch
import torch.distributed as dist
from torch import nn

from .comm import Traffic, nbytes


class GatherStats:
    """Bytes of gathered (whole) weights alive now and at most, on this rank."""

    def __init__(self):
        self.live = self.peak = self.gathers = 0

    def add(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)
        self.gathers += 1

    def remove(self, n: int) -> None:
        self.live -= n

    def settled(self, timeout: float = 5.0) -> int:
        """Bytes alive once the collectives' worker threads have let go of their buffers.

        A synchronous all-gather returns as soon as its output is complete, but the backend's worker
        thread (gloo runs collectives on its own threads) drops its reference to the output tensor a
        moment later; on a busy machine that moment can come after the next line of Python. Wait up to
        ``timeout`` seconds for the count to reach zero: a buffer something really keeps stays counted."""
        deadline = time.monotonic() + timeout
        while self.live and time.monotonic() < deadline:
            time.sleep(0.001)
        return self.live


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp)


def _all_gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp)


class _GatherParams(torch.autograd.Function):
    """Forward: all-gather the shards; backward: reduce-scatter the gradient to the shards (mean over ranks)."""

    @staticmethod
    def forward(ctx, shard, unit):
        ctx.unit = unit
        return unit.gather(shard.detach())

    @staticmethod
    def backward(ctx, grad_full):
        unit = ctx.unit
        world = dist.get_world_size()
        grad = torch.empty(unit.shard_numel, dtype=grad_full.dtype, device=grad_full.device)
        _reduce_scatter(grad, grad_full.contiguous())
        if unit.traffic is not None:
            unit.traffic.add("fsdp_reduce_scatter", (world - 1) / world * nbytes(grad_full))
        unit.backward_full = None                       # this module's backward is done: free its weights
        return (grad / world).to(unit.shard.dtype), None


class FSDP(nn.Module):
    """One fully sharded unit: ``FSDP(module)``; nested units own their own parameters (wrap inner first)."""

    def __init__(self, module: nn.Module, compute_dtype: torch.dtype | None = None, traffic: Traffic | None = None,
                 stats: GatherStats | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"FSDP wraps a torch.nn.Module, got {type(module).__name__}")
        if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
            raise TypeError(f"compute_dtype must be a floating torch.dtype or None, got {compute_dtype!r}")
        if not dist.is_initialized():
            raise RuntimeError("FSDP needs a torch.distributed process group (run it on ranks: "
                               "llmsys_lab.parallel.launch)")
        self.module, self.traffic = module, traffic
        self.stats = stats if stats is not None else GatherStats()
        world, rank = dist.get_world_size(), dist.get_rank()
        from .ddp import same_on_every_rank
        same_on_every_rank([(tuple(t.shape), str(t.dtype), t.requires_grad) for owner in self._own_modules(module)
                            for t in [*owner._parameters.values(), *owner._buffers.values()] if t is not None],
                           "FSDP's module (parameter and buffer shapes, dtypes, requires_grad)")
        with torch.no_grad():                              # every rank starts from rank 0's weights
            for owner in self._own_modules(module):
                for t in [*owner._parameters.values(), *owner._buffers.values()]:
                    if t is not None:
                        dist.broadcast(t.data, src=0)
                        if compute_dtype is not None and not t.requires_grad and t.is_floating_point():
                            t.data = t.data.to(compute_dtype)     # frozen weights computed with in low precision
        # this unit's trainable parameters: not those of nested units; a tied parameter once, all its places
        places: dict[int, list] = {}
        params: list[nn.Parameter] = []
        for owner in self._own_modules(module):
            for name, p in list(owner._parameters.items()):
                if p is None or not p.requires_grad:
                    continue
                if id(p) not in places:
                    places[id(p)] = []
                    params.append(p)
                places[id(p)].append((owner, name))
        if not params:
            raise ValueError("FSDP found no trainable parameter to shard in this module")
        dtype = params[0].dtype
        if any(p.dtype != dtype for p in params):
            raise TypeError("FSDP flattens one dtype per unit: the parameters have several")
        self.layout = [(places[id(p)], p.shape, p.numel()) for p in params]
        total = sum(p.numel() for p in params)
        self.shard_numel = -(-total // world)
        flat = torch.zeros(self.shard_numel * world, dtype=dtype, device=params[0].device)
        with torch.no_grad():
            i = 0
            for p in params:
                flat[i:i + p.numel()].copy_(p.reshape(-1))
                i += p.numel()
        self.shard = nn.Parameter(flat[rank * self.shard_numel:(rank + 1) * self.shard_numel].clone())
        for where, _, _ in self.layout:                    # the module no longer owns them
            for owner, name in where:
                del owner._parameters[name]
                setattr(owner, name, None)
        self.total, self.compute_dtype = total, compute_dtype
        self.backward_full = None

    @staticmethod
    def _own_modules(module):
        """module and its submodules, not descending into nested FSDP units."""
        yield module
        for child in module.children():
            if not isinstance(child, FSDP):
                yield from FSDP._own_modules(child)

    # ---- gather / free ------------------------------------------------------------------------
    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        if self.compute_dtype is not None:
            shard = shard.to(self.compute_dtype)
        full = torch.empty(self.shard_numel * world, dtype=shard.dtype, device=shard.device)
        _all_gather(full, shard.contiguous())
        if self.traffic is not None:
            self.traffic.add("fsdp_all_gather", (world - 1) * nbytes(shard))
        n = nbytes(full)
        self.stats.add(n)
        weakref.finalize(full, self.stats.remove, n)       # counted until the buffer is freed
        return full

    def _bind(self, full: torch.Tensor) -> None:
        i = 0
        for where, shape, n in self.layout:
            view = full[i:i + n].view(shape)
            for owner, name in where:
                setattr(owner, name, view)
            i += n

    def _unbind(self) -> None:
        for where, _, _ in self.layout:
            for owner, name in where:
                setattr(owner, name, None)

    def forward(self, *args, **kwargs):
        full = _GatherParams.apply(self.shard, self)
        storage = full.untyped_storage().data_ptr()

        def pack(t):
            if t.untyped_storage().data_ptr() == storage:      # a view of the whole weights: keep its place only
                return ("weights", t.storage_offset(), t.shape, t.stride())
            return t

        def unpack(saved):
            if isinstance(saved, tuple) and saved and saved[0] == "weights":
                if self.backward_full is None:                 # gather again, once per backward of this unit
                    self.backward_full = self.gather(self.shard.detach())
                _, offset, shape, stride = saved
                return self.backward_full.as_strided(shape, stride, offset)
            return saved

        self._bind(full)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return self.module(*args, **kwargs)
        finally:
            self._unbind()                                     # `full` dies with this frame

    def local_bytes(self) -> dict:
        """Bytes this rank holds for this unit: its shard of the weights and of their gradient."""
        return {"weights": nbytes(self.shard),
                "gradients": nbytes(self.shard.grad) if self.shard.grad is not None else 0}


def fully_shard(model: nn.Module, layers, **options) -> FSDP:
    """Wrap every module of `layers` (e.g. ``model.model.layers``) in its own unit, then the root."""
    stats = options.pop("stats", None) or GatherStats()
    targets = list(layers)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if any(child is layer for layer in targets):
                setattr(parent, name, FSDP(child, stats=stats, **options))
    return FSDP(model, stats=stats, **options)


def gathered_parameters(root: nn.Module) -> dict:
    """Every sharded parameter, whole again (all-gathered), by its name in the unwrapped model."""
    names = {}
    for prefix, m in root.named_modules(remove_duplicate=False):
        clean = ".".join(part for part in prefix.split(".") if part != "module")
        names.setdefault(id(m), clean)
    out = {}
    with torch.no_grad():
        for unit in [m for m in root.modules() if isinstance(m, FSDP)]:
            full = unit.gather(unit.shard.detach())
            i = 0
            for where, shape, n in unit.layout:
                owner, name = where[0]
                out[f"{names[id(owner)]}.{name}".lstrip(".")] = full[i:i + n].view(shape).clone()
                i += n
    return out
