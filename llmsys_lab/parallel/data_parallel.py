"""Data parallelism: every rank holds the whole model and a slice of the batch.

Each rank computes the gradient of *its* micro-batch; averaging the gradients over the ranks gives
the gradient of the whole batch (the loss is a mean over equal-sized slices), so after the same
optimizer step every replica holds the parameters single-device training would have produced.
Two ways to average:

* **all-reduce** (``data_parallel_step``): one collective over a flat buffer of all gradients
  (one bucket), every rank sends 2(N-1)/N x the gradient bytes. This is the lesson's first, naive
  step: nothing is sent until the whole backward pass is done. ``ddp.DDP`` is the real thing
  (rank 0's weights broadcast at the start, per-parameter hooks that launch asynchronous
  all-reduces of buckets while the backward pass runs).
* **parameter server** (``parameter_server_step``): workers send gradients to rank 0, which
  averages, updates and sends the new parameters back. Each worker sends S bytes but the server
  sends (N-1) x S and receives as much: its link is the bottleneck as N grows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..configs import ModelConfig
from ..model import LlamaLM
from ..validate import ShapeError
from .comm import Traffic, all_reduce, check_same_shape, nbytes
from .launcher import device
from .ring import ring_all_reduce


def tiny_config(**changes) -> ModelConfig:
    """A Llama-shaped model small enough for several CPU ranks in a test (GQA, RoPE, SwiGLU)."""
    base = dict(name="parallel-tiny", hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                intermediate_size=64, vocab_size=64, max_position_embeddings=64)
    return ModelConfig(**{**base, **changes})


def frozen_tied_model(seed: int = 0, **changes):
    """The checks' model with what real training has: the LM head tied to the embedding (one
    parameter used twice), layer 0's up projection frozen and layer 1's input norm frozen at 2.0
    (requires_grad=False: no gradient, no optimizer step, no weight decay)."""
    torch.manual_seed(seed)
    model = LlamaLM(tiny_config(tie_word_embeddings=True, **changes))
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    norm = model.model.layers[1].input_layernorm.weight
    with torch.no_grad():
        norm.fill_(2.0)
    norm.requires_grad_(False)
    return model


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over every predicted token of the batch."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def shard_batch(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank's contiguous slice of the batch; the slices must be equal for mean-of-means = mean."""
    from .comm import check_rank

    rank, world = check_rank(rank, world)
    if batch.shape[0] % world:
        raise ShapeError(f"batch of {batch.shape[0]} sequences does not split evenly over {world} ranks")
    return batch.chunk(world)[rank]


def flat_grads(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def set_flat_grads(params, flat: torch.Tensor) -> None:
    i = 0
    for p in params:
        p.grad.copy_(flat[i:i + p.numel()].view_as(p))
        i += p.numel()


@torch.no_grad()
def sgd_update(params, lr: float) -> None:
    for p in params:
        p.add_(p.grad, alpha=-lr)


def data_parallel_step(model, batch: torch.Tensor, lr: float = 0.1, traffic: Traffic | None = None,
                       reduce: str = "all_reduce") -> float:
    """One SGD step on this rank's slice of `batch` (the full batch, same on every rank); returns the mean loss.

    The naive data-parallel step: backward, then one all-reduce of every gradient (see ``ddp.DDP`` for
    the overlapped, bucketed version).

    reduce: "all_reduce" (the library's collective) or "ring" (``ring.ring_all_reduce``, send/recv only).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    check_same_shape(batch, "the global batch")
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=False)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    loss = lm_loss(model, shard_batch(batch, rank, world))
    loss.backward()
    flat = flat_grads(params)                                      # one bucket
    if reduce == "ring":
        ring_all_reduce(flat, traffic, check=False)
    elif reduce == "all_reduce":
        all_reduce(flat, traffic)
    else:
        raise ValueError(f"reduce must be 'all_reduce' or 'ring', got {reduce!r}")
    set_flat_grads(params, flat / world)                           # sum of means / N = mean over the batch
    sgd_update(params, lr)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return mean_loss.item() / world


def parameter_server_step(model, batch: torch.Tensor, lr: float = 0.1, traffic: Traffic | None = None,
                          server: int = 0) -> float:
    """The same step with rank `server` as parameter server (it also computes its own slice)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, shard_batch(batch, rank, world))
    loss.backward()
    grad = flat_grads(params)
    flat_p = torch.cat([p.detach().reshape(-1) for p in params])
    if rank == server:
        total = grad.clone()
        incoming = torch.empty_like(grad)
        for src in range(world):                                   # N-1 gradients arrive at one node
            if src != server:
                dist.recv(incoming, src)
                total += incoming
        set_flat_grads(params, total / world)
        sgd_update(params, lr)
        flat_p = torch.cat([p.detach().reshape(-1) for p in params])
        for dst in range(world):                                   # and N-1 parameter copies leave it
            if dst != server:
                dist.send(flat_p, dst)
                if traffic is not None:
                    traffic.add("ps_send_params", nbytes(flat_p))
    else:
        dist.send(grad, server)
        if traffic is not None:
            traffic.add("ps_send_grads", nbytes(grad))
        dist.recv(flat_p, server)
        with torch.no_grad():
            i = 0
            for p in params:
                p.copy_(flat_p[i:i + p.numel()].view_as(p))
                i += p.numel()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return mean_loss.item() / world


def reference_step(cfg: ModelConfig, batch: torch.Tensor, lr: float = 0.1, seed: int = 0):
    """Single-process training on the whole batch: the result data parallelism must reproduce."""
    torch.manual_seed(seed)
    model = LlamaLM(cfg).to(batch.device)
    loss = lm_loss(model, batch)
    loss.backward()
    sgd_update(list(model.parameters()), lr)
    return model, loss.item()


def max_param_diff(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# ---- run on ranks ----------------------------------------------------------------------------
def check_data_parallel(batch_size: int = 4, seq: int = 9, lr: float = 0.1, seed: int = 0) -> dict:
    """On every rank: DP (all-reduce), DP (ring) and parameter-server steps vs the single-process step."""
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed + 1)
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq), generator=g).to(device())
    ref, ref_loss = reference_step(cfg, batch, lr, seed)
    out = {}
    for name in ("all_reduce", "ring", "parameter_server"):
        torch.manual_seed(seed)
        model = LlamaLM(cfg).to(batch.device)
        traffic = Traffic()
        if name == "parameter_server":
            loss = parameter_server_step(model, batch, lr, traffic)
        else:
            loss = data_parallel_step(model, batch, lr, traffic, reduce=name)
        out[name] = {"max_param_diff": max_param_diff(model, ref), "loss_diff": abs(loss - ref_loss),
                     "bytes_sent": traffic.total}
    out["grad_bytes"] = 4 * sum(p.numel() for p in ref.parameters())
    return out
