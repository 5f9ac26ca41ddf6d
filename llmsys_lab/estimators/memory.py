"""Memory: weights, gradients, optimizer states, activations, KV cache.

Training (per device, AdamW):

| precision | weights | gradients | AdamW m, v | extra | bytes / param |
| --- | --- | --- | --- | --- | --- |
| ``fp32`` | 4 | 4 | 8 | | 16 |
| ``mixed`` (PyTorch AMP: fp32 weights, bf16 autocast) | 4 | 4 | 8 | bf16 copies of the matmul weights, 2 | 16 + 2 |
| ``mixed-zero`` (16-bit weights/grads + fp32 master, m, v; Rajbhandari et al., ZeRO, 2020) | 2 | 2 | 4 + 8 | | 16 |

Activations (what autograd saves for the backward pass) of a LLaMA block are counted tensor by
tensor for the way PyTorch/transformers run it; ``activation_bytes`` lists them. Attention depends
on the SDPA backend PyTorch picks (``attention_path``): the fused kernels keep only a log-sum-exp
per query and head, the math fallback (e.g. fp32 with grouped-query attention on a GPU) keeps the
(b, n, s, s) probabilities of every layer, a term quadratic in the sequence length. The GPT-style
formula of Korthikanti et al., *Reducing Activation Recomputation in Large Transformer Models*
(2022), s b h (34 + 5 a s / h) bytes per layer with 16-bit activations (2 s b h with full
recomputation), is available as ``korthikanti_activation_bytes`` for comparison.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..configs import ModelConfig
from ..validate import ConfigError
from .params import param_breakdown

DTYPE_BYTES = {"fp32": 4, "float32": 4, "tf32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
               "fp8": 1, "int8": 1, "int4": 0.5}
PRECISIONS = ("fp32", "mixed", "mixed-zero")
OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "sgd-momentum": 4, "sgd": 0}   # fp32 states per parameter


def dtype_bytes(dtype: str) -> float:
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


# ---- KV cache -------------------------------------------------------------------------------
def kv_bytes_per_token(cfg: ModelConfig, dtype: str = "fp16") -> float:
    """K and V, every layer, every K/V head: 2 * layers * kv_heads * head_dim * bytes."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes(dtype)


def kv_bytes(cfg: ModelConfig, tokens: int, dtype: str = "fp16") -> float:
    return tokens * kv_bytes_per_token(cfg, dtype)


def weight_bytes(cfg: ModelConfig, dtype: str = "fp16") -> float:
    return param_breakdown(cfg)["total"] * dtype_bytes(dtype)


