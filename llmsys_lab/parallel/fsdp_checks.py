"""FSDP on ranks: equal to one process, weights whole one unit at a time, bytes per rank vs the ZeRO table."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import nbytes
from .fsdp import FSDP, fully_shard, gathered_parameters
from .launcher import device
from .zero import zero_memory


def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def check_fsdp(batch_size: int = 4, seq: int = 9, steps: int = 3, seed: int = 0,
               compute_dtype: str | None = None) -> dict:
    """FSDP (each block a unit, the root the rest) with AdamW vs AdamW on one process, the whole batch.

    Each rank builds its model from its own seed (the units broadcast rank 0's). Measured per rank:
    bytes of weights (shards; frozen ones whole), gradients and optimizer state; the gathered
    weights alive after the forward and after the backward pass, and at most."""
    from .data_parallel import frozen_tied_model, lm_loss, shard_batch, tiny_config

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, tiny_config().vocab_size, (batch_size, seq), generator=g).to(device())
               for _ in range(steps)]
    kwargs = {"lr": 1e-2, "weight_decay": 1.0}
    ref = frozen_tied_model(seed).to(device())
    ref_opt = torch.optim.AdamW(ref.parameters(), **kwargs)
    ref_losses = []
    for b in batches:
        ref_opt.zero_grad()
        loss = lm_loss(ref, b)
        loss.backward()
        ref_opt.step()
        ref_losses.append(loss.item())
    model = frozen_tied_model(seed + rank).to(device())
    dtype = getattr(torch, compute_dtype) if compute_dtype else None
    root = fully_shard(model, model.model.layers, compute_dtype=dtype)
    opt = torch.optim.AdamW(root.parameters(), **kwargs)
    live, losses = [], []
    for b in batches:
        opt.zero_grad()
        loss = lm_loss(root, shard_batch(b, rank, world))
        after_forward = root.stats.settled()
        loss.backward()
        live.append((after_forward, root.stats.settled()))
        opt.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    units = [m for m in root.modules() if isinstance(m, FSDP)]          # the root first
    peak = root.stats.peak
    full = gathered_parameters(root)
    ref_params = dict(ref.named_parameters())
    trainable = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    frozen = [p for p in root.parameters() if not p.requires_grad]
    measured = {"weights": sum(nbytes(u.shard) for u in units), "gradients": sum(nbytes(u.shard.grad) for u in units),
                "optimizer": _state_bytes(opt)}
    est = zero_memory(trainable, 3, world, "fp32")
    return {"max_param_diff": max((full[n] - ref_params[n].float()).abs().max().item() for n in full),
            "names_checked": sorted(full) == sorted(n for n, p in ref.named_parameters() if p.requires_grad),
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "frozen_value": root.module.model.layers[1].module.input_layernorm.weight.detach().float().clone(),
            "tied": root.module.lm_head.weight is None,       # between forwards no module holds whole weights
            "units": len(units), "live_after": live, "peak_gathered": peak,
            "largest_layer_bytes": max(nbytes(u.shard) * world for u in units[1:]) // (1 if dtype is None else 2),
            "root_bytes": nbytes(units[0].shard) * world // (1 if dtype is None else 2),
            "measured": measured, "frozen_bytes": sum(nbytes(p) for p in frozen),
            "estimate": est.as_dict(), "unsharded": zero_memory(trainable, 0, world, "fp32").as_dict(),
            "trainable_params": trainable}
