"""Sequence parallelism for attention: each rank holds T/N tokens of every sequence.

The MLP acts on every token alone, so a sequence shard needs no communication there. Attention
mixes tokens, and there are two ways to give each rank what it needs:

* **DeepSpeed-Ulysses** (Jacobs et al., 2023): partition the sequence in the MLP and the *heads*
  in attention. An all-to-all turns (B, H, T/N, D) into (B, H/N, T, D): every rank then has the
  whole sequence for H/N heads, runs ordinary attention, and a second all-to-all turns the result
  back. Each all-to-all moves (N-1)/N of a rank's tensor; needs N to divide the (K/V) heads.
* **Ring Attention** (Liu et al., 2023): partition the sequence in both. Queries stay put; the K/V
  blocks travel around the ring, N-1 hops. Each rank attends its queries to the block it holds,
  keeping the running max m and sum l of the softmax, and merges the partial results with the
  log-sum-exp merge of FlashAttention (``flash.merge_stats``, lesson 06). Under a causal mask a
  block of later tokens is skipped, but it must still be passed on. In the backward pass the blocks
  go around again, collecting the gradients of K and V, and one more hop brings those home.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..attention import repeat_kv, scaled_dot_product_attention
from ..flash import block_stats, merge_stats
from ..validate import ConfigError, check_tensor
from .comm import Traffic, all_to_all, check_rank, check_same_shape, check_sizes, nbytes
from .launcher import device


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, traffic):
        ctx.dims, ctx.traffic = (scatter_dim, gather_dim), traffic
        return all_to_all(x, scatter_dim, gather_dim, traffic, kind="ulysses_all_to_all")

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        # the gradient goes back the way the data came: split where it was gathered
        return all_to_all(grad, gather_dim, scatter_dim, ctx.traffic, kind="ulysses_all_to_all_backward"), \
            None, None, None


def seq_to_heads(x: torch.Tensor, traffic: Traffic | None = None) -> torch.Tensor:
    """(B, H, T/N, D) sequence-sharded -> (B, H/N, T, D) head-sharded (one all-to-all, differentiable)."""
    return _AllToAll.apply(x, 1, 2, traffic)


def heads_to_seq(x: torch.Tensor, traffic: Traffic | None = None) -> torch.Tensor:
    """(B, H/N, T, D) -> (B, H, T/N, D)."""
    return _AllToAll.apply(x, 2, 1, traffic)


def _check_shards(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, "B H T_local D")
        check_same_shape(t, f"the local {name} shard")


def ulysses_attention(q, k, v, causal: bool = True, traffic: Traffic | None = None) -> torch.Tensor:
    """Attention over the whole sequence from sequence shards q (B, H, T/N, D), k, v (B, H_kv, T/N, D)."""
    _check_shards(q, k, v)
    world = dist.get_world_size()
    for name, heads in (("query heads", q.shape[1]), ("key/value heads", k.shape[1])):
        if heads % world:
            raise ConfigError(f"Ulysses splits the {name} over the ranks: {heads} heads do not divide "
                              f"into {world} ranks (use Ring Attention, or a degree that divides the heads)")
    qh, kh, vh = (seq_to_heads(t, traffic) for t in (q, k, v))        # (B, H/N, T, D)
    out = scaled_dot_product_attention(qh, kh, vh, causal=causal)        # the kit's attention
    return heads_to_seq(out, traffic)                                     # (B, H, T/N, D)


def _partial(q, k, v, scale, mask):
    """This block's contribution: unnormalised output, row max m and row sum l of exp(s - m)."""
    s = (q @ k.transpose(-1, -2)) * scale                                 # (B, H, Tq, Tk)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m, l = block_stats(s)
    p = torch.exp(s - m[..., None])
    return p @ v, m, l