def max_batch(cfg: ModelConfig, gpu_bytes: float, seq_len: int, dtype: str = "fp16",
              reserve_fraction: float = 0.0) -> int:
    """Largest number of sequences of `seq_len` tokens whose KV cache fits next to the weights."""
    if seq_len <= 0:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    usable = gpu_bytes * (1 - reserve_fraction) - weight_bytes(cfg, dtype)
    if usable <= 0:
        raise ConfigError(f"{cfg.name}: the weights alone ({weight_bytes(cfg, dtype) / 2**30:.1f} GiB in {dtype}) "
                          f"do not fit in {gpu_bytes / 2**30:.1f} GiB")
    return int(usable // (kv_bytes_per_token(cfg, dtype) * seq_len))


# ---- activations ----------------------------------------------------------------------------
def _path(cfg: ModelConfig, precision: str, device: str, path):
    from .attention_path import model_attention_path

    return path if path is not None else model_attention_path(cfg, precision, device)


def attention_saved_bytes(cfg: ModelConfig, batch: int, seq: int, precision: str = "mixed",
                          device: str = "cuda", path=None) -> dict[str, float]:
    """What the SDPA call of one layer keeps for backward, by tensor, for the backend that runs.

    Fused backends (flash, memory-efficient, cuDNN, CPU flash): Q, K, V as SDPA received them
    (K/V with the model's K/V heads under enable_gqa, else repeated to the query heads) and one
    fp32 log-sum-exp per query and head (memory-efficient pads the sequence to a multiple of 32).
    Math: the scaled Q and K^T, V (K and V repeated to the query heads when GQA is asked for) and
    the (b, n, s, s) softmax probabilities, in the kernel's dtype; no log-sum-exp.
    """
    p = _path(cfg, precision, device, path)
    c = 4 if p.dtype == "fp32" else 2                  # the kernel's dtype (CPU math upcasts 16-bit to fp32)
    b, s, n, d = batch, seq, cfg.num_heads, cfg.head_dim
    kv = n if p.backend == "math" else p.kv_heads
    out = {"q": c * b * s * n * d, "k": c * b * s * kv * d, "v": c * b * s * kv * d}
    if p.backend == "math":
        out["probabilities"] = c * b * n * s * s
    else:
        s_lse = -(-s // 32) * 32 if p.backend == "efficient" else s
        out["log_sum_exp"] = 4 * b * n * s_lse
    return out


def attention_transient_bytes(cfg: ModelConfig, batch: int, seq: int, precision: str = "mixed",
                              device: str = "cuda", path=None) -> float:
    """Short-lived memory of one layer's attention backward beyond what is saved: for math, three
    more (b, n, s, s) tensors at once (the gradient of the probabilities, the softmax backward's
    product of it with the probabilities, and the gradient of the scores; measured on an H200);
    for the fused kernels nothing of size s^2 (they recompute the scores tile by tile)."""
    p = _path(cfg, precision, device, path)
    c = 4 if p.dtype == "fp32" else 2
    return 3 * c * batch * cfg.num_heads * seq * seq if p.backend == "math" else 0.0


def layer_activation_bytes(cfg: ModelConfig, batch: int, seq: int, precision: str = "mixed",
                           device: str = "cuda", path=None) -> float:
    """Bytes one LLaMA block saves for backward, tensor by tensor, for the attention backend
    that runs (``attention_path``: fused kernels keep O(s), the math fallback O(s^2))."""
    _check_precision(precision)
    b, s, h, i = batch, seq, cfg.hidden_size, cfg.intermediate_size
    E, I = b * s * h, b * s * i                       # elements of a (b, s, h) / (b, s, i) tensor
    Eq = b * s * cfg.num_heads * cfg.head_dim
    sdpa = sum(attention_saved_bytes(cfg, batch, seq, precision, device, path).values())
    rsqrt = 2 * 4 * b * s                             # fp32 1/RMS per token, two norms
    if precision == "fp32":
        norms = 2 * 3 * 4 * E        # per norm: input x, x / rms, gamma * (x / rms) (= next matmul's input)
        attn = sdpa + 4 * Eq                          # SDPA's saved tensors; its output (o_proj's input)
        mlp = 4 * 4 * I                               # gate out, up out, silu(gate), product
    else:  # autocast: norms run in fp32, each matmul saves its own bf16 copy of its input
        norms = 2 * 2 * 4 * E                         # per norm: input x, x / rms (fp32)
        attn = 2 * 3 * E + sdpa + 2 * Eq              # bf16 inputs of q/k/v proj; SDPA's saved tensors; output
        mlp = 2 * 2 * E + 2 * 4 * I                   # bf16 inputs of gate/up; gate, up, silu, product
    return norms + attn + mlp + rsqrt


def head_activation_bytes(cfg: ModelConfig, batch: int, seq: int, precision: str = "mixed") -> float:
    """Once per model: final norm, LM-head input, log-softmax output (fp32), token ids and
    labels (int64), RoPE's cos/sin tables (fp32) and the scalar loss."""
    b, s, h, v = batch, seq, cfg.hidden_size, cfg.vocab_size
    norm = (3 * 4 if precision == "fp32" else 2 * 4 + 2) * b * s * h + 4 * b * s
    rope = 2 * 4 * s * cfg.head_dim if cfg.positions == "rope" else 0
    return norm + 4 * b * s * v + 2 * 8 * b * s + rope + 4


def activation_bytes(cfg: ModelConfig, batch: int, seq: int, precision: str = "mixed",
                     recompute: bool = False, device: str = "cuda", path=None) -> float:
    """All saved activations of a forward pass. With full recomputation (activation
    checkpointing) only each block's input is kept (fp32 residual stream), plus one block's
    activations while it is recomputed during backward."""
    layer = layer_activation_bytes(cfg, batch, seq, precision, device, path)
    if recompute:
        body = cfg.num_layers * 4 * batch * seq * cfg.hidden_size + layer
    else:
        body = cfg.num_layers * layer
    return body + head_activation_bytes(cfg, batch, seq, precision)


def korthikanti_activation_bytes(cfg: ModelConfig, batch: int, seq: int, recompute: bool = False) -> float:
    """Korthikanti et al. (2022), GPT layer, 16-bit activations, no parallelism: s b h (34 + 5 a s / h)."""
    s, b, h, a = seq, batch, cfg.hidden_size, cfg.num_heads
    per_layer = 2 * s * b * h if recompute else s * b * h * (34 + 5 * a * s / h)
    return cfg.num_layers * per_layer


# ---- training total -------------------------------------------------------------------------
@dataclass
class TrainingMemory:
    weights: float
    gradients: float
    optimizer: float
    weight_copies: float          # bf16 copies of matmul weights kept by autocast for backward
    activations: float            # every tensor saved for backward (with recomputation: block inputs + one block)
    logits_transient: float       # the loss's backward: fp32 gradients of the log-probabilities and of the logits
    attention_transient: float    # math attention only: one layer's (b, n, s, s) gradients in backward
    peak: float                   # the largest of the moments below
    attention_backend: str = ""   # the SDPA backend assumed (attention_path.model_attention_path)
    moments: dict = field(default_factory=dict)    # moment -> {tensor: bytes} alive then

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("moments")
        return d

    @property
    def end_of_forward(self) -> float:
        """Weights, optimizer states, bf16 weight copies, the saved activations and the loss's
        backward (the moment the forward pass ends and the backward begins)."""
        return sum(self.moments["end of forward"].values())

    @property
    def optimizer_step(self) -> float:
        """Weights, gradients and optimizer states (the activations are gone)."""
        return sum(self.moments["optimizer step"].values())

    def alive_at_peak(self) -> dict[str, float]:
        """The tensors alive at the peak moment (they sum to ``peak``)."""
        return dict(max(self.moments.values(), key=lambda parts: sum(parts.values())))

    def peak_moment(self) -> str:
        return max(self.moments, key=lambda k: sum(self.moments[k].values()))


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")


def training_memory(cfg: ModelConfig, batch: int, seq: int, precision: str = "mixed",
                    optimizer: str = "adamw", recompute: bool = False, devices: int = 1,
                    device: str = "cuda", path=None) -> TrainingMemory:
    """Peak memory of one training step on each of `devices` GPUs.

    Weights, gradients and optimizer states are sharded over `devices` (ZeRO stage 3);
    activations are per device for its `batch` sequences. Two moments compete for the peak:
    the end of the forward pass (weights, optimizer states, weight copies, every activation
    and the logits) and the optimizer step (weights, gradients and optimizer states). The peak is
    the larger of the two, *not* the sum of all rows: gradients and activations are never alive
    together in full (``TrainingMemory.alive_at_peak`` lists what is).

    device, path: the attention path (``attention_path.model_attention_path``) decides whether
    each layer keeps its (b, n, s, s) probabilities (math fallback) or not (fused kernels).
    """
    _check_precision(precision)
    if optimizer not in OPTIMIZER_BYTES:
        raise ConfigError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_BYTES)}")
    if devices < 1:
        raise ConfigError(f"devices must be >= 1, got {devices}")
    parts = param_breakdown(cfg)
    n = parts["total"]
    w_b, g_b = {"fp32": (4, 4), "mixed": (4, 4), "mixed-zero": (2, 2)}[precision]
    opt_b = OPTIMIZER_BYTES[optimizer] + (4 if precision == "mixed-zero" else 0)   # + fp32 master copy
    matmul_params = parts["attention"] + parts["mlp"] + (parts["lm_head"] or parts["embedding"])
    weights, grads, opt = n * w_b / devices, n * g_b / devices, n * opt_b / devices
    copies = 2 * matmul_params / devices if precision == "mixed" else 0.0
    p = _path(cfg, precision, device, path)
    acts = activation_bytes(cfg, batch, seq, precision, recompute, device, p)
    layer = layer_activation_bytes(cfg, batch, seq, precision, device, p)
    head = head_activation_bytes(cfg, batch, seq, precision)
    attn_t = attention_transient_bytes(cfg, batch, seq, precision, device, p)
    # The loss's backward: next to the saved fp32 log-probabilities (counted with the activations),
    # the fp32 gradient of the log-probabilities and the fp32 gradient of the logits, (b, s, v) each.
    logits = 2 * 4 * batch * seq * cfg.vocab_size
    head_grad = 4 * (parts["lm_head"] or parts["embedding"]) / devices      # the first gradient written
    states = {"weights": weights, "optimizer": opt, "weight_copies": copies}
    moments = {
        # with recomputation, no block is being recomputed yet when the loss's backward runs
        "end of forward": {**states, "activations": acts - (layer if recompute else 0.0), "logits_transient": logits},
        # the first block's backward (the last layer): the head's tensors are freed, the block's own
        # activations (recomputed, with recomputation) and, for math attention, its (b, n, s, s) gradients
        "last layer's backward": {**states, "activations": acts - head, "attention_transient": attn_t,
                                  "lm_head_gradient": head_grad},
        "optimizer step": {"weights": weights, "gradients": grads, "optimizer": opt},
    }
    m = TrainingMemory(weights, grads, opt, copies, acts, logits, attn_t, 0.0, p.backend, moments)
    m.peak = max(sum(parts.values()) for parts in moments.values())
    return m


