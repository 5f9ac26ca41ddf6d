"""Tensor (intra-operator) parallelism, Megatron-LM style (Shoeybi et al., 2019).

The slide's example, Y = X W1 W2: split W1 by columns and W2 by rows. Rank r computes
X W1[:, r] (its slice of the hidden features, no communication: X is replicated), then
(X W1[:, r]) W2[r, :], a partial sum of Y; one all-reduce adds the partial sums. Element-wise
functions between the two (GeLU, SwiGLU's product) act on each column slice independently, so
they need nothing either. Two conjugate operators mark the region (Megatron's f and g):

* ``copy_to_tp`` (f): identity forward, all-reduce of the input gradient backward;
* ``reduce_from_tp`` (g): all-reduce forward, identity backward.

A Llama block splits the same way: attention heads are independent, so q/k/v projections are
column-parallel by heads and the output projection is row-parallel; in the MLP gate and up are
column-parallel and down is row-parallel. One all-reduce of (B, T, hidden) after attention and
one after the MLP in the forward pass, two more (from f) in the backward pass.

Note: ``nn.Linear`` stores W^T (out, in): "columns of W" are rows of ``linear.weight``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..attention import scaled_dot_product_attention
from ..layers import LlamaBlock
from ..validate import ConfigError, ShapeError, check_tensor
from .comm import Traffic, check_int, check_rank, check_sizes, nbytes, ring_factor
from .launcher import device


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, traffic):
        ctx.traffic = traffic
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        if ctx.traffic is not None:
            ctx.traffic.add("tp_all_reduce_backward", ring_factor(dist.get_world_size()) * nbytes(grad))
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, traffic):
        x = x.contiguous().clone()
        dist.all_reduce(x)
        if traffic is not None:
            traffic.add("tp_all_reduce_forward", ring_factor(dist.get_world_size()) * nbytes(x))
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, traffic: Traffic | None = None) -> torch.Tensor:
    """f: enter a tensor-parallel region (identity; all-reduce of the gradient in backward)."""
    return _CopyToTP.apply(x, traffic)


def reduce_from_tp(x: torch.Tensor, traffic: Traffic | None = None) -> torch.Tensor:
    """g: leave a tensor-parallel region (all-reduce of the partial sums; identity in backward)."""
    return _ReduceFromTP.apply(x, traffic)


def _split(size: int, world: int, what: str) -> int:
    world = check_int(world, "world", minimum=1)
    if size % world:
        raise ConfigError(f"{what} = {size} is not divisible by the tensor-parallel degree {world}")
    return size // world


class ColumnParallelLinear(nn.Module):
    """y_r = x W[:, r]: this rank's slice of the output features (x replicated on every rank)."""

    def __init__(self, weight_shard: torch.Tensor, traffic: Traffic | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight_shard.detach().clone())      # (out / N, in)
        self.traffic = traffic

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, world: int, traffic=None, unit: int = 1):
        """Rows [rank * out/N, (rank+1) * out/N) of linear.weight; unit: keep groups of `unit` rows (a head) whole."""
        if linear.bias is not None:
            raise ConfigError("ColumnParallelLinear copies bias-free layers (the Llama block has no biases)")
        rank, world = check_rank(rank, world)
        out = _split(linear.out_features // unit, world, "output features / unit") * unit
        return cls(linear.weight[rank * out:(rank + 1) * out], traffic)

    def forward(self, x: torch.Tensor, enter_region: bool = True) -> torch.Tensor:
        check_tensor(x, "x")
        if x.shape[-1] != self.weight.shape[1]:
            raise ShapeError(f"x has {x.shape[-1]} features, the layer expects {self.weight.shape[1]}")
        if enter_region:
            x = copy_to_tp(x, self.traffic)
        return F.linear(x, self.weight)                                 # (..., out / N)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W[r, :]: this rank multiplies its slice of the input features; one all-reduce sums."""

    def __init__(self, weight_shard: torch.Tensor, traffic: Traffic | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight_shard.detach().clone())      # (out, in / N)
        self.traffic = traffic

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, world: int, traffic=None, unit: int = 1):
        if linear.bias is not None:
            raise ConfigError("RowParallelLinear copies bias-free layers (the Llama block has no biases)")
        rank, world = check_rank(rank, world)
        cols = _split(linear.in_features // unit, world, "input features / unit") * unit
        return cls(linear.weight[:, rank * cols:(rank + 1) * cols], traffic)

    def forward(self, x_shard: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        check_tensor(x_shard, "x_shard")
        if x_shard.shape[-1] != self.weight.shape[1]:
            raise ShapeError(f"x_shard has {x_shard.shape[-1]} features, this rank's slice of the "
                             f"layer expects {self.weight.shape[1]}")
        partial = F.linear(x_shard, self.weight)                        # (..., out): a partial sum
        return reduce_from_tp(partial, self.traffic) if reduce else partial


class TwoLayerTP(nn.Module):
    """The slide's Y = act(X W1) W2 with W1 split by columns and W2 by rows: one all-reduce forward."""

    def __init__(self, w1: nn.Linear, w2: nn.Linear, rank: int, world: int, traffic=None, act=F.gelu):
        super().__init__()
        self.w1 = ColumnParallelLinear.from_linear(w1, rank, world, traffic)
        self.w2 = RowParallelLinear.from_linear(w2, rank, world, traffic)
        self.act = act

    def forward(self, x):
        return self.w2(self.act(self.w1(x)))


class TensorParallelLlamaBlock(nn.Module):
    """This rank's part of a ``LlamaBlock``: heads [r H/N, (r+1) H/N) and MLP columns of rank r.

    The norms are replicated; RoPE and the attention function are the kit's (``layers``, ``attention``).
    """

    def __init__(self, block: LlamaBlock, rank: int, world: int, traffic: Traffic | None = None):
        super().__init__()
        cfg = block.config
        attn = block.self_attn
        self.local_heads = _split(cfg.num_heads, world, "num_heads")
        self.local_kv_heads = _split(cfg.num_kv_heads, world, "num_kv_heads")
        _split(cfg.intermediate_size, world, "intermediate_size")
        self.head_dim, self.traffic = cfg.head_dim, traffic
        self.input_layernorm = _copy_module(block.input_layernorm)
        self.post_attention_layernorm = _copy_module(block.post_attention_layernorm)
        d = cfg.head_dim
        self.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, rank, world, traffic, unit=d)
        self.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, rank, world, traffic, unit=d)
        self.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, rank, world, traffic, unit=d)
        self.o_proj = RowParallelLinear.from_linear(attn.o_proj, rank, world, traffic, unit=d)
        self.rope = attn.rope
        self.gate_proj = ColumnParallelLinear.from_linear(block.mlp.gate_proj, rank, world, traffic)
        self.up_proj = ColumnParallelLinear.from_linear(block.mlp.up_proj, rank, world, traffic)
        self.down_proj = RowParallelLinear.from_linear(block.mlp.down_proj, rank, world, traffic)

    def _heads(self, y, n):
        b, t, _ = y.shape
        return y.view(b, t, n, self.head_dim).transpose(1, 2)            # (B, H/N, T, D)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor(x, "x", "B T hidden")
        b, t, _ = x.shape
        if positions is None:
            positions = torch.arange(t, device=x.device)
        h_in = copy_to_tp(self.input_layernorm(x), self.traffic)                    # f
        q = self.rope(self._heads(self.q_proj(h_in, False), self.local_heads), positions)
        k = self.rope(self._heads(self.k_proj(h_in, False), self.local_kv_heads), positions)
        v = self._heads(self.v_proj(h_in, False), self.local_kv_heads)
        o = scaled_dot_product_attention(q, k, v, causal=True)                      # (B, H/N, T, D)
        h = x + self.o_proj(o.transpose(1, 2).reshape(b, t, -1))                    # g
        m_in = copy_to_tp(self.post_attention_layernorm(h), self.traffic)           # f
        return h + self.down_proj(F.silu(self.gate_proj(m_in, False)) * self.up_proj(m_in, False))   # g


