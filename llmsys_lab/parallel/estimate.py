"""Memory per device and bytes sent per step, per parallelism strategy and degree.

A plan is (tp, pp, dp, ZeRO stage, micro-batches). For a preset model and a global batch the
estimate gives, for the busiest pipeline stage:

* weights, gradients, optimizer state: the stage's parameters (its layers, split over tp; the
  embedding on the first stage and the LM head on the last, split over tp as Megatron's
  vocabulary-parallel layers do; norms replicated), sharded over dp by the ZeRO stage;
* activations: one micro-batch's saved tensors per layer (``estimators.memory``) divided by tp
  (an underestimate: without Megatron's sequence parallelism the norms' inputs and the residual
  stream are replicated), times the micro-batches in flight: m for GPipe, p for 1F1B's first stage;
* bytes sent per device per step: dp's ring all-reduce of the stage's gradients (2(d-1)/d; 3(d-1)/d
  with ZeRO-3, which all-gathers the weights twice), tp's four all-reduces of (tokens, hidden) per
  layer, pp's activations forward and gradients backward at each stage boundary.

The same formulas count what the implementations of this package measure on small models (tests).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..configs import ModelConfig
from ..estimators.memory import OPTIMIZER_BYTES, head_activation_bytes, layer_activation_bytes
from ..estimators.params import param_breakdown
from ..validate import ConfigError, check_int
from .comm import ring_factor
from .pipeline import SCHEDULES, peak_in_flight

PRECISIONS = {  # weight, gradient, activation bytes; fp32 master copy in the optimizer state
    "fp32": dict(w=4, g=4, act=4, master=0, act_precision="fp32"),
    "mixed": dict(w=4, g=4, act=2, master=0, act_precision="mixed"),      # fp32 weights, bf16 autocast
    "mixed-zero": dict(w=2, g=2, act=2, master=4, act_precision="mixed-zero"),
}


@dataclass(frozen=True)
class ParallelPlan:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    micro_batches: int = 1
    schedule: str = "1f1b"

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp

    def check(self, cfg: ModelConfig, batch: int) -> None:
        for name in ("tp", "pp", "dp", "micro_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if cfg.num_heads % self.tp or cfg.num_kv_heads % self.tp:
            raise ConfigError(f"{cfg.name}: tp = {self.tp} must divide the {cfg.num_heads} query heads and "
                              f"the {cfg.num_kv_heads} key/value heads")
        if cfg.intermediate_size % self.tp:
            raise ConfigError(f"{cfg.name}: tp = {self.tp} must divide intermediate_size {cfg.intermediate_size}")
        if cfg.num_layers % self.pp:
            raise ConfigError(f"{cfg.name}: pp = {self.pp} must divide the {cfg.num_layers} layers")
        if batch % (self.dp * self.micro_batches):
            raise ConfigError(f"global batch {batch} must split into dp = {self.dp} x {self.micro_batches} "
                              f"micro-batches of equal size")


@dataclass
class ParallelEstimate:
    plan: ParallelPlan
    params_per_device: float
    weights: float
    gradients: float
    optimizer: float
    activations: float
    dp_bytes: float
    tp_bytes: float
    pp_bytes: float

    @property
    def memory(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def communication(self) -> float:
        return self.dp_bytes + self.tp_bytes + self.pp_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "memory": self.memory, "communication": self.communication}


def stage_params(cfg: ModelConfig, tp: int, pp: int, stage: int) -> float:
    """Parameters held by one (tensor-parallel rank of one) pipeline stage."""
    parts = param_breakdown(cfg)
    L = cfg.num_layers
    norm = parts["norms"] / (2 * L + 1)
    per_layer = (parts["attention"] + parts["mlp"]) / L / tp + 2 * norm
    n = per_layer * L / pp
    if stage == 0:
        n += parts["embedding"] / tp + parts["positions"]
    if stage == pp - 1:
        n += norm + (parts["lm_head"] / tp if parts["lm_head"] else (parts["embedding"] / tp if pp > 1 else 0))
    return n


def estimate_parallel(cfg: ModelConfig, batch: int, seq: int, plan: ParallelPlan = ParallelPlan(),
                      precision: str = "mixed-zero", optimizer: str = "adamw") -> ParallelEstimate:
    """The busiest device of `plan` training `cfg` on a global batch of `batch` sequences of `seq` tokens."""
    check_int(batch, "batch (global batch, sequences)", minimum=1)
    check_int(seq, "seq (tokens per sequence)", minimum=1)
    plan.check(cfg, batch)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if optimizer not in OPTIMIZER_BYTES:
        raise ConfigError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_BYTES)}")
    pr = PRECISIONS[precision]
    tp, pp, dp, m = plan.tp, plan.pp, plan.dp, plan.micro_batches
    mb = batch // (dp * m)                                   # sequences per micro-batch
    in_flight = peak_in_flight(plan.schedule, pp, m)
    best = None
    for stage in sorted({0, pp - 1}):
        n = stage_params(cfg, tp, pp, stage)
        opt_b = OPTIMIZER_BYTES[optimizer] + pr["master"]
        weights = n * pr["w"] / (dp if plan.zero >= 3 else 1)
        grads = n * pr["g"] / (dp if plan.zero >= 2 else 1)
        opt = n * opt_b / (dp if plan.zero >= 1 else 1)
        acts = layer_activation_bytes(cfg, mb, seq, pr["act_precision"]) / tp * cfg.num_layers / pp * in_flight[stage]
        if stage == pp - 1:
            acts += head_activation_bytes(cfg, mb, seq, pr["act_precision"]) * in_flight[stage]
        tokens = batch // dp * seq                             # this device's tokens per step
        dp_bytes = (3 / 2 if plan.zero == 3 else 1) * ring_factor(dp) * n * pr["g"]
        tp_bytes = 4 * ring_factor(tp) * tokens * cfg.hidden_size * pr["act"] * cfg.num_layers / pp
        boundaries = (stage < pp - 1) + (stage > 0)
        pp_bytes = boundaries * tokens * cfg.hidden_size * pr["act"] if pp > 1 else 0.0
        est = ParallelEstimate(plan, n, weights, grads, opt, acts, dp_bytes, tp_bytes, pp_bytes)
        if best is None or est.memory > best.memory:
            best = est
    return best


def strategy_table(cfg: ModelConfig, batch: int, seq: int, plans: list[ParallelPlan],
                   precision: str = "mixed-zero") -> str:
    """One row per plan: memory per device (GiB) by part, and GiB sent per device per step."""
    g = 2 ** 30
    head = (f"{'plan':<26} {'params/dev':>11} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} "
            f"{'total':>7} | {'dp':>6} {'tp':>6} {'pp':>6} GiB sent/step")
    rows = [f"{cfg.name}, global batch {batch} x {seq} tokens, {precision} AdamW; memory in GiB per device", head]
    for p in plans:
        e = estimate_parallel(cfg, batch, seq, p, precision)
        name = f"tp{p.tp} pp{p.pp} dp{p.dp} zero{p.zero} m{p.micro_batches}"
        rows.append(f"{name:<26} {e.params_per_device / 1e9:>10.2f}B {e.weights / g:>8.1f} {e.gradients / g:>7.1f} "
                    f"{e.optimizer / g:>7.1f} {e.activations / g:>7.1f} {e.memory / g:>7.1f} | "
                    f"{e.dp_bytes / g:>6.1f} {e.tp_bytes / g:>6.1f} {e.pp_bytes / g:>6.1f}")
    return "\n".join(rows)


# ---- command line: `python -m llmsys_lab estimate MODEL --tp 2 --pp 2 --dp 2` -----------------
def add_arguments(parser) -> None:
    """The parallelism flags of the estimate command."""
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel degree")
    parser.add_argument("--zero", type=int, default=0, help="ZeRO stage (0-3)")
    parser.add_argument("--micro-batches", type=int, default=1, help="pipeline micro-batches")


def report_from_args(cfg: ModelConfig, args) -> str | None:
    """The strategy table for the CLI flags, or None when no parallelism was asked for. The global batch
    is --batch as given (it must split into dp x micro-batches: it is never changed silently) and the
    precision --precision (default mixed-zero: bf16 weights and gradients, fp32 master copy)."""
    plan = ParallelPlan(args.tp, args.pp, args.dp, args.zero, args.micro_batches)
    if plan.devices == 1 and plan.zero == 0 and plan.micro_batches == 1:
        return None
    return strategy_table(cfg, args.batch, args.seq, [plan], getattr(args, "precision", None) or "mixed-zero")
