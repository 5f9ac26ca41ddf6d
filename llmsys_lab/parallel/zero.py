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
``zero_memory`` gives the table for a model; ``ShardedOptimizer`` implements stage 1 for any
``torch.optim`` optimizer: every rank owns whole parameters (about 1/N of the elements), keeps the
optimizer state (AdamW's m and v, SGD's momentum) for those only, updates them with the averaged
gradients, and broadcasts them to the other ranks. ``fsdp.py`` implements stage 3.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ..estimators.memory import OPTIMIZER_BYTES
from ..estimators.params import param_count
from ..validate import ConfigError, check_int
from .launcher import device

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


def _is_optimizer_class(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)


def assign_shards(numels: list[int], world: int) -> list[int]:
    """Owner rank of each parameter: whole parameters, balanced by element count.

    Largest first, each to the rank that holds the fewest elements so far (ties: the lowest rank);
    deterministic, so every rank computes the same assignment from the same parameter list.
    """
    world = check_int(world, "world", minimum=1)
    load, owner = [0] * world, [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += numels[i]
    return owner


def _size(p: torch.Tensor) -> int:
    """What a parameter weighs in the balance: its elements if it can be trained (a frozen one has no state)."""
    return p.numel() if p.requires_grad else 0


class ShardedOptimizer(torch.optim.Optimizer):
    """ZeRO stage 1 for any optimizer: each rank keeps optimizer state for its shard of the parameters only.

    ``ShardedOptimizer(params, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)`` takes what the wrapped
    optimizer takes (parameters or parameter groups, then its arguments). Every parameter is owned by
    one rank (whole parameters, balanced by element count, ``assign_shards``); this rank's optimizer
    sees only the parameters it owns, so its state (AdamW's m and v, SGD's momentum) exists for about
    1/N of the model. ``step()`` runs the wrapped optimizer on the shard, then every owner broadcasts
    its updated parameters (one flat message per rank), so all replicas hold the same weights again.

    The gradients must already be the same on every rank (averaged by data parallelism: ``DDP`` of
    ``parallel/ddp.py``, or an all-reduce); a parameter without a gradient (frozen, unused) is left
    alone by the wrapped optimizer exactly as it would be unsharded, and parameters that do not
    require gradients are never sent. Hyperparameters changed in ``param_groups`` (a learning-rate
    schedule) reach the wrapped optimizer at the next step.
    """

    def __init__(self, params, optimizer_class, **kwargs):
        if not _is_optimizer_class(optimizer_class):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass (the class, e.g. "
                            f"torch.optim.AdamW), got {optimizer_class!r}")
        if not dist.is_initialized():
            raise RuntimeError("ShardedOptimizer needs a torch.distributed process group (run it on ranks: "
                               "llmsys_lab.parallel.launch)")
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.optimizer_class, self.optimizer_kwargs = optimizer_class, dict(kwargs)
        self.inner = None                  # the wrapped optimizer, over this rank's parameters
        self.owner: dict = {}              # parameter -> rank that updates it
        super().__init__(params, dict(kwargs))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)            # checks, duplicates, defaults
        group = self.param_groups[-1]
        from .ddp import same_on_every_rank
        same_on_every_rank([(tuple(p.shape), str(p.dtype), p.requires_grad) for p in group["params"]],
                           "ShardedOptimizer's parameter group (shapes, dtypes, requires_grad)")
        mine = self._assign(group["params"])
        local = {k: v for k, v in group.items() if k != "params"}
        local["params"] = mine
        if self.inner is None:
            self.inner = self.optimizer_class([local], **self.optimizer_kwargs)
        else:
            self.inner.add_param_group(local)

    def _assign(self, params: list) -> list:
        """Owners for a new group's parameters, continuing the balance of the groups before it."""
        load = [0] * self.world
        for p, r in self.owner.items():
            load[r] += _size(p)
        mine = []
        for i in sorted(range(len(params)), key=lambda i: (-_size(params[i]), i)):
            p = params[i]
            r = min(range(self.world), key=lambda r: (load[r], r))
            self.owner[p] = r
            load[r] += _size(p)
        for p in params:                                 # the group's own order
            if self.owner[p] == self.rank:
                mine.append(p)
        return mine

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, local in zip(self.param_groups, self.inner.param_groups):
            for k, v in group.items():                   # a schedule's new lr reaches the shard
                if k != "params":
                    local[k] = v
        self.inner.step()
        self._broadcast()
        return loss

    def _broadcast(self) -> None:
        """Every owner sends its updated parameters (those that can change) to every rank: one flat message each."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        for src in range(self.world):
            theirs = [p for p in params if self.owner[p] == src]
            if not theirs:
                continue
            for dtype in sorted({p.dtype for p in theirs}, key=str):
                group = [p for p in theirs if p.dtype == dtype]
                flat = torch.cat([p.detach().reshape(-1) for p in group])
                dist.broadcast(flat, src)
                if self.rank != src:
                    i = 0
                    for p in group:
                        p.copy_(flat[i:i + p.numel()].view_as(p))
                        i += p.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)

    def state_bytes(self) -> int:
        """Measured: bytes of every tensor the wrapped optimizer keeps on this rank (its shard's state)."""
        return sum(t.numel() * t.element_size() for st in self.inner.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor) and t.dim() > 0)

    def shard_numel(self) -> int:
        """Elements of the trainable parameters this rank updates."""
        return sum(_size(p) for p, r in self.owner.items() if r == self.rank)


