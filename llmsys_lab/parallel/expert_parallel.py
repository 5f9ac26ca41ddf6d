"""Expert parallelism (GShard / Switch) and, for comparison, tensor parallelism of one MoE layer.

Expert parallelism (EP): the E experts are split over N ranks (E/N each); every rank holds its own
tokens and a copy of the router. A forward pass is

1. route locally: each token picks its k experts;
2. dispatch: one all-to-all sends every (token, expert) assignment to the rank that owns the
   expert. All-to-all moves equal-sized pieces, so each rank packs a buffer (E, C, h) with C the
   largest number of assignments any rank sends to any one expert (found with one tiny all-reduce
   of the counts; nothing is dropped) and zero rows as padding;
3. each rank runs its E/N experts on what arrived (N C rows per expert);
4. combine: a second all-to-all returns the results to the tokens' ranks, which weight and add them.

Backward runs the two all-to-alls in reverse (an all-to-all's gradient is an all-to-all). The router
(and a shared expert) are replicated, so their gradients are summed over ranks as in data parallelism.

Tensor parallelism (TP) of the same layer ("what if we still do TP?" on the slide): every rank holds
all tokens, the router, and a column/row slice of *every* expert's SwiGLU (gate/up by columns, down by
rows, Megatron style). Each rank computes partial sums of all experts' outputs; weighting by the
router is linear, so one all-reduce of the combined (T, h) output finishes the forward pass (one more
for the input gradient in backward). The router's weight gradient is then partial on each rank
(it multiplies a partial output) and needs one small all-reduce of (E, h).

``check_moe_parallel`` runs both against the single-process ``MoE`` layer and counts the bytes.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..moe import MoE, MoEConfig, grouped_swiglu, route, sort_by_expert
from ..validate import ConfigError, ShapeError, check_tensor
from .comm import Traffic, all_to_all, check_sizes, nbytes, ring_factor
from .tensor_parallel import copy_to_tp, reduce_from_tp


class _AllToAll(torch.autograd.Function):
    """all_to_all along dim 0 (piece j to rank j); its gradient is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx, x, traffic, kind):
        ctx.traffic, ctx.kind = traffic, kind
        return all_to_all(x, 0, 0, traffic, kind=kind)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad.contiguous(), 0, 0, ctx.traffic, kind=ctx.kind + "_backward"), None, None


def all_to_all_autograd(x: torch.Tensor, traffic: Traffic | None = None, kind: str = "ep_all_to_all"):
    return _AllToAll.apply(x, traffic, kind)


def _check_moe(moe) -> MoEConfig:
    if not isinstance(moe, MoE):
        raise TypeError(f"expected a llmsys_lab.moe.MoE layer, got {type(moe).__name__}")
    if not moe.config.softmax_routing:
        raise ConfigError("the parallel MoE layers route as Mixtral / Qwen2-MoE (softmax, gated shared expert): "
                          "DeepSeek-V3's sigmoid, grouped or biased routing is single-process only here")
    return moe.config


