"""MoE models in numbers: total vs active parameters, FLOPs per token, and the slide's argument.

Lecture 003: "MLP params dominate LLMs; params x N/2 increase drastically; memory: parameter related
x N/2; compute: only increase mildly". An MoE model with E experts of which k are active per token
stores E/k times the MLP parameters of a dense model with the same per-token compute; ``dense_vs_moe``
puts the two side by side.

Counts are exact: tests compare them with transformers' ``MixtralForCausalLM`` and
``Qwen2MoeForCausalLM`` built on the meta device, and the matmul FLOPs with ``FlopCounterMode`` on a
small real model (routing is data-dependent, so FLOPs are counted on real tensors; the total does not
depend on the routing: every token runs exactly k experts).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..configs import ModelConfig
from ..moe import MoEConfig
from ..validate import ConfigError
from .flops import FlopRow, forward_flops_table
from .params import param_breakdown


@dataclass(frozen=True)
class MoEModelConfig:
    """A decoder whose every block's MLP is an MoE layer. ``base`` holds everything else (attention,
    embedding, norms); its ``intermediate_size`` is not used. qkv_bias: biases on q/k/v only (Qwen2-MoE)."""

    base: ModelConfig
    moe: MoEConfig
    qkv_bias: bool = False
    arch: str = "mixtral"                 # transformers class of the reference: mixtral or qwen2_moe
    name: str = "custom-moe"

    def __post_init__(self):
        if self.moe.hidden_size != self.base.hidden_size:
            raise ConfigError(f"moe.hidden_size = {self.moe.hidden_size} but base.hidden_size = {self.base.hidden_size}")
        if self.arch not in ("mixtral", "qwen2_moe"):
            raise ConfigError(f"MoEModelConfig.arch must be 'mixtral' or 'qwen2_moe', got {self.arch!r}")
        if self.arch == "mixtral" and (self.moe.shared_expert_size or self.qkv_bias or not self.moe.norm_topk_prob):
            raise ConfigError("a Mixtral has no shared expert, no qkv bias and renormalised top-k weights")
        if self.arch == "qwen2_moe" and not self.moe.shared_expert_size:
            raise ConfigError("a Qwen2-MoE has a shared expert: set moe.shared_expert_size")

    def to_hf(self):
        """The transformers config of this shape (for meta-device reference models)."""
        b, m = self.base, self.moe
        common = dict(hidden_size=b.hidden_size, num_hidden_layers=b.num_layers, num_attention_heads=b.num_heads,
                      num_key_value_heads=b.num_kv_heads, vocab_size=b.vocab_size, num_experts_per_tok=m.top_k,
                      max_position_embeddings=b.max_position_embeddings, rms_norm_eps=b.rms_norm_eps,
                      rope_theta=b.rope_theta, tie_word_embeddings=b.tie_word_embeddings)
        if self.arch == "mixtral":
            from transformers import MixtralConfig
            return MixtralConfig(intermediate_size=m.intermediate_size, num_local_experts=m.num_experts,
                                 head_dim=b.head_dim, **common)
        from transformers import Qwen2MoeConfig
        return Qwen2MoeConfig(moe_intermediate_size=m.intermediate_size, num_experts=m.num_experts,
                              shared_expert_intermediate_size=m.shared_expert_size, intermediate_size=b.intermediate_size,
                              norm_topk_prob=m.norm_topk_prob, qkv_bias=self.qkv_bias, **common)


def _mlp_params(moe: MoEConfig, active: bool) -> int:
    h, i = moe.hidden_size, moe.intermediate_size
    experts = moe.top_k if active else moe.num_experts
    n = h * moe.num_experts + experts * 3 * h * i            # router + routed experts
    if moe.shared_expert_size:
        n += 3 * h * moe.shared_expert_size + h              # shared SwiGLU + its sigmoid gate
    return n


def moe_param_breakdown(cfg: MoEModelConfig) -> dict[str, int]:
    """Parameters by component, ``total`` (stored) and ``active`` (used by one token)."""
    dense = param_breakdown(cfg.base)
    L, b = cfg.base.num_layers, cfg.base
    parts = {k: dense[k] for k in ("embedding", "attention", "norms", "lm_head")}
    if cfg.qkv_bias:
        parts["attention"] += L * (b.num_heads + 2 * b.num_kv_heads) * b.head_dim
    parts["router"] = L * cfg.moe.num_experts * b.hidden_size
    parts["experts"] = L * (_mlp_params(cfg.moe, False) - parts["router"] // L)
    parts["total"] = sum(parts.values())
    parts["active"] = parts["total"] - L * (_mlp_params(cfg.moe, False) - _mlp_params(cfg.moe, True))
    return parts


def moe_forward_flops_table(cfg: MoEModelConfig, batch: int = 1, seq: int = 4096, causal: bool = False,
                            past: int = 0) -> list[FlopRow]:
    """The dense table's attention, norm, residual and LM-head rows, with the MLP rows replaced by the MoE's.
    past: tokens already in the KV cache (decode: seq=1, past=context), as in ``forward_flops_table``."""
    rows = [r for r in forward_flops_table(cfg.base, batch, seq, causal, past=past) if r.category != "mlp"]
    b, s, h, m = batch, seq, cfg.base.hidden_size, cfg.moe
    i, k, E = m.intermediate_size, m.top_k, m.num_experts
    moe_rows = [
        FlopRow("router", "mlp", "(b, s, E)", "2bshE", 2 * b * s * h * E, True, True),
        FlopRow("router softmax", "mlp", "(b, s, E)", "3bsE", 3 * b * s * E, True, False),
        FlopRow("k experts: gate & up", "mlp", "(b s k, i)", "k * 4bshi", k * 4 * b * s * h * i, True, True),
        FlopRow("k experts: Swish & product", "mlp", "(b s k, i)", "k * 5bsi", k * 5 * b * s * i, True, False),
        FlopRow("k experts: down", "mlp", "(b s k, h)", "k * 2bshi", k * 2 * b * s * h * i, True, True),
        FlopRow("weight and combine", "mlp", "(b, s, h)", "2kbsh", 2 * k * b * s * h, True, False),
    ]
    if m.shared_expert_size:
        si = m.shared_expert_size
        moe_rows += [
            FlopRow("shared expert", "mlp", "(b, s, h)", "6bsh i_s", 6 * b * s * h * si, True, True),
            FlopRow("shared expert Swish & product", "mlp", "(b, s, i_s)", "5bs i_s", 5 * b * s * si, True, False),
            FlopRow("shared gate", "mlp", "(b, s, 1)", "2bsh", 2 * b * s * h, True, True),
            FlopRow("shared gate sigmoid & add", "mlp", "(b, s, h)", "2bsh", 2 * b * s * h, True, False),
        ]
    at = next(n for n, r in enumerate(rows) if r.category == "residual" and "MLP" in r.op)
    return rows[:at] + moe_rows + rows[at:]


def moe_forward_flops(cfg: MoEModelConfig, batch: int = 1, seq: int = 4096, causal: bool = False,
                      matmul_only: bool = False) -> int:
    return sum(r.total(cfg.base.num_layers) for r in moe_forward_flops_table(cfg, batch, seq, causal)
               if r.matmul or not matmul_only)


def expected_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts that `tokens` tokens route to in one layer, each token choosing
    k of the E experts uniformly at random: E (1 - (1 - k/E)^tokens). One token touches exactly k; a
    few dozen tokens already touch nearly all E, so a batched decode step reads every expert's weights.
    (A real router is not uniform; this is the model of the estimate, not a measurement.)"""
    if tokens < 0:
        raise ConfigError(f"tokens must be >= 0, got {tokens}")
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def moe_weight_bytes_read(cfg: MoEModelConfig, tokens: int, dtype: str = "bf16") -> float:
    """Weight bytes one forward step over `tokens` tokens reads: everything but the routed experts, plus the
    experts those tokens are expected to touch (``expected_experts_touched``) in every layer."""
    from .memory import dtype_bytes

    p, m, L = moe_param_breakdown(cfg), cfg.moe, cfg.base.num_layers
    per_expert = 3 * m.hidden_size * m.intermediate_size
    routed = L * m.num_experts * per_expert
    touched = L * expected_experts_touched(m.num_experts, m.top_k, tokens) * per_expert
    return (p["total"] - routed + touched) * dtype_bytes(dtype)