def ShardedAdamW(params, lr: float = 1e-3, **adamw) -> ShardedOptimizer:
    """ZeRO stage 1 with AdamW: ``ShardedOptimizer(params, torch.optim.AdamW, lr=lr, **adamw)``."""
    return ShardedOptimizer(params, torch.optim.AdamW, lr=lr, **adamw)


def all_reduce_gradients(params) -> None:
    """Average every parameter's gradient over the ranks (plain data parallelism's communication).

    A parameter without a gradient on every rank stays without one; the ranks must agree which ones
    have gradients (the same model and the same frozen parameters)."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


# ---- run on ranks ----------------------------------------------------------------------------------
OPTIMIZERS = {"adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 1.0}),         # lr * wd = 0.01
              "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01})}


def _param_groups(model) -> list[dict]:
    """Two groups as training scripts make them: weight decay for matrices, none for norms."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if p.dim() >= 2]},
            {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}]


def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def check_zero(batch_size: int = 4, seq: int = 9, steps: int = 10, optimizers=tuple(OPTIMIZERS),
               seed: int = 0, dtype: str = "float32") -> dict:
    """On every rank: ShardedOptimizer (AdamW, SGD with momentum) vs the unsharded optimizer on one process.

    The model has tied weights and two frozen parameters (one set to 2.0); two parameter groups.
    Returns per optimizer the largest parameter difference, the frozen parameter's value, and the
    measured state bytes of this rank vs the unsharded optimizer's. Against data parallelism with the
    same averaged gradients and an unsharded optimizer the parameters must be bitwise equal."""
    from .data_parallel import frozen_tied_model, lm_loss, max_param_diff, shard_batch, tiny_config

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, cfg.vocab_size, (batch_size, seq), generator=g).to(device()) for _ in range(steps)]
    dtype = getattr(torch, dtype)
    out = {"dtype": str(dtype)}
    for name in optimizers:
        cls, kwargs = OPTIMIZERS[name]
        ref = frozen_tied_model(seed).to(device(), dtype)
        ref_opt = cls(_param_groups(ref), **kwargs)
        for b in batches:
            ref_opt.zero_grad()
            lm_loss(ref, b).backward()
            ref_opt.step()
        model = frozen_tied_model(seed).to(device(), dtype)
        opt = ShardedOptimizer(_param_groups(model), cls, **kwargs)
        plain = frozen_tied_model(seed).to(device(), dtype)          # data parallelism, optimizer not sharded
        plain_opt = cls(_param_groups(plain), **kwargs)
        for b in batches:
            for m, o in ((model, opt), (plain, plain_opt)):
                o.zero_grad()
                lm_loss(m, shard_batch(b, rank, world)).backward()
                all_reduce_gradients(m.parameters())
                o.step()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out[name] = {"max_param_diff": max_param_diff(model, ref),
                     "diff_vs_unsharded_dp": max_param_diff(model, plain),
                     "frozen_value": model.model.layers[1].input_layernorm.weight.detach().clone(),
                     "frozen_unchanged": all(torch.equal(a, b) for a, b in zip(
                         [p for p in model.parameters() if not p.requires_grad],
                         [p for p in frozen_tied_model(seed).parameters() if not p.requires_grad])),
                     "tied": model.lm_head.weight is model.model.embed_tokens.weight,
                     "state_bytes": opt.state_bytes(), "state_bytes_unsharded": _state_bytes(ref_opt),
                     "shard_numel": opt.shard_numel(), "trainable_params": trainable,
                     "params": sum(p.numel() for p in model.parameters()),
                     "largest_param": max(p.numel() for p in model.parameters()),
                     "estimate_optimizer_bytes": zero_memory(
                         trainable, 1, world, "fp32", "adamw" if name == "adamw" else "sgd-momentum").optimizer}
    return out