class ExpertParallelMoE(nn.Module):
    """This rank's part of an ``MoE`` layer: experts [r E/N, (r+1) E/N), router (and shared expert) copied."""

    def __init__(self, moe: MoE, rank: int, world: int, traffic: Traffic | None = None):
        super().__init__()
        cfg = _check_moe(moe)
        if cfg.num_experts % world:
            raise ConfigError(f"num_experts = {cfg.num_experts} is not divisible by the expert-parallel "
                              f"world size {world}")
        if cfg.capacity_factor is not None:
            raise ConfigError("ExpertParallelMoE is dropless (capacity_factor=None); a capacity limit per rank "
                              "would drop different tokens than the single-process layer")
        self.config, self.rank, self.world, self.traffic = cfg, rank, world, traffic
        self.local = cfg.num_experts // world
        self.gate = copy.deepcopy(moe.gate)
        self.experts = nn.ModuleList(copy.deepcopy(moe.experts[rank * self.local + e]) for e in range(self.local))
        if cfg.shared_expert_size:
            self.shared_expert = copy.deepcopy(moe.shared_expert)
            self.shared_expert_gate = copy.deepcopy(moe.shared_expert_gate)
        self.last_capacity = self.last_assignments = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N_local, h) this rank's tokens -> (N_local, h)."""
        check_tensor(x, "x", "tokens hidden")
        c, E, h = self.config, self.config.num_experts, self.config.hidden_size
        if x.shape[1] != h:
            raise ShapeError(f"x has {x.shape[1]} features, the MoE layer expects {h}")
        routing = route(x, self.gate.weight, c.top_k, c.norm_topk_prob)
        token, slot, counts = sort_by_expert(routing, E)                 # assignments grouped by expert
        cap = counts.max().clone()
        dist.all_reduce(cap, op=dist.ReduceOp.MAX)                      # C: the largest count anywhere
        if self.traffic is not None:
            self.traffic.add("ep_count_all_reduce", ring_factor(self.world) * nbytes(cap))
        cap = max(int(cap), 1)
        self.last_capacity, self.last_assignments = cap, int(counts.sum())
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts)        # (A,) sorted
        start = torch.cumsum(counts, 0) - counts
        row = expert * cap + torch.arange(len(expert), device=x.device) - start[expert]   # slot in (E, C)
        send = x.new_zeros(E * cap, h).index_copy(0, row, x[token]).view(E, cap, h)      # (E, C, h)
        recv = all_to_all_autograd(send, self.traffic, "ep_dispatch")   # (N * E/N, C, h): [src, local e]
        recv = recv.view(self.world, self.local, cap, h)
        outs = [self.experts[e](recv[:, e].reshape(-1, h)).view(self.world, 1, cap, h) for e in range(self.local)]
        done = torch.cat(outs, dim=1).view(self.world * self.local, cap, h)
        back = all_to_all_autograd(done, self.traffic, "ep_combine").reshape(E * cap, h)  # (E C, h) ours
        ys = back[row] * routing.weights.reshape(-1)[slot, None]
        out = torch.zeros_like(x).index_add(0, token, ys)
        if c.shared_expert_size:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class TensorParallelMoE(nn.Module):
    """This rank's part of an ``MoE`` layer under TP: columns [r i/N, (r+1) i/N) of every expert."""

    def __init__(self, moe: MoE, rank: int, world: int, traffic: Traffic | None = None):
        super().__init__()
        cfg = _check_moe(moe)
        for what, size in (("intermediate_size", cfg.intermediate_size), ("shared_expert_size", cfg.shared_expert_size)):
            if size % world:
                raise ConfigError(f"{what} = {size} is not divisible by the tensor-parallel degree {world}")
        if cfg.capacity_factor is not None:
            raise ConfigError("TensorParallelMoE is written for the dropless layer (capacity_factor=None)")
        self.config, self.traffic = cfg, traffic
        n = cfg.intermediate_size // world
        cols = slice(rank * n, (rank + 1) * n)
        self.gate = copy.deepcopy(moe.gate)
        self.gate_w = nn.Parameter(torch.stack([m.gate_proj.weight[cols] for m in moe.experts]).detach().clone())
        self.up_w = nn.Parameter(torch.stack([m.up_proj.weight[cols] for m in moe.experts]).detach().clone())
        self.down_w = nn.Parameter(torch.stack([m.down_proj.weight[:, cols] for m in moe.experts]).detach().clone())
        if cfg.shared_expert_size:
            s = cfg.shared_expert_size // world
            sc = slice(rank * s, (rank + 1) * s)
            se = moe.shared_expert
            self.shared_gate_w = nn.Parameter(se.gate_proj.weight[sc].detach().clone())     # (s/N, h)
            self.shared_up_w = nn.Parameter(se.up_proj.weight[sc].detach().clone())
            self.shared_down_w = nn.Parameter(se.down_proj.weight[:, sc].detach().clone())  # (h, s/N)
            self.shared_expert_gate = copy.deepcopy(moe.shared_expert_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, h), the same tokens on every rank -> (N, h)."""
        check_tensor(x, "x", "tokens hidden")
        c = self.config
        x = copy_to_tp(x, self.traffic)                                  # f: all-reduce of dx in backward
        routing = route(x, self.gate.weight, c.top_k, c.norm_topk_prob)
        token, slot, counts = sort_by_expert(routing, c.num_experts)
        ys = grouped_swiglu(x[token], counts.tolist(), self.gate_w, self.up_w, self.down_w)  # partial sums
        partial = torch.zeros_like(x).index_add(0, token, ys * routing.weights.reshape(-1)[slot, None])
        if c.shared_expert_size:
            s = F.linear(F.silu(F.linear(x, self.shared_gate_w)) * F.linear(x, self.shared_up_w), self.shared_down_w)
            partial = partial + torch.sigmoid(self.shared_expert_gate(x)) * s
        return reduce_from_tp(partial, self.traffic)                     # g: one all-reduce of (N, h)

    def sync_replicated_grads(self) -> None:
        """The router (and shared gate) multiply partial outputs: their gradients are partial sums."""
        for p in [self.gate.weight] + ([self.shared_expert_gate.weight] if self.config.shared_expert_size else []):
            dist.all_reduce(p.grad)
            if self.traffic is not None:
                self.traffic.add("tp_router_grad_all_reduce", ring_factor(dist.get_world_size()) * nbytes(p.grad))


def ep_bytes(num_experts: int, cap: int, hidden: int, world: int, bytes_per_el: int = 4,
             backward: bool = True) -> float:
    """Bytes each rank sends in the (E, C, h) all-to-alls: 2 forward (dispatch, combine), 2 more backward."""
    check_sizes(num_experts=num_experts, cap=cap, hidden=hidden, world=world, bytes_per_el=bytes_per_el)
    return (4 if backward else 2) * (world - 1) / world * num_experts * cap * hidden * bytes_per_el


def tp_moe_bytes(tokens: int, hidden: int, world: int, bytes_per_el: int = 4, backward: bool = True) -> float:
    """Bytes each rank sends under TP: one all-reduce of (T, h) forward, one more backward."""
    check_sizes(tokens=tokens, hidden=hidden, world=world, bytes_per_el=bytes_per_el)
    return (2 if backward else 1) * ring_factor(world) * tokens * hidden * bytes_per_el


# ---- run on ranks ----------------------------------------------------------------------------
def check_moe_parallel(tokens: int = 24, hidden: int = 16, intermediate: int = 24, num_experts: int = 4,
                       top_k: int = 2, shared: int = 8, seed: int = 0) -> dict:
    """On every rank: EP and TP of one MoE layer against the single-process layer (outputs, gradients, bytes)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if tokens % world:
        raise ConfigError(f"tokens = {tokens} must split evenly over {world} ranks")
    torch.manual_seed(seed)                       # same layer and data on every rank
    ref = MoE(MoEConfig(hidden, intermediate, num_experts, top_k, norm_topk_prob=False, shared_expert_size=shared))
    x = torch.randn(tokens, hidden)
    r = torch.randn(tokens, hidden)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * r).sum().backward()
    out = {}
    mine = slice(rank * tokens // world, (rank + 1) * tokens // world)

    # expert parallel: this rank's tokens, this rank's experts
    traffic = Traffic()
    ep = ExpertParallelMoE(ref, rank, world, traffic)
    xe = x[mine].clone().requires_grad_()
    y = ep(xe)
    (y * r[mine]).sum().backward()
    for p in [ep.gate.weight] + list(ep.shared_expert.parameters()) + [ep.shared_expert_gate.weight]:
        dist.all_reduce(p.grad)                   # replicated weights: data-parallel gradient sum
    first = rank * ep.local
    out["ep"] = {
        "forward_err": (y - y_ref[mine]).abs().max().item(),
        "input_grad_err": (xe.grad - xr.grad[mine]).abs().max().item(),
        "router_grad_err": (ep.gate.weight.grad - ref.gate.weight.grad).abs().max().item(),
        "shared_grad_err": (ep.shared_expert.down_proj.weight.grad
                            - ref.shared_expert.down_proj.weight.grad).abs().max().item(),
        "expert_grad_err": max((getattr(ep.experts[e], n).weight.grad
                                - getattr(ref.experts[first + e], n).weight.grad).abs().max().item()
                               for e in range(ep.local) for n in ("gate_proj", "up_proj", "down_proj")),
        "capacity": ep.last_capacity,
        "bytes": dict(traffic.bytes), "calls": dict(traffic.calls),
        "bytes_expected": ep_bytes(num_experts, ep.last_capacity, hidden, world),
        "assignments": ep.last_assignments,          # real rows among the E * C rows of the buffer
    }

    # tensor parallel: all tokens, a slice of every expert
    traffic = Traffic()
    tp = TensorParallelMoE(ref, rank, world, traffic)
    xt = x.clone().requires_grad_()
    y = tp(xt)
    (y * r).sum().backward()
    tp.sync_replicated_grads()
    n = intermediate // world
    cols = slice(rank * n, (rank + 1) * n)
    out["tp"] = {
        "forward_err": (y - y_ref).abs().max().item(),
        "input_grad_err": (xt.grad - xr.grad).abs().max().item(),
        "router_grad_err": (tp.gate.weight.grad - ref.gate.weight.grad).abs().max().item(),
        "expert_grad_err": max(
            (tp.gate_w.grad - torch.stack([m.gate_proj.weight.grad[cols] for m in ref.experts])).abs().max().item(),
            (tp.up_w.grad - torch.stack([m.up_proj.weight.grad[cols] for m in ref.experts])).abs().max().item(),
            (tp.down_w.grad - torch.stack([m.down_proj.weight.grad[:, cols] for m in ref.experts])).abs().max().item()),
        "bytes": dict(traffic.bytes), "calls": dict(traffic.calls),
        "bytes_expected": tp_moe_bytes(tokens, hidden, world),
    }
    return out


def compare_ep_tp(cfg: MoEConfig, tokens: int, world: int, capacity_factor: float = 1.0,
                  bytes_per_el: int = 2) -> dict:
    """The slide's "what if we still do TP?" for one MoE layer and a global batch of `tokens`, per rank,
    forward + backward. EP: each rank routes tokens/N tokens; its (E, C, h) buffers hold C =
    ceil(capacity_factor * (tokens/N) * k / E) rows per expert (capacity_factor 1: perfectly balanced
    routing; the dropless layer pays for the busiest expert). TP: every rank sees all tokens and
    multiplies (rows, h) x (h, i/N) slices, so each expert's GEMM gets N times narrower."""
    if tokens % world:
        raise ConfigError(f"tokens = {tokens} must split evenly over {world} ranks")
    if cfg.num_experts % world:
        raise ConfigError(f"num_experts = {cfg.num_experts} is not divisible by the expert-parallel world size {world}")
    if cfg.intermediate_size % world:
        raise ConfigError(f"intermediate_size = {cfg.intermediate_size} is not divisible by the tensor-parallel "
                          f"degree {world}")
    from ..moe import capacity as expert_capacity
    cap = expert_capacity(tokens // world, cfg.num_experts, cfg.top_k, capacity_factor)
    rows_per_expert = tokens * cfg.top_k // cfg.num_experts            # balanced routing, whole batch
    return {
        "ep": {"bytes": ep_bytes(cfg.num_experts, cap, cfg.hidden_size, world, bytes_per_el),
               "capacity": cap, "experts_per_rank": cfg.num_experts // world,
               "gemm": (world * cap, cfg.hidden_size, cfg.intermediate_size)},
        "tp": {"bytes": tp_moe_bytes(tokens, cfg.hidden_size, world, bytes_per_el),
               "experts_per_rank": cfg.num_experts,
               "gemm": (rows_per_expert, cfg.hidden_size, cfg.intermediate_size // world)},
    }
