"""Sharded data parallelism: ZeRO (Rajbhandari et al., 2020) and the FSDP idea.

Plain data parallelism keeps N identical copies of everything. With mixed-precision AdamW each
parameter costs 2 (16-bit weight) + 2 (16-bit gradient) + 12 (fp32 master, m, v) = 16 bytes on
*every* rank. ZeRO shards what it can:

| stage | sharded over N ranks | bytes per parameter per rank |
| --- | --- | --- |
| 0 (DP) | nothing | 2 + 2 + 12 |
| 1 | optimizer states | 2 + 2 + 12/N |
| 2 | + gradients | 2 + (2 + 12)/N |
| 3 (FSDP) | + weights | (2 + 2 + 12)/N |

Stages 1 and 2 communicate what DP does (a reduce-scatter of gradients + an all-gather of
parameters = one all-reduce); stage 3 all-gathers the weights again in the backward pass (1.5x).
``zero_memory`` gives the table for a model; ``ShardedAdamW`` implements stage 1: every rank
keeps AdamW's m and v only for its 1/N of a flat parameter buffer, the gradients are
reduce-scattered with the ring of ``ring.py``, each rank updates its shard, and the ring's
all-gather half brings every rank the updated parameters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ..estimators.memory import OPTIMIZER_BYTES
from ..estimators.params import param_count
from ..validate import ConfigError, check_int
from .comm import Traffic
from .launcher import device
from .ring import ring_all_gather, ring_reduce_scatter

PRECISION_BYTES = {"fp32": (4, 4, 0), "mixed-zero": (2, 2, 4)}   # weight, gradient, fp32 master copy


@dataclass
class ZeroMemory:
    stage: int
    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def zero_memory(params: int, stage: int, world: int, precision: str = "mixed-zero",
                optimizer: str = "adamw") -> ZeroMemory:
    """Bytes per rank of weights, gradients and optimizer state (fp32 master counted there)."""
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if precision not in PRECISION_BYTES:
        raise ConfigError(f"precision must be one of {', '.join(PRECISION_BYTES)}, got {precision!r}")
    if optimizer not in OPTIMIZER_BYTES:
        raise ConfigError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_BYTES)}")
    check_int(world, "world", minimum=1)
    check_int(params, "params", minimum=0)
    w, g, master = PRECISION_BYTES[precision]
    o = OPTIMIZER_BYTES[optimizer] + master
    return ZeroMemory(stage, params * w / (world if stage >= 3 else 1), params * g / (world if stage >= 2 else 1),
                      params * o / (world if stage >= 1 else 1))


def zero_table(cfg, world: int, precision: str = "mixed-zero") -> list[ZeroMemory]:
    n = param_count(cfg)
    return [zero_memory(n, s, world, precision) for s in range(4)]


def flatten_parameters(model, world: int) -> torch.Tensor:
    """Move every parameter into one flat buffer (padded to a multiple of world); the parameters become views."""
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    flat = torch.zeros(-(-n // world) * world, dtype=params[0].dtype, device=params[0].device)
    i = 0
    for p in params:
        flat[i:i + p.numel()].copy_(p.detach().view(-1))
        p.data = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    return flat


class ShardedAdamW:
    """ZeRO stage 1 with AdamW: optimizer state for this rank's 1/N of the parameters only."""

    def __init__(self, model, lr: float = 1e-3, traffic: Traffic | None = None, **adamw):
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.model, self.traffic = model, traffic
        self.params = list(model.parameters())
        self.flat = flatten_parameters(model, self.world)
        self.chunks = list(self.flat.chunk(self.world))
        self.flat_grad = torch.zeros_like(self.flat)
        self.grad_chunks = list(self.flat_grad.chunk(self.world))
        # the shard the ring's reduce-scatter leaves complete on this rank
        self.own = (self.rank + 1) % self.world
        self.shard = torch.nn.Parameter(self.chunks[self.own])          # a view: updates land in flat
        self.opt = torch.optim.AdamW([self.shard], lr=lr, **adamw)

    def step(self) -> None:
        i = 0
        for p in self.params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            self.flat_grad[i:i + p.numel()].copy_(g.reshape(-1))
            i += p.numel()
        self.flat_grad[i:].zero_()
        ring_reduce_scatter(self.grad_chunks, self.traffic)             # sum of this rank's shard only
        self.shard.grad = self.grad_chunks[self.own] / self.world
        self.opt.step()                                                 # AdamW on 1/N of the parameters
        ring_all_gather(self.chunks, self.traffic)                      # everyone gets the new weights

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_bytes(self) -> int:
        """Measured: bytes of every tensor AdamW keeps for this rank (m and v of its shard)."""
        return sum(t.numel() * t.element_size() for st in self.opt.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor) and t.dim() > 0)


# ---- run on ranks ----------------------------------------------------------------------------------
def check_zero(batch_size: int = 4, seq: int = 9, lr: float = 1e-2, steps: int = 2, seed: int = 0) -> dict:
    """On every rank: ZeRO-1 AdamW steps vs single-process AdamW on the whole batch; measured state bytes."""
    from ..model import LlamaLM
    from .data_parallel import lm_loss, max_param_diff, shard_batch, tiny_config

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, cfg.vocab_size, (batch_size, seq), generator=g).to(device()) for _ in range(steps)]
    torch.manual_seed(seed)
    ref = LlamaLM(cfg).to(device())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr)
    for b in batches:
        ref_opt.zero_grad()
        lm_loss(ref, b).backward()
        ref_opt.step()
    full_state = sum(t.numel() * t.element_size() for st in ref_opt.state.values() for t in st.values()
                     if isinstance(t, torch.Tensor) and t.dim() > 0)
    torch.manual_seed(seed)
    model = LlamaLM(cfg).to(device())
    traffic = Traffic()
    opt = ShardedAdamW(model, lr=lr, traffic=traffic)
    for b in batches:
        opt.zero_grad()
        lm_loss(model, shard_batch(b, rank, world)).backward()
        opt.step()
    n = sum(p.numel() for p in model.parameters())
    return {"max_param_diff": max_param_diff(model, ref), "state_bytes": opt.state_bytes(),
            "state_bytes_unsharded": full_state, "params": n,
            "estimate_optimizer_bytes": zero_memory(opt.flat.numel(), 1, world, "fp32").optimizer,
            "bytes_sent": traffic.total}
