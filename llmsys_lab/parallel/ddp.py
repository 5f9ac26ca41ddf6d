"""Distributed data parallelism as PyTorch's DDP does it: overlap the all-reduce with the backward pass.

``data_parallel_step`` (data_parallel.py) waits for the whole backward pass, then all-reduces one
flat buffer: the network idles while the GPU computes, and the GPU idles while the network sends.
But the gradient of the last layer is final long before the backward pass reaches the first layer.
``DDP`` starts communicating as soon as it can:

* At construction rank 0's parameters and buffers are broadcast, so every replica starts equal
  (the optimizer keeps them equal: same averaged gradients, same step).
* A hook on every trainable parameter (``register_post_accumulate_grad_hook``: it fires once the
  parameter's ``.grad`` holds this backward's whole gradient, a tied parameter's both uses summed)
  launches an *asynchronous* all-reduce (``async_op=True`` returns a handle at once) while autograd
  goes on with the layers below.
* ``bucket_size_mb=None`` launches one all-reduce per parameter. Each collective has a fixed cost
  (latency: a round of messages, a kernel launch) on top of its bytes / bandwidth, so hundreds of
  small messages are slow; ``bucket_size_mb=25`` (PyTorch's default; MB = 2**20 bytes here) packs
  parameters into buckets of about that size, in *reverse* order of registration (the order the
  backward pass finishes them), launching a bucket when all its parameters are ready. The last
  bucket may be partial. One bucket as large as the model is the naive step again: nothing
  launches before the backward pass ends.
* ``finish_gradient_synchronization()`` waits on the handles and divides by the number of ranks;
  call it after ``loss.backward()`` and before ``optimizer.step()``.

Frozen parameters (``requires_grad=False``) get no hook, no bucket and no communication. Every rank
must use the same parameters in its backward pass (as PyTorch's DDP without
``find_unused_parameters``); a parameter that no rank used keeps ``grad = None``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..validate import ConfigError, check_number
from .comm import Traffic, nbytes, ring_factor

MB = 2 ** 20


@dataclass
class Bucket:
    params: list                             # in the order the backward pass is expected to finish them
    index: int
    ready: set = field(default_factory=set)  # ids of the parameters whose gradient is final
    buffer: torch.Tensor | None = None
    handle: object = None
    launched: float | None = None            # time.perf_counter() when its all-reduce was launched
    done: float | None = None                # ... and when it completed (the handle's future)

    @property
    def nbytes(self) -> int:
        return sum(nbytes(p) for p in self.params)


def make_buckets(params: list, bucket_size_mb: float | None) -> list[list]:
    """Group parameters into buckets: reverse order, each at most bucket_size_mb (a parameter larger
    than that gets a bucket of its own), one dtype per bucket; None: one bucket per parameter."""
    order = list(reversed(params))
    if bucket_size_mb is None:
        return [[p] for p in order]
    limit = bucket_size_mb * MB
    buckets, current, size = [], [], 0
    for p in order:
        if current and (size + nbytes(p) > limit or p.dtype != current[0].dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += nbytes(p)
    if current:
        buckets.append(current)                 # the last, partial bucket
    return buckets


def same_on_every_rank(value, what: str) -> None:
    """Raise ConfigError on *every* rank if the ranks disagree about `value` (a collective over
    mismatched layouts would hang or mix up gradients); the message lists what each rank has."""
    world = dist.get_world_size()
    values = [None] * world
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        differ = [r for r, v in enumerate(values) if v != values[0]]
        raise ConfigError(f"{what} must be the same on every rank; rank 0 has {_short(values[0])}, "
                          + ", ".join(f"rank {r} has {_short(values[r])}" for r in differ))


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


class DDP(nn.Module):
    """Wrap a module for data parallelism with gradient all-reduces overlapped with the backward pass.

    ``model = DDP(module, bucket_size_mb=25)``; then per step: ``loss = f(model(x)); loss.backward();
    model.finish_gradient_synchronization(); optimizer.step()``. ``traffic`` counts the bytes sent
    (the ring's 2(N-1)/N per byte); ``record=True`` keeps each bucket's launch and completion times
    (``self.events``) for a timeline.
    """

    def __init__(self, module: nn.Module, bucket_size_mb: float | None = None, traffic: Traffic | None = None,
                 record: bool = False):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"DDP wraps a torch.nn.Module, got {type(module).__name__}")
        if bucket_size_mb is not None:
            check_number(bucket_size_mb, "bucket_size_mb", positive=True)
        if not dist.is_initialized():
            raise RuntimeError("DDP needs a torch.distributed process group (run it on ranks: "
                               "llmsys_lab.parallel.launch)")
        self.module, self.traffic, self.record = module, traffic, record
        self.world = dist.get_world_size()
        self.bucket_size_mb = bucket_size_mb
        same_on_every_rank([(tuple(t.shape), str(t.dtype), t.requires_grad)
                            for t in [*module.parameters(), *module.buffers()]],
                           "DDP's module (parameter and buffer shapes, dtypes, requires_grad)")
        with torch.no_grad():                  # every replica starts from rank 0's weights
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)
        self.params = [p for p in module.parameters() if p.requires_grad]   # parameters(): a tied one once
        self.buckets = [Bucket(ps, i) for i, ps in enumerate(make_buckets(self.params, bucket_size_mb))]
        same_on_every_rank([b.nbytes for b in self.buckets], "DDP's buckets (bucket_size_mb)")
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.events: list[dict] = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self.params]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # ---- during the backward pass ------------------------------------------------------------
    def _on_grad_ready(self, p: torch.Tensor) -> None:
        bucket = self._bucket_of[id(p)]
        if bucket.handle is not None:
            raise RuntimeError("a second backward pass reached DDP before finish_gradient_synchronization(): "
                               "call it after every loss.backward()")
        bucket.ready.add(id(p))
        if len(bucket.ready) == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        if len(grads) == 1 and bucket.params[0].grad is not None:
            bucket.buffer = grads[0]                                   # in place, no copy
        else:
            bucket.buffer = torch.cat([g.reshape(-1) for g in grads])
        bucket.launched = time.perf_counter()
        bucket.handle = dist.all_reduce(bucket.buffer, async_op=True)
        if self.record:
            bucket.handle.get_future().then(lambda _, b=bucket: setattr(b, "done", time.perf_counter()))
        if self.traffic is not None:
            self.traffic.add("ddp_all_reduce", ring_factor(self.world) * nbytes(bucket.buffer))

    # ---- after it ------------------------------------------------------------------------------
    def finish_gradient_synchronization(self) -> None:
        """Wait for every bucket's all-reduce and replace each gradient by the mean over the ranks.

        A bucket some of whose parameters got no gradient (unused in this step) is sent now, zeros in
        their place; a parameter keeps ``grad = None`` if it had none here."""
        for bucket in self.buckets:
            if bucket.handle is None and bucket.ready:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is None:
                continue
            bucket.handle.wait()
            finished = time.perf_counter()
            flat = bucket.buffer.div_(self.world)
            i = 0
            for p in bucket.params:
                n = p.numel()
                if p.grad is not None and flat.data_ptr() != p.grad.data_ptr():
                    p.grad.copy_(flat[i:i + n].view_as(p))
                i += n
            if self.record:
                self.events.append({"bucket": bucket.index, "bytes": bucket.nbytes, "params": len(bucket.params),
                                    "launched": bucket.launched, "done": bucket.done or finished,
                                    "waited": finished})
            bucket.handle, bucket.buffer, bucket.ready, bucket.launched, bucket.done = None, None, set(), None, None

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# ---- run on ranks ----------------------------------------------------------------------------------
def check_ddp(bucket_sizes=(None, 1e-4, 0.01, 1000.0), batch_size: int = 4, seq: int = 9, steps: int = 3,
              seed: int = 0) -> dict:
    """On every rank: DDP (per parameter, and buckets from tiny to one) vs one process on the whole batch.

    The model has a tied LM head and two frozen parameters; each rank builds it from its *own* seed,
    so only the broadcast at construction makes the replicas equal. AdamW with weight decay."""
    from .data_parallel import frozen_tied_model, lm_loss, max_param_diff, shard_batch, tiny_config
    from .zero import all_reduce_gradients

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, tiny_config().vocab_size, (batch_size, seq), generator=g).to(_device())
               for _ in range(steps)]
    opt_kwargs = {"lr": 1e-2, "weight_decay": 1.0}
    ref = frozen_tied_model(seed).to(_device())
    ref_opt = torch.optim.AdamW(ref.parameters(), **opt_kwargs)
    for b in batches:
        ref_opt.zero_grad()
        lm_loss(ref, b).backward()
        ref_opt.step()
    plain = frozen_tied_model(seed).to(_device())         # the naive way: all-reduce after the backward
    plain_opt = torch.optim.AdamW(plain.parameters(), **opt_kwargs)
    for b in batches:
        plain_opt.zero_grad()
        lm_loss(plain, shard_batch(b, rank, world)).backward()
        all_reduce_gradients(plain.parameters())
        plain_opt.step()
    out = {"trainable": sum(1 for p in ref.parameters() if p.requires_grad)}
    for size in bucket_sizes:
        model = frozen_tied_model(seed + rank).to(_device())          # different on every rank
        traffic = Traffic()
        ddp = DDP(model, bucket_size_mb=size, traffic=traffic, record=True)
        start = frozen_tied_model(seed)
        broadcast_err = max((a - b).abs().max().item() for a, b in zip(
            [*model.parameters(), *model.buffers()], [*start.parameters(), *start.buffers()]))
        opt = torch.optim.AdamW(ddp.parameters(), **opt_kwargs)
        launches = []
        for b in batches:
            opt.zero_grad()
            lm_loss(ddp, shard_batch(b, rank, world)).backward()
            launches.append(sum(bk.handle is not None for bk in ddp.buckets))   # launched during backward
            ddp.finish_gradient_synchronization()
            opt.step()
        frozen = [p for p in model.parameters() if not p.requires_grad]
        out[size] = {"broadcast_err": broadcast_err, "max_param_diff": max_param_diff(model, ref),
                     "diff_vs_naive": max_param_diff(model, plain),
                     "buckets": [len(bk.params) for bk in ddp.buckets],
                     "bucket_bytes": [bk.nbytes for bk in ddp.buckets],
                     "launched_in_backward": launches,
                     "frozen_grads_none": all(p.grad is None for p in frozen),
                     "frozen_value": model.model.layers[1].input_layernorm.weight.detach().clone(),
                     "tied": model.lm_head.weight is model.model.embed_tokens.weight,
                     "bytes_sent": traffic.total,
                     "grad_bytes": sum(nbytes(p) for p in model.parameters() if p.requires_grad)}
    return out


def check_ddp_errors() -> dict:
    """A second backward pass before finish_gradient_synchronization() fails with a clear error on every rank."""
    from .data_parallel import frozen_tied_model, lm_loss, tiny_config

    ddp = DDP(frozen_tied_model(0).to(_device()), bucket_size_mb=0.01)
    batch = torch.randint(0, tiny_config().vocab_size, (2, 5)).to(_device())
    lm_loss(ddp, batch).backward()
    error = None
    try:
        lm_loss(ddp, batch).backward()
    except RuntimeError as e:
        error = str(e)
    for bucket in ddp.buckets:          # the first backward's all-reduces were launched: finish them
        if bucket.handle is not None:
            bucket.handle.wait()
    dist.barrier()
    return {"double_backward": error, **check_ddp_unused()}


class _PartlyUsed(nn.Module):
    """Three layers, the middle one unused by forward(): its bucket never completes during the backward pass."""

    def __init__(self):
        super().__init__()
        self.first, self.unused, self.last = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.last(torch.tanh(self.first(x)))


def check_ddp_unused(seed: int = 0) -> dict:
    """A parameter no rank uses shares a bucket with used ones: the bucket is sent by
    finish_gradient_synchronization(), the used gradients are the mean, the unused keep grad None."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * world, 4, generator=g).to(_device())
    torch.manual_seed(seed)
    ref = _PartlyUsed().to(_device())
    ref(x).square().mean().backward()
    torch.manual_seed(seed)
    model = _PartlyUsed().to(_device())
    ddp = DDP(model, bucket_size_mb=1.0)                    # one bucket: it holds the unused layer too
    ddp(x.chunk(world)[rank]).square().mean().backward()
    pending = [len(b.ready) for b in ddp.buckets]
    ddp.finish_gradient_synchronization()
    used = [n for n, _ in model.named_parameters() if not n.startswith("unused")]
    refs = dict(ref.named_parameters())
    return {"unused_pending": pending, "unused_buckets": len(ddp.buckets),
            "unused_grads_none": model.unused.weight.grad is None and model.unused.bias.grad is None,
            "unused_used_err": max((dict(model.named_parameters())[n].grad - refs[n].grad).abs().max().item()
                                   for n in used)}


def _device():
    from .launcher import device
    return device()
