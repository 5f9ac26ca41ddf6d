"""DeepSeek-V3 in numbers: its published shape, parameters (total, activated, MTP), FLOPs, memory.

Shape (DeepSeek-V3 technical report, arXiv 2412.19437, section 4.2 "Hyper-parameters"): 61 layers,
hidden 7168, the first 3 layers dense (SwiGLU of 18432), the other 58 MoE layers of 1 shared + 256
routed experts of 2048, 8 activated per token, each token sent to at most 4 nodes (8 groups of 32
experts); MLA with 128 heads of 128 (+ a 64-dim decoupled RoPE key), a 512-dim KV latent and a
1536-dim query latent; vocabulary 129,280; one multi-token prediction (MTP) module.

The counts are exact: tests compare ``param_breakdown`` with transformers' ``DeepseekV3ForCausalLM``
built on the meta device. That model has *no* MTP module (transformers skips checkpoint layer 61 when
loading), and its ``e_score_correction_bias`` is a buffer, not a parameter; both are counted here
separately. The report's 671B total / 37B activated is the main model; "685B" on the model card is
the main model plus the MTP module (14B there, because the checkpoint stores its own copies of the
embedding and output head, which the MTP module shares with the main model).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..configs import ModelConfig
from ..estimators.memory import dtype_bytes
from ..moe import MoEConfig
from ..validate import ConfigError
from .mla import MLAConfig


def _v3_moe() -> MoEConfig:
    return MoEConfig(7168, 2048, num_experts=256, top_k=8, norm_topk_prob=True, shared_expert_size=2048,
                     score="sigmoid", routed_scaling=2.5, num_groups=8, topk_groups=4, shared_expert_gated=False,
                     selection_bias=True)


@dataclass(frozen=True)
class DeepSeekV3Shape:
    """The whole model: MLA in every layer, dense SwiGLU in the first ``first_dense`` layers, MoE after."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    num_layers: int = 61
    first_dense: int = 3
    dense_intermediate: int = 18432
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=_v3_moe)
    num_mtp: int = 1
    rms_norm_eps: float = 1e-6
    name: str = "deepseek-v3"

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "num_layers", "dense_intermediate"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"DeepSeekV3Shape.{f} must be a positive int, got {v!r}")
        if not isinstance(self.first_dense, int) or not 0 <= self.first_dense <= self.num_layers:
            raise ConfigError(f"DeepSeekV3Shape.first_dense must be an int in [0, num_layers = {self.num_layers}], "
                              f"got {self.first_dense!r}")
        if not isinstance(self.num_mtp, int) or self.num_mtp < 0:
            raise ConfigError(f"DeepSeekV3Shape.num_mtp must be an int >= 0, got {self.num_mtp!r}")
        if self.mla.hidden_size != self.hidden_size or self.moe.hidden_size != self.hidden_size:
            raise ConfigError(f"mla.hidden_size = {self.mla.hidden_size} and moe.hidden_size = "
                              f"{self.moe.hidden_size} must equal hidden_size = {self.hidden_size}")

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense

    def to_hf(self):
        """transformers' ``DeepseekV3Config`` of this shape (default RoPE)."""
        m = self.moe
        return self.mla.to_hf(
            vocab_size=self.vocab_size, num_hidden_layers=self.num_layers, first_k_dense_replace=self.first_dense,
            intermediate_size=self.dense_intermediate, moe_intermediate_size=m.intermediate_size,
            n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k,
            n_shared_experts=m.shared_expert_size // m.intermediate_size, n_group=m.num_groups,
            topk_group=m.topk_groups, routed_scaling_factor=m.routed_scaling, norm_topk_prob=m.norm_topk_prob,
            num_mtp_layers=self.num_mtp, rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=False)

    @classmethod
    def from_hf(cls, hf, name: str = "from_hf") -> "DeepSeekV3Shape":
        if getattr(hf, "model_type", "") != "deepseek_v3":
            raise ConfigError(f"DeepSeekV3Shape.from_hf needs a deepseek_v3 config, got {getattr(hf, 'model_type', hf)!r}")
        if hf.moe_intermediate_size * hf.n_shared_experts == 0:
            raise ConfigError("DeepSeekV3Shape expects at least one shared expert")
        return cls(hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.first_k_dense_replace,
                   hf.intermediate_size, MLAConfig.from_hf(hf), MoEConfig.from_hf(hf),
                   getattr(hf, "num_mtp_layers", 0), hf.rms_norm_eps, name)

    def replace(self, **changes) -> "DeepSeekV3Shape":
        from dataclasses import replace
        return replace(self, **changes)


DEEPSEEK_V3 = DeepSeekV3Shape()