# ---- inference: generation with a contiguous or a paged KV cache -----------------------------
CUBLAS_WORKSPACE = 32 * 2**20     # cuBLAS/cuBLASLt workspaces PyTorch allocates on Hopper (counted as allocated)
CACHES = ("contiguous", "paged")


@dataclass
class InferenceMemory:
    weights: float
    kv_cache: float               # contiguous: every token's K/V at the end; paged: the whole block pool
    activations: float            # the largest short-lived tensors of the prefill forward pass
    workspace: float
    peak: float
    cache: str
    phase: str                    # "prefill" or "decode": which moment sets the peak

    def as_dict(self) -> dict:
        return asdict(self)


def _prefill_activation_bytes(cfg: ModelConfig, batch: int, prompt: int, c: float, cache: str) -> float:
    """Largest working set of one block's forward over `batch` prompts of `prompt` tokens, no grad.

    MLP: (b, s, h) tensors the code keeps referenced, and three (b, s, i) tensors at once
    (silu(gate), up, their product). Attention: transformers' SDPA path (a fused kernel in bf16)
    keeps no s x s matrix; the kit's engine (paged) runs its prefill chunks through the explicit
    softmax(QK^T)V of ``llmsys_lab.attention`` on K/V gathered from the blocks: three (b, n, s, s)
    tensors alive at once (the scores stay referenced while softmax and nan_to_num make new ones),
    the additive mask, and the gathered and repeated K/V. Checked on an H200
    (``benchmarks/inference_memory.py``).
    """
    b, s, h, i, n, d, kv = (batch, prompt, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim,
                            cfg.num_kv_heads)
    if cache == "contiguous":
        # the embeddings and the block's input stay referenced by the caller, the residual and
        # the normed input by the block: four (b, s, h) tensors next to the MLP's three (b, s, i)
        mlp = c * b * s * (4 * h + 3 * i)
        attn = c * b * s * (4 * h + 3 * n * d)
    else:
        # the engine's loop keeps x, the normed input, q, k, v and the attention output alive
        # through the block; the MLP adds its normed input and three (N, i) tensors
        base = c * b * s * (3 * h + 2 * n * d + 2 * kv * d)
        mlp = base + c * b * s * (h + 3 * i)
        attn = (base
                + 3 * c * b * n * s * s                        # scores, softmax, nan_to_num: three alive at once
                + (c + 1) * b * s * s                          # the additive mask and the boolean one
                + 2 * c * b * s * (kv + n) * d)                # K/V gathered from blocks, repeated to n heads
    return max(mlp, attn)


