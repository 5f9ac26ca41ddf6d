"""Forward and training FLOPs as the lecture's per-operation table.

Conventions (lecture 000):
* a (m x n) @ (n x h) matmul costs 2 m n h FLOPs;
* softmax over s scores costs 3 FLOPs per score (exp, sum, divide), RoPE 3 per feature,
  Swish 4 per element, RMSNorm 4 per element + 2 per row, a residual add 1 per element;
* non-causal attention computes all s^2 scores; causal counting keeps only the s(s+1)/2
  query-key pairs a causal kernel needs to compute (FlashAttention skips the rest);
* training = forward + backward = 3 x forward (each matmul's backward computes two
  matmuls of the same size: the gradient with respect to its input and to its weight).

Totals in the lecture (Llama-2-7B, b = 1, s = 4096) and what this module gives:
forward ~63 TFLOPs; the training breakdown also counts the embedding as a one-hot matmul
(2 b s h v), which ``embedding_as_matmul=True`` reproduces: 192.18 TFLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..configs import ModelConfig
from ..validate import ConfigError


@dataclass(frozen=True)
class FlopRow:
    op: str
    category: str          # attention, mlp, norm, residual, embedding, lm_head
    shape: str             # output shape
    formula: str           # in the lecture's letters: b s h n d i v (k = kv heads)
    flops: int             # for one occurrence (one layer, or once for the model)
    per_layer: bool
    matmul: bool           # counted by torch.utils.flop_counter.FlopCounterMode

    def total(self, num_layers: int) -> int:
        return self.flops * (num_layers if self.per_layer else 1)


def _check(b: int, s: int) -> None:
    for name, v in (("batch", b), ("seq", s)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{name} must be a positive int, got {v!r}")


def forward_flops_table(cfg: ModelConfig, batch: int = 1, seq: int = 4096, causal: bool = False,
                        embedding_as_matmul: bool = False, past: int = 0) -> list[FlopRow]:
    """One row per operation of a forward pass over `batch` sequences of `seq` new tokens.

    past: tokens already in a KV cache that the new tokens also attend to (decode: seq=1,
    past=context). Their K/V are not recomputed; only the attention scores against them are.
    """
    _check(batch, seq)
    if not isinstance(past, int) or past < 0:
        raise ConfigError(f"past must be a non-negative int, got {past!r}")
    b, s, h, n, d, k = batch, seq, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.num_kv_heads
    i, v = cfg.intermediate_size, cfg.vocab_size
    # query-key pairs per (sequence, head): every new query sees the cache, plus new keys
    pairs = s * past + (s * (s + 1) // 2 if causal else s * s)
    if past:
        pair_f = "s(p+(s+1)/2)" if causal else "s(p+s)"
    else:
        pair_f = "s(s+1)/2" if causal else "s^2"
    gqa = k != n
    rows = [
        FlopRow("Q/K/V projections", "attention", "(b, s, h)",
                "2bsh(nd + 2kd)" if gqa else "3 * 2bsh^2", 2 * b * s * h * (n * d + 2 * k * d), True, True),
    ]
    if cfg.positions == "rope":
        rows.append(FlopRow("RoPE", "attention", "(b, n, s, d)", "3bsnd", 3 * b * s * n * d, True, False))
    rows += [
        FlopRow("QK^T", "attention", "(b, n, s, s)", f"2b{pair_f}nd", 2 * b * n * d * pairs, True, True),
        FlopRow("softmax", "attention", "(b, n, s, s)", f"3b{pair_f}n", 3 * b * n * pairs, True, False),
        FlopRow("PV", "attention", "(b, n, s, d)", f"2b{pair_f}nd", 2 * b * n * d * pairs, True, True),
        FlopRow("output projection", "attention", "(b, s, h)", "2bsh^2" if n * d == h else "2bs(nd)h",
                2 * b * s * n * d * h, True, True),
        FlopRow("residual (attention)", "residual", "(b, s, h)", "bsh", b * s * h, True, False),
    ]
    if cfg.activation == "swiglu":
        rows += [
            FlopRow("gate & up projections", "mlp", "(b, s, i)", "2 * 2bshi", 4 * b * s * h * i, True, True),
            FlopRow("Swish", "mlp", "(b, s, i)", "4bsi", 4 * b * s * i, True, False),
            FlopRow("element-wise product", "mlp", "(b, s, i)", "bsi", b * s * i, True, False),
        ]
    else:
        act = {"relu": (1, "bsi"), "gelu": (8, "8bsi")}[cfg.activation]
        rows += [
            FlopRow("up projection", "mlp", "(b, s, i)", "2bshi", 2 * b * s * h * i, True, True),
            FlopRow(cfg.activation.upper(), "mlp", "(b, s, i)", act[1], act[0] * b * s * i, True, False),
        ]
    norm_name, norm_f, norm_flops = (("RMSNorm", "4bsh + 2bs", 4 * b * s * h + 2 * b * s) if cfg.norm == "rmsnorm"
                                     else ("LayerNorm", "5bsh + 2bs", 5 * b * s * h + 2 * b * s))
    rows += [
        FlopRow("down projection", "mlp", "(b, s, h)", "2bshi", 2 * b * s * h * i, True, True),
        FlopRow("residual (MLP)", "residual", "(b, s, h)", "bsh", b * s * h, True, False),
        FlopRow(f"{norm_name} x 2", "norm", "(b, s, h)", f"2 * ({norm_f})", 2 * norm_flops, True, False),
        FlopRow(f"final {norm_name}", "norm", "(b, s, h)", norm_f, norm_flops, False, False),
        FlopRow("LM head", "lm_head", "(b, s, v)", "2bshv", 2 * b * s * h * v, False, True),
    ]
    if embedding_as_matmul:
        rows.insert(0, FlopRow("embedding (one-hot matmul)", "embedding", "(b, s, h)", "2bshv",
                               2 * b * s * h * v, False, False))
    return rows


def total_flops(rows: list[FlopRow], cfg: ModelConfig, matmul_only: bool = False) -> int:
    return sum(r.total(cfg.num_layers) for r in rows if r.matmul or not matmul_only)


def forward_flops(cfg: ModelConfig, batch: int = 1, seq: int = 4096, causal: bool = False) -> int:
    return total_flops(forward_flops_table(cfg, batch, seq, causal), cfg)


def training_flops(cfg: ModelConfig, batch: int = 1, seq: int = 4096, causal: bool = False,
                   embedding_as_matmul: bool = True) -> int:
    """Forward + backward = 3 x forward."""
    return 3 * total_flops(forward_flops_table(cfg, batch, seq, causal, embedding_as_matmul), cfg)


def flop_distribution(rows: list[FlopRow], cfg: ModelConfig) -> dict[str, float]:
    """Share of each category in percent (the lecture's 'FLOP distribution by layer')."""
    total = total_flops(rows, cfg)
    shares: dict[str, float] = {}
    for r in rows:
        shares[r.category] = shares.get(r.category, 0.0) + 100.0 * r.total(cfg.num_layers) / total
    return shares


def format_flops_table(rows: list[FlopRow], cfg: ModelConfig) -> str:
    lines = [f"{'operation':<28}{'output shape':<14}{'FLOPs formula':<18}{'per layer / once':>18}{'total':>12}"]
    for r in rows:
        lines.append(f"{r.op:<28}{r.shape:<14}{r.formula:<18}{r.flops:>18.3e}{r.total(cfg.num_layers):>12.3e}")
    lines.append(f"{'total':<78}{total_flops(rows, cfg):>12.3e}")
    return "\n".join(lines)


def slide_training_breakdown(cfg: ModelConfig, batch: int = 1, seq: int = 4096) -> dict[str, int]:
    """Training FLOPs per layer type in the convention of lecture 000's "FLOP distribution" slide.

    Training = 3 x forward. Per layer: attention 6bsh^2 + 4bs^2h + 3bs^2n + 2bsh^2 (no RoPE);
    MLP 6bshi + 2bsi (Swish and the element-wise product together); two RMSNorms of 4bsh + 2bs;
    residuals 4bsh. Once: a final RMSNorm, the embedding and the LM head at 2bshv each. This
    reproduces the slide's 192.17 TFLOPs and all six shares to three decimals for Llama-2-7B.
    The kit's ``forward_flops_table`` counts the element-wise terms as the slide's own per-operation
    table does (Swish 4bsi + product bsi, RoPE 3bsnd, a residual add bsh each) and so differs in the
    last digit of two shares (MLP 55.364% vs 55.361%, residual 0.002% vs 0.003%).
    """
    _check(batch, seq)
    if cfg.norm != "rmsnorm" or cfg.activation != "swiglu":
        raise ConfigError("the slide's convention is for LLaMA blocks (RMSNorm, SwiGLU)")
    b, s, h, n, i, v, N = batch, seq, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.vocab_size, \
        cfg.num_layers
    norm = 4 * b * s * h + 2 * b * s
    forward = {
        "embedding": 2 * b * s * h * v,
        "norm": N * 2 * norm + norm,
        "residual": N * 4 * b * s * h,
        "attention": N * (6 * b * s * h * h + 4 * b * s * s * h + 3 * b * s * s * n + 2 * b * s * h * h),
        "mlp": N * (6 * b * s * h * i + 2 * b * s * i),
        "lm_head": 2 * b * s * h * v,
    }
    return {k: 3 * x for k, x in forward.items()}