def _ring_forward(q, k, v, causal, traffic):
    """Output (B, H, T/N, D) and the log-sum-exp of every query row (kept for the backward pass)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    right, left = (rank + 1) % world, (rank - 1) % world
    n_rep = q.shape[1] // k.shape[1]
    t_local = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    kv = torch.stack((k, v)).contiguous()                                 # travels as one message
    o = m = l = None
    for step in range(world):
        j = (rank - step) % world                                         # whose tokens we hold now
        if step < world - 1:                                              # start passing it on
            incoming = torch.empty_like(kv)
            req = dist.isend(kv, right)
            if traffic is not None:
                traffic.add("ring_attention_kv", nbytes(kv))
        if not (causal and j > rank):                                     # later tokens: invisible
            ob, mb, lb = _partial(q, repeat_kv(kv[0], n_rep), repeat_kv(kv[1], n_rep), scale,
                                  _block_mask(causal, j, rank, t_local, q.device))
            if o is None:
                o, m, l = ob, mb, lb
            else:
                m_new, l = merge_stats(m, l, mb, lb)                      # lesson 06's merge
                o = torch.exp(m - m_new)[..., None] * o + torch.exp(mb - m_new)[..., None] * ob
                m = m_new
        if step < world - 1:
            dist.recv(incoming, left)
            req.wait()
            kv = incoming
    return o / l[..., None], m + torch.log(l)


def _block_mask(causal, j, rank, t_local, dev):
    """Causal mask between this rank's queries and rank j's keys (None: every key visible)."""
    if causal and j == rank:
        return torch.ones(t_local, t_local, dtype=torch.bool, device=dev).tril()
    return None


class _RingAttention(torch.autograd.Function):
    """Backward: the K/V blocks go around the ring again, each carrying the gradient of its K and V
    accumulated by every rank it visits; one more hop brings the gradients home. The softmax is
    rebuilt from the saved log-sum-exp, as in FlashAttention's backward pass."""

    @staticmethod
    def forward(ctx, q, k, v, causal, traffic):
        out, lse = _ring_forward(q, k, v, causal, traffic)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.traffic = causal, traffic
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        world, rank = dist.get_world_size(), dist.get_rank()
        right, left = (rank + 1) % world, (rank - 1) % world
        b, h_kv, t_local, d = k.shape
        n_rep = q.shape[1] // h_kv
        scale = 1.0 / math.sqrt(d)
        delta = (dout * out).sum(-1, keepdim=True)                        # (B, H, T, 1)
        dq = torch.zeros_like(q)
        msg = torch.stack((k, v, torch.zeros_like(k), torch.zeros_like(v))).contiguous()   # k, v, dk, dv
        for step in range(world):
            j = (rank - step) % world
            if not (ctx.causal and j > rank):
                kk, vv = repeat_kv(msg[0], n_rep), repeat_kv(msg[1], n_rep)          # (B, H, T, D)
                s = (q @ kk.transpose(-1, -2)) * scale
                mask = _block_mask(ctx.causal, j, rank, t_local, q.device)
                if mask is not None:
                    s = s.masked_fill(~mask, float("-inf"))
                p = torch.exp(s - lse[..., None])                                      # the softmax
                dp = dout @ vv.transpose(-1, -2)
                ds = p * (dp - delta)
                dq += (ds @ kk) * scale
                dk = (ds.transpose(-1, -2) @ q) * scale                                # (B, H, T, D)
                dv = p.transpose(-1, -2) @ dout
                msg[2] += dk.view(b, h_kv, n_rep, t_local, d).sum(2)                   # GQA: sum the group
                msg[3] += dv.view(b, h_kv, n_rep, t_local, d).sum(2)
            incoming = torch.empty_like(msg)                                           # N hops: back home
            req = dist.isend(msg, right)
            if ctx.traffic is not None:
                ctx.traffic.add("ring_attention_backward", nbytes(msg))
            dist.recv(incoming, left)
            req.wait()
            msg = incoming
        return dq, msg[2], msg[3], None, None