def moe_prefill_cost(cfg: MoEModelConfig, batch: int, prompt: int, dtype: str = "bf16"):
    """Roofline cost of a prefill (as ``roofline.prefill_cost``): the experts the prompt tokens touch are read."""
    from .memory import kv_bytes_per_token
    from .roofline import StepCost

    moved = moe_weight_bytes_read(cfg, batch * prompt, dtype) + batch * prompt * kv_bytes_per_token(cfg.base, dtype)
    return StepCost("prefill", moe_forward_flops(cfg, batch, prompt, causal=True), moved)


def moe_decode_cost(cfg: MoEModelConfig, batch: int, context: int, dtype: str = "bf16"):
    """Roofline cost of one decode step (as ``roofline.decode_cost``): `batch` new tokens touch
    E (1 - (1 - k/E)^batch) experts per layer; every sequence's KV cache is read."""
    from .memory import kv_bytes_per_token
    from .roofline import StepCost

    rows = moe_forward_flops_table(cfg, batch, 1, causal=True, past=context)
    flops = sum(r.total(cfg.base.num_layers) for r in rows)
    moved = moe_weight_bytes_read(cfg, batch, dtype) + batch * (context + 1) * kv_bytes_per_token(cfg.base, dtype)
    return StepCost("decode", flops, moved)