def _copy_module(m: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(m)


def tp_bytes_per_layer(batch: int, seq: int, hidden: int, world: int, bytes_per_el: int = 4,
                       backward: bool = True) -> float:
    """Bytes each rank sends per Llama block: 2 all-reduces of (B, T, hidden) forward, 2 more backward."""
    check_sizes(batch=batch, seq=seq, hidden=hidden, world=world, bytes_per_el=bytes_per_el)
    n_reduce = 4 if backward else 2
    return n_reduce * ring_factor(world) * batch * seq * hidden * bytes_per_el


# ---- run on ranks ----------------------------------------------------------------------------
def _slices(full: torch.Tensor, rank: int, world: int, dim: int) -> torch.Tensor:
    return full.chunk(world, dim=dim)[rank]


def check_tensor_parallel(batch: int = 2, seq: int = 6, seed: int = 0) -> dict:
    """On every rank: the slide's two-layer MLP and a Llama block, tensor-parallel vs unsharded."""
    from .data_parallel import tiny_config

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config()
    torch.manual_seed(seed)
    out = {}
    # the slide: Y = X W1 W2
    dev = device()
    w1 = nn.Linear(cfg.hidden_size, 4 * cfg.hidden_size, bias=False).to(dev)
    w2 = nn.Linear(4 * cfg.hidden_size, cfg.hidden_size, bias=False).to(dev)
    x = torch.randn(batch, seq, cfg.hidden_size).to(dev)
    traffic = Traffic()
    tp = TwoLayerTP(w1, w2, rank, world, traffic)
    y_tp = tp(x)
    y_ref = w2(F.gelu(w1(x)))
    out["mlp_forward_err"] = (y_tp - y_ref).abs().max().item()
    out["mlp_forward_all_reduces"] = traffic.calls["tp_all_reduce_forward"]
    # the Llama block: outputs and gradients
    block = LlamaBlock(cfg).to(dev)
    traffic = Traffic()
    tpb = TensorParallelLlamaBlock(block, rank, world, traffic)
    x = torch.randn(batch, seq, cfg.hidden_size).to(dev)
    r = torch.randn(batch, seq, cfg.hidden_size).to(dev)
    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    (block(x_ref) * r).sum().backward()
    y = tpb(x_tp)
    (y * r).sum().backward()
    out["block_forward_err"] = (y - block(x)).abs().max().item()
    out["block_input_grad_err"] = (x_tp.grad - x_ref.grad).abs().max().item()
    pairs = {
        "q_proj": (block.self_attn.q_proj.weight.grad, tpb.q_proj.weight.grad, 0),
        "k_proj": (block.self_attn.k_proj.weight.grad, tpb.k_proj.weight.grad, 0),
        "v_proj": (block.self_attn.v_proj.weight.grad, tpb.v_proj.weight.grad, 0),
        "o_proj": (block.self_attn.o_proj.weight.grad, tpb.o_proj.weight.grad, 1),
        "gate_proj": (block.mlp.gate_proj.weight.grad, tpb.gate_proj.weight.grad, 0),
        "up_proj": (block.mlp.up_proj.weight.grad, tpb.up_proj.weight.grad, 0),
        "down_proj": (block.mlp.down_proj.weight.grad, tpb.down_proj.weight.grad, 1),
    }
    errs = {k: (_slices(full, rank, world, dim) - local).abs().max().item() for k, (full, local, dim) in pairs.items()}
    errs["input_layernorm"] = (block.input_layernorm.weight.grad - tpb.input_layernorm.weight.grad).abs().max().item()
    errs["post_attention_layernorm"] = (block.post_attention_layernorm.weight.grad
                                        - tpb.post_attention_layernorm.weight.grad).abs().max().item()
    out["block_weight_grad_err"] = errs
    out["block_bytes_sent"] = traffic.total
    out["block_bytes_expected"] = tp_bytes_per_layer(batch, seq, cfg.hidden_size, world)
    out["block_calls"] = dict(traffic.calls)
    return out