def ring_attention(q, k, v, causal: bool = True, traffic: Traffic | None = None) -> torch.Tensor:
    """Attention over the whole sequence from sequence shards, K/V passed around the ring.

    Rank r holds tokens [r T/N, (r+1) T/N) of q (B, H, T/N, D), k and v (B, H_kv, T/N, D).
    Differentiable: the backward pass sends the K/V blocks around the ring once more with their
    gradients.
    """
    _check_shards(q, k, v)
    return _RingAttention.apply(q, k, v, causal, traffic)


def shard_sequence(x: torch.Tensor, rank: int, world: int, dim: int = 2) -> torch.Tensor:
    if x.shape[dim] % world:
        raise ConfigError(f"sequence of {x.shape[dim]} tokens does not split into {world} equal shards")
    rank, world = check_rank(rank, world)
    return x.chunk(world, dim=dim)[rank]


def ulysses_bytes(local_numel_qkvo: tuple, world: int, bytes_per_el: int = 4) -> float:
    """Forward bytes a rank sends: four all-to-alls (q, k, v in, output back), (N-1)/N of each."""
    check_sizes(world=world, bytes_per_el=bytes_per_el, **{f"local_numel_qkvo[{i}]": n for i, n in enumerate(local_numel_qkvo)})
    return sum((world - 1) / world * n * bytes_per_el for n in local_numel_qkvo)


def ring_attention_bytes(local_kv_numel: int, world: int, bytes_per_el: int = 4) -> float:
    """Forward bytes a rank sends: its K and V block, passed on N-1 times."""
    check_sizes(local_kv_numel=local_kv_numel, world=world, bytes_per_el=bytes_per_el)
    return (world - 1) * 2 * local_kv_numel * bytes_per_el


# ---- run on ranks --------------------------------------------------------------------------------
def check_sequence_parallel(batch: int = 2, heads: int = 4, kv_heads: int = 2, seq: int = 12, dim: int = 8,
                            seed: int = 0) -> dict:
    """On every rank: Ulysses and Ring Attention (outputs and gradients) vs full attention."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=g)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g)
    v = torch.randn(batch, kv_heads, seq, dim, generator=g)
    r = torch.randn(batch, heads, seq, dim, generator=g)
    q, k, v, r = (t.to(device()) for t in (q, k, v, r))
    out = {}
    for causal in (False, True):
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = scaled_dot_product_attention(*full, causal=causal)
        (ref * r).sum().backward()
        local = [shard_sequence(t, rank, world).clone().requires_grad_() for t in (q, k, v)]
        traffic = Traffic()
        uly = ulysses_attention(*local, causal=causal, traffic=traffic)
        (uly * shard_sequence(r, rank, world)).sum().backward()
        ring_traffic = Traffic()
        ring_in = [t.detach().clone().requires_grad_() for t in local]
        ring = ring_attention(*ring_in, causal=causal, traffic=ring_traffic)
        forward_bytes = ring_traffic.total
        (ring * shard_sequence(r, rank, world)).sum().backward()
        ref_local = shard_sequence(ref.detach(), rank, world)
        tag = "causal" if causal else "full"
        out[f"ulysses_{tag}_err"] = (uly - ref_local).abs().max().item()
        out[f"ulysses_{tag}_grad_err"] = max((shard_sequence(f.grad, rank, world) - t.grad).abs().max().item()
                                             for f, t in zip(full, local))
        out[f"ring_{tag}_err"] = (ring - ref_local).abs().max().item()
        out[f"ring_{tag}_grad_err"] = max((shard_sequence(f.grad, rank, world) - t.grad).abs().max().item()
                                          for f, t in zip(full, ring_in))
        out[f"ulysses_{tag}_bytes"] = (traffic.bytes["ulysses_all_to_all"], ulysses_bytes(
            (local[0].numel(), local[1].numel(), local[2].numel(), uly.numel()), world))
        out[f"ring_{tag}_bytes"] = (forward_bytes, ring_attention_bytes(local[1].numel(), world))
    return out