def inference_memory(cfg: ModelConfig, batch: int, prompt: int, new_tokens: int, dtype: str = "bf16",
                     cache: str = "contiguous", block_size: int = 16, num_blocks: int | None = None,
                     workspace: float = CUBLAS_WORKSPACE) -> InferenceMemory:
    """Peak memory of generating `new_tokens` after `batch` prompts of `prompt` tokens.

    contiguous: transformers ``generate`` with its dynamic cache: K/V of every token kept (b, kv, t, d)
    per layer, grown by concatenation (one layer's old and new copy alive for a moment).
    paged: the kit's engine, whose block pool (``num_blocks`` x ``block_size`` tokens, default: just
    enough blocks for every request's whole length) is allocated once up front.
    Two moments compete: the prefill (the prompt's K/V plus the prefill's working set) and the last
    decode step (every token's K/V).
    """
    for name, v in (("batch", batch), ("prompt", prompt), ("new_tokens", new_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{name} must be a positive int, got {v!r}")
    if cache not in CACHES:
        raise ConfigError(f"unknown cache {cache!r}; known: {', '.join(CACHES)}")
    c = dtype_bytes(dtype)
    weights = weight_bytes(cfg, dtype)
    per_token = kv_bytes_per_token(cfg, dtype)
    total = prompt + new_tokens - 1          # the last token is sampled, never written to the cache
    acts = _prefill_activation_bytes(cfg, batch, prompt, c, cache)
    logits = (c + 4) * batch * cfg.vocab_size          # last position's logits and their fp32 copy
    if cache == "contiguous":
        kv_end = batch * total * per_token
        layer_copy = batch * total * per_token / cfg.num_layers        # concatenation: old + new of one layer
        prefill = batch * prompt * per_token + acts + logits
        decode = kv_end + layer_copy + logits
        kv = kv_end
    else:
        blocks = num_blocks if num_blocks is not None else batch * -(-(prompt + new_tokens) // block_size)
        kv = blocks * block_size * per_token
        prefill = kv + acts + logits
        decode = kv + logits
    phase = "prefill" if prefill >= decode else "decode"
    return InferenceMemory(weights, kv, acts, workspace, weights + workspace + max(prefill, decode), cache, phase)


def max_batch_inference(cfg: ModelConfig, gpu_bytes: float, prompt: int, new_tokens: int, dtype: str = "bf16",
                        cache: str = "contiguous", block_size: int = 16) -> int:
    """Largest batch whose ``inference_memory`` peak fits in `gpu_bytes` (0 if not even one)."""
    if inference_memory(cfg, 1, prompt, new_tokens, dtype, cache, block_size).peak > gpu_bytes:
        return 0
    lo, hi = 1, 2
    while inference_memory(cfg, hi, prompt, new_tokens, dtype, cache, block_size).peak <= gpu_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if inference_memory(cfg, mid, prompt, new_tokens, dtype, cache, block_size).peak <= gpu_bytes:
            lo = mid
        else:
            hi = mid
    return lo