# ---- parameters ------------------------------------------------------------------------------
def mla_params(c: MLAConfig) -> int:
    h, n = c.hidden_size, c.num_heads
    b = int(c.attention_bias)
    if c.q_lora_rank is None:
        q = h * n * c.qk_head_dim
    else:
        q = h * c.q_lora_rank + b * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * n * c.qk_head_dim
    kv = h * c.cache_width + b * c.cache_width + c.kv_lora_rank + c.kv_lora_rank * n * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + n * c.v_head_dim * h + b * h


def _moe_layer(m: MoEConfig, active: bool) -> dict[str, int]:
    h, i = m.hidden_size, m.intermediate_size
    return {"router": m.num_experts * h,
            "routed_experts": (m.top_k if active else m.num_experts) * 3 * h * i,
            "shared_experts": 3 * h * m.shared_expert_size + (h if m.shared_expert_gated and m.shared_expert_size else 0)}


def param_breakdown(s: DeepSeekV3Shape) -> dict[str, int]:
    """Parameters of the main model by component, ``total`` and ``active`` (used by one token: k of the
    routed experts; the embedding row and everything else in full), and the MTP module separately."""
    h, L, Ld, Lm = s.hidden_size, s.num_layers, s.first_dense, s.moe_layers
    moe_all, moe_act = _moe_layer(s.moe, False), _moe_layer(s.moe, True)
    parts = {
        "embedding": s.vocab_size * h,
        "attention": L * mla_params(s.mla),
        "dense_mlp": Ld * 3 * h * s.dense_intermediate,
        "router": Lm * moe_all["router"],
        "routed_experts": Lm * moe_all["routed_experts"],
        "shared_experts": Lm * moe_all["shared_experts"],
        "norms": (2 * L + 1) * h,
        "lm_head": s.vocab_size * h,
    }
    parts["total"] = sum(parts.values())
    parts["active"] = parts["total"] - Lm * (moe_all["routed_experts"] - moe_act["routed_experts"])
    parts["selection_bias_buffer"] = Lm * s.moe.num_experts if s.moe.selection_bias else 0
    mtp = mtp_params(s)
    parts["mtp"] = s.num_mtp * mtp["unique"]
    parts["mtp_active"] = s.num_mtp * mtp["unique_active"]
    parts["mtp_checkpoint"] = s.num_mtp * mtp["checkpoint"]
    return parts


def mtp_params(s: DeepSeekV3Shape) -> dict[str, int]:
    """One MTP module (report, section 2.2): two RMSNorms (of the previous depth's hidden state and of the
    next token's embedding), a projection M (h x 2h), one Transformer block (MLA + MoE), a final norm; the
    embedding and the output head are the main model's. The released checkpoint stores copies of them
    in its layer 61 anyway ("checkpoint")."""
    h = s.hidden_size
    moe_all, moe_act = _moe_layer(s.moe, False), _moe_layer(s.moe, True)
    block = mla_params(s.mla) + 2 * h
    own = 2 * h + 2 * h * h + h                                   # enorm, hnorm, eh_proj, shared_head.norm
    unique = own + block + sum(moe_all.values())
    return {"unique": unique, "unique_active": own + block + sum(moe_act.values()),
            "checkpoint": unique + 2 * s.vocab_size * h}


def hf_param_count(s: DeepSeekV3Shape) -> dict[str, int]:
    """What transformers' model holds, counted on the meta device (no memory): parameters and buffers."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(s.to_hf())
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for n, b in model.named_buffers() if "e_score_correction_bias" in n)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return {"parameters": params, "selection_bias_buffer": buffers, "routed_experts": experts,
            "layers": len(model.model.layers)}


# ---- FLOPs -----------------------------------------------------------------------------------
def forward_flops_per_token(s: DeepSeekV3Shape, context: int = 4096) -> dict[str, float]:
    """Matmul FLOPs of one token's forward pass, 2 per multiply-add: the weights it multiplies by (2 x the
    activated parameters without the embedding lookup and the RMSNorm weights, which scale element-wise)
    plus attention against `context` keys (the materialised path: QK^T over d_h + d_h^R, PV over d_v,
    every head and layer). Equal to ``FlopCounterMode`` on transformers' model (tests)."""
    if not isinstance(context, int) or context < 0:
        raise ConfigError(f"context must be an int >= 0, got {context!r}")
    p, c = param_breakdown(s), s.mla
    norms = p["norms"] + s.num_layers * ((c.q_lora_rank or 0) + c.kv_lora_rank)
    weights = 2 * (p["active"] - p["embedding"] - norms)
    attention = s.num_layers * 2 * c.num_heads * context * (c.qk_head_dim + c.v_head_dim)
    return {"weights": weights, "attention": attention, "total": weights + attention}