def dense_equivalent(cfg: MoEModelConfig) -> ModelConfig:
    """The dense model with the same per-token MLP compute: one SwiGLU of k * i (+ the shared expert)."""
    m = cfg.moe
    return cfg.base.replace(intermediate_size=m.top_k * m.intermediate_size + m.shared_expert_size,
                            name=f"dense-equivalent-of-{cfg.name}")


def dense_vs_moe(cfg: MoEModelConfig, seq: int = 4096, weight_bytes_per_param: int = 2,
                 training_bytes_per_param: int = 16) -> dict[str, dict[str, float]]:
    """The slide's argument as numbers: params, memory and FLOPs/token of the MoE model and of a dense
    model of equal active compute. Memory: weights at ``weight_bytes_per_param`` (bf16: 2) and
    mixed-precision Adam training state at ``training_bytes_per_param`` (16: bf16 weight and gradient,
    fp32 master weight and two moments), both proportional to *stored* parameters."""
    dense = dense_equivalent(cfg)
    p_moe, p_dense = moe_param_breakdown(cfg), param_breakdown(dense)
    out = {}
    for name, total, active, flops in (
            ("dense", p_dense["total"], p_dense["total"], _fwd(dense, seq)),
            ("moe", p_moe["total"], p_moe["active"], moe_forward_flops(cfg, 1, seq) / seq)):
        out[name] = {"params": total, "active_params": active, "mlp_params": (p_dense["mlp"] if name == "dense"
                                                                             else p_moe["experts"] + p_moe["router"]),
                     "weight_GB": total * weight_bytes_per_param / 1e9,
                     "training_state_GB": total * training_bytes_per_param / 1e9,
                     "forward_flops_per_token": flops}
    out["ratio"] = {k: out["moe"][k] / out["dense"][k] for k in out["moe"]}
    return out


def _fwd(cfg: ModelConfig, seq: int) -> float:
    from .flops import forward_flops
    return forward_flops(cfg, 1, seq) / seq


def format_dense_vs_moe(table: dict) -> str:
    lines = [f"{'':<26}{'dense':>14}{'MoE':>14}{'MoE/dense':>11}"]
    for key in table["moe"]:
        d, m, r = table["dense"][key], table["moe"][key], table["ratio"][key]
        fmt = "{:>14.2f}" if key.endswith("GB") else "{:>14.3e}"
        lines.append(f"{key:<26}" + fmt.format(d) + fmt.format(m) + f"{r:>11.2f}")
    return "\n".join(lines)


MOE_PRESETS = {
    "mixtral-8x7b": MoEModelConfig(
        ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                    vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
                    arch="mistral", name="mixtral-8x7b"),
        MoEConfig(4096, 14336, num_experts=8, top_k=2), arch="mixtral", name="mixtral-8x7b"),
    # Qwen1.5-MoE-A2.7B: 60 fine-grained experts (4 active) plus a shared expert, q/k/v biases
    "qwen1.5-moe-a2.7b": MoEModelConfig(
        ModelConfig(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=5632,
                    vocab_size=151936, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1e6,
                    name="qwen1.5-moe-a2.7b"),
        MoEConfig(2048, 1408, num_experts=60, top_k=4, norm_topk_prob=False, shared_expert_size=5632),
        qkv_bias=True, arch="qwen2_moe", name="qwen1.5-moe-a2.7b"),
}