def training_flops(s: DeepSeekV3Shape, tokens: float, seq: int = 4096, mtp: bool = True) -> float:
    """Forward + backward = 3 x forward, per token at the mean causal context (seq / 2), with the MTP
    module's own block and head when `mtp` (its embedding lookup costs nothing)."""
    per_token = forward_flops_per_token(s, seq // 2)["total"]
    if mtp:
        mp = mtp_params(s)
        per_token += s.num_mtp * (2 * mp["unique_active"] + 2 * s.vocab_size * s.hidden_size
                                  + 2 * s.mla.num_heads * (seq // 2) * (s.mla.qk_head_dim + s.mla.v_head_dim))
    return 3 * per_token * tokens


# ---- memory ----------------------------------------------------------------------------------
def kv_bytes_per_token(s: DeepSeekV3Shape, dtype: str = "bf16") -> float:
    """MLA's cache: (d_c + d_h^R) numbers per token and layer."""
    return s.num_layers * s.mla.cache_width * dtype_bytes(dtype)


def attention_variants(s: DeepSeekV3Shape) -> dict[str, ModelConfig]:
    """MHA, GQA (8 K/V heads) and MQA of the same 128 heads of d_h = 128, as lesson 03's ModelConfig
    (the kit's ``kv_bytes_per_token`` then counts their caches)."""
    c = s.mla
    base = ModelConfig(hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=c.num_heads,
                       head_dim=c.qk_nope_head_dim, intermediate_size=s.dense_intermediate,
                       vocab_size=s.vocab_size, name="deepseek-v3-mha")
    return {"MHA": base, "GQA-8": base.replace(num_kv_heads=8, name="deepseek-v3-gqa8"),
            "MQA": base.replace(num_kv_heads=1, name="deepseek-v3-mqa")}


def weight_bytes(s: DeepSeekV3Shape, dtype: str = "bf16", mtp: bool = False, block: int = 128) -> float:
    """Bytes of the main model's weights (and the MTP module's with `mtp`). In "fp8" the matmul weights of
    attention and MLPs take one byte and one fp32 scale per block x block tile (DeepSeek-V3 quantises
    weights in 128 x 128 blocks); embedding, head, norms and router stay bf16 (as in the released checkpoint)."""
    p = param_breakdown(s)
    total = p["total"] + (p["mtp"] if mtp else 0)
    if dtype != "fp8":
        return total * dtype_bytes(dtype)
    matmul = p["attention"] + p["dense_mlp"] + p["routed_experts"] + p["shared_experts"]
    if mtp:
        mp = mtp_params(s)
        matmul += s.num_mtp * (mp["unique"] - 4 * s.hidden_size - s.moe.num_experts * s.hidden_size)
    rest = total - matmul
    return matmul * (1 + 4 / block ** 2) + rest * 2


def training_state_bytes(s: DeepSeekV3Shape, recipe: str = "deepseek") -> float:
    """Bytes of weights, gradients and optimiser state (main model + MTP), before activations.
    "mixed-zero": the kit's lesson-02 recipe, 16 B/param (16-bit weight and gradient, fp32 master, m, v).
    "deepseek": the report's "low-precision storage" (section 3.3): master weights and gradients kept in
    fp32, AdamW's two moments in bf16: 4 + 4 + 2 + 2 = 12 B/param (the FP8 copies the GEMMs read are
    made on the fly and not counted)."""
    per_param = {"mixed-zero": 16, "deepseek": 12}
    if recipe not in per_param:
        raise ConfigError(f"recipe must be one of {', '.join(per_param)}, got {recipe!r}")
    p = param_breakdown(s)
    return (p["total"] + p["mtp"]) * per_param[recipe]


def max_batch(s: DeepSeekV3Shape, gpu_bytes: float, seq_len: int, devices: int = 1, dtype: str = "fp8",
              kv_dtype: str = "bf16", kv_per_token: float | None = None) -> int:
    """Lesson 02's ``max_batch``: sequences of `seq_len` whose KV cache fits next to the weights, the
    weights and caches spread over `devices` GPUs. kv_per_token: bytes per token (default: MLA's)."""
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ConfigError(f"seq_len must be a positive int, got {seq_len!r}")
    if not isinstance(devices, int) or devices <= 0:
        raise ConfigError(f"devices must be a positive int, got {devices!r}")
    usable = gpu_bytes * devices - weight_bytes(s, dtype)
    if usable <= 0:
        raise ConfigError(f"{s.name}: the weights ({weight_bytes(s, dtype) / 1e9:.0f} GB in {dtype}) do not fit in "
                          f"{devices} x {gpu_bytes / 1e9:.0f} GB")
    per_token = kv_bytes_per_token(s, kv_dtype) if kv_per_token is None else kv_per_token
    return int(usable // (per_token * seq_len))
