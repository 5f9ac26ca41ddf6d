"""Which attention kernel runs, and what it keeps for the backward pass.

``torch.nn.functional.scaled_dot_product_attention`` (SDPA) is one call with several kernels
behind it. PyTorch picks the first backend, in its priority order, whose constraints the call
meets (``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``; CPU: ``sdp_utils_cpp.cpp``).
The choice decides the activation memory of a training step:

* the fused kernels (FlashAttention, memory-efficient, cuDNN; on CPU the CPU flash kernel) keep
  only their inputs Q, K, V, the output O and one fp32 log-sum-exp per query and head: O(s);
* the **math** fallback is plain PyTorch ops, ``softmax(Q K^T / sqrt(d)) V``, and autograd keeps
  the (b, n, s, s) probability matrix of every layer: O(s^2). Its backward also holds two
  more (b, n, s, s) tensors for a moment (the gradients of the probabilities and the scores).

The rules for CUDA (PyTorch 2.5 - 2.13, GPUs of compute capability 8.0 and newer):

| backend | dtypes | K/V heads | mask | head dim |
| --- | --- | --- | --- | --- |
| flash | fp16, bf16 | fewer than Q heads allowed (``enable_gqa``) | none (``is_causal`` only) | <= 256 |
| memory-efficient | fp32, fp16, bf16 | must equal Q heads | allowed | multiple of 8 (16-bit) / 4 (fp32) |
| cuDNN | fp16, bf16 | fewer allowed | allowed | multiple of 8, <= 128 |
| math | any | any | any | any |

Priority: flash, memory-efficient, math, cuDNN, except on Hopper and Blackwell GPUs (compute
capability 9.0, 10.0, 10.3) with cuDNN >= 9.9, where PyTorch puts cuDNN first (``priority_order`` in
``sdp_utils.cpp``, unless ``TORCH_CUDNN_SDPA_PREFERRED=0``): cuDNN, flash, memory-efficient, math.
Measured on an H200 with PyTorch 2.11: every bf16 training step ran cuDNN attention. Either way
fp32 with grouped-query attention *and* ``enable_gqa=True`` lands on math: flash and cuDNN refuse
fp32, memory-efficient refuses GQA.

On CPU (PyTorch 2.13) the CPU flash kernel takes fp32/fp64/bf16/fp16, masks and GQA, without
dropout; anything else runs math, which computes 16-bit inputs in fp32.

What transformers passes (``integrations/sdpa_attention.py``): with GQA, no attention mask and a
head dim <= 256 it calls SDPA with K/V heads unrepeated and ``enable_gqa=True``; otherwise it
repeats K/V to the query heads first (``repeat_kv``), so SDPA sees plain multi-head attention
(and keeps the repeated K/V). A causal batch without padding has no mask (``is_causal=True``).

``sdpa_backend`` applies the table; on a CUDA machine ``query_torch_backend`` asks PyTorch itself
(``torch.backends.cuda.can_use_flash_attention`` / ``can_use_efficient_attention`` with
``torch.backends.cuda.SDPAParams``), and a GPU test checks that the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..validate import ConfigError

BACKENDS = ("flash", "efficient", "cudnn", "math")
DEVICES = ("cuda", "cpu")
# the dtype the attention kernel sees: fp32 training runs it in fp32, autocast in bf16
_DTYPES = {"fp32": "fp32", "float32": "fp32", "mixed": "bf16", "mixed-zero": "bf16", "bf16": "bf16",
           "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp64": "fp64"}
DEFAULT_PRIORITY = ("flash", "efficient", "math", "cudnn")
CUDNN_FIRST = ("cudnn", "flash", "efficient", "math")


def default_priority(capability: tuple[int, int]) -> tuple[str, ...]:
    """PyTorch's order on a GPU of this compute capability: cuDNN first on 9.0, 10.0 and 10.3."""
    major, minor = capability
    return CUDNN_FIRST if major in (9, 10) and minor in (0, 3) else DEFAULT_PRIORITY


@dataclass(frozen=True)
class AttentionPath:
    """The SDPA call a model makes, and the backend that runs it.

    backend:   flash, efficient, cudnn or math.
    dtype:     the dtype the kernel computes in (fp32, bf16, fp16).
    kv_heads:  K/V heads SDPA receives (the model's K/V heads with enable_gqa, else the query heads).
    enable_gqa: whether SDPA gets unrepeated K/V and enable_gqa=True.
    reason:    why the higher-priority backends were refused, in words.
    """

    backend: str
    dtype: str
    num_heads: int
    kv_heads: int
    head_dim: int
    enable_gqa: bool
    device: str
    reason: str

    @property
    def stores_scores(self) -> bool:
        """True for math: autograd keeps the (b, n, s, s) probabilities."""
        return self.backend == "math"

    def describe(self) -> str:
        how = ("grouped K/V heads unrepeated, enable_gqa=True" if self.enable_gqa else
               f"{self.kv_heads} K/V heads as SDPA sees them")
        keeps = "keeps the (b, n, s, s) probabilities: O(s^2)" if self.stores_scores else "keeps O and log-sum-exp: O(s)"
        return f"SDPA {self.backend} on {self.device} ({self.dtype}; {how}); {keeps}. {self.reason}"


def kernel_dtype(dtype: str) -> str:
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ConfigError(f"unknown attention dtype or precision {dtype!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[key]


def transformers_uses_enable_gqa(num_heads: int, num_kv_heads: int, head_dim: int, attn_mask: bool) -> bool:
    """transformers' sdpa path: unrepeated K/V with enable_gqa when there is no mask and head_dim <= 256."""
    return num_kv_heads != num_heads and not attn_mask and head_dim <= 256


def sdpa_backend(dtype: str, num_heads: int, num_kv_heads: int, head_dim: int, device: str = "cuda",
                 capability: tuple[int, int] = (9, 0), attn_mask: bool = False, dropout: float = 0.0,
                 enable_gqa: bool | None = None, priority: tuple[str, ...] | None = None) -> AttentionPath:
    """The backend PyTorch picks for one SDPA call, from the documented rules (module docstring).

    dtype: fp32 / bf16 / fp16, or a training precision (fp32, mixed, mixed-zero).
    enable_gqa: None means "as transformers' sdpa attention decides"; True/False force it.
    capability: the CUDA GPU's compute capability (8.0 A100, 9.0 H100/H200).
    priority: the backends in the order PyTorch tries them; None: PyTorch's order for `capability`.
    """
    dt = kernel_dtype(dtype)
    if device not in DEVICES:
        raise ConfigError(f"unknown device kind {device!r}; known: {', '.join(DEVICES)}")
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ConfigError(f"num_kv_heads = {num_kv_heads} must be positive and divide num_heads = {num_heads}")
    if head_dim <= 0:
        raise ConfigError(f"head_dim must be positive, got {head_dim}")
    if priority is None:
        priority = default_priority(capability) if device == "cuda" else ("flash", "math")
    for b in priority:
        if b not in BACKENDS:
            raise ConfigError(f"unknown SDPA backend {b!r} in priority; known: {', '.join(BACKENDS)}")
    if enable_gqa is None:
        enable_gqa = transformers_uses_enable_gqa(num_heads, num_kv_heads, head_dim, attn_mask)
    kv = num_kv_heads if enable_gqa else num_heads
    gqa = kv != num_heads

    def path(backend, reason):
        return AttentionPath(backend, dt, num_heads, kv, head_dim, gqa, device, reason)

    if device == "cpu":
        refusals = [] if "flash" in priority else ["flash is not in the allowed backends"]
        if dt not in ("fp32", "fp64", "bf16", "fp16"):
            refusals.append(f"CPU flash does not take {dt}")
        if dropout > 0:
            refusals.append("CPU flash takes no dropout")
        if not refusals:
            return path("flash", "CPU flash kernel: takes fp32/bf16/fp16, masks and GQA.")
        # CPU math computes 16-bit inputs in fp32 (for accuracy) and casts the output back
        return AttentionPath("math", "fp32" if dt in ("bf16", "fp16") else dt, num_heads, kv, head_dim, gqa, device,
                             "; ".join(refusals) + "." + (f" CPU math upcasts {dt} to fp32." if dt != "fp32" else ""))

    refusals = {}
    for b in priority:
        why = _cuda_refusal(b, dt, gqa, head_dim, attn_mask, capability)
        if why is None:
            told = "; ".join(f"{k}: {v}" for k, v in refusals.items())
            return path(b, (f"Refused before it: {told}." if told else f"{b} is first in the priority order."))
        refusals[b] = why
    raise ConfigError("no SDPA backend accepts this call: " + "; ".join(f"{k}: {v}" for k, v in refusals.items()))


def _cuda_refusal(backend, dt, gqa, head_dim, attn_mask, capability) -> str | None:
    """None if `backend` accepts the call, else why not (the first failing rule)."""
    sm = capability[0] * 10 + capability[1]
    if backend == "math":
        return None
    if backend == "flash":
        if dt not in ("fp16", "bf16"):
            return f"needs fp16/bf16, got {dt}"
        if sm < 80:
            return f"needs compute capability >= 8.0, got {capability[0]}.{capability[1]}"
        if attn_mask:
            return "takes no explicit mask"
        if head_dim > 256:
            return f"head_dim {head_dim} > 256"
        return None
    if backend == "efficient":
        if dt not in ("fp32", "fp16", "bf16"):
            return f"does not take {dt}"
        if dt == "bf16" and sm < 80:
            return "bf16 needs compute capability >= 8.0"
        if gqa:
            return "does not take fewer K/V heads than query heads (enable_gqa)"
        align = 4 if dt == "fp32" else 8
        if head_dim % align:
            return f"head_dim {head_dim} is not a multiple of {align}"
        return None
    if backend == "cudnn":
        if dt not in ("fp16", "bf16"):
            return f"needs fp16/bf16, got {dt}"
        if sm < 80:
            return "needs compute capability >= 8.0"
        if head_dim > 128 or head_dim % 8:
            return f"head_dim {head_dim} must be a multiple of 8 and <= 128"
        return None       # takes GQA and masks
    raise ConfigError(f"unknown SDPA backend {backend!r}")


def model_attention_path(cfg, precision: str = "mixed", device: str = "cuda", capability=(9, 0),
                         attn_mask: bool = False) -> AttentionPath:
    """The path a transformers model of this ModelConfig takes in training (sdpa attention)."""
    return sdpa_backend(precision, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, device=device,
                        capability=capability, attn_mask=attn_mask)


# ---- asking PyTorch itself (CUDA only) -------------------------------------------------------
def query_torch_backend(dtype: str, num_heads: int, num_kv_heads: int, head_dim: int,
                        attn_mask: bool = False, enable_gqa: bool | None = None) -> str:
    """The backend PyTorch's own selection functions accept first, on the current CUDA GPU.

    Builds tiny tensors of the call's shape and asks ``torch.backends.cuda.can_use_*``, in the
    order ``torch._C._get_sdp_priority_order()`` reports (default order where it does not exist).
    """
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("query_torch_backend needs a CUDA GPU; use sdpa_backend (the table) elsewhere")
    dt = kernel_dtype(dtype)
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[dt]
    if enable_gqa is None:
        enable_gqa = transformers_uses_enable_gqa(num_heads, num_kv_heads, head_dim, attn_mask)
    kv = num_kv_heads if enable_gqa else num_heads
    q = torch.zeros(1, num_heads, 64, head_dim, device="cuda", dtype=tdt, requires_grad=True)
    k = torch.zeros(1, kv, 64, head_dim, device="cuda", dtype=tdt, requires_grad=True)
    v = torch.zeros_like(k, requires_grad=True)
    mask = torch.ones(64, 64, device="cuda", dtype=torch.bool).tril() if attn_mask else None
    # PyTorch settles its priority order at the first SDPA call (cuDNN first on Hopper/Blackwell)
    torch.nn.functional.scaled_dot_product_attention(q.detach()[:, :1], q.detach()[:, :1], q.detach()[:, :1])
    params = torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, not attn_mask, bool(enable_gqa and kv != num_heads))
    checks = {"flash": torch.backends.cuda.can_use_flash_attention,
              "efficient": torch.backends.cuda.can_use_efficient_attention,
              "cudnn": getattr(torch.backends.cuda, "can_use_cudnn_attention", lambda p, d=False: False),
              "math": lambda p, d=False: True}
    enabled = {"flash": torch.backends.cuda.flash_sdp_enabled(),
               "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
               "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}
    order = DEFAULT_PRIORITY
    get_order = getattr(torch._C, "_get_sdp_priority_order", None)
    if get_order is not None:
        # SDPBackend values (torch 2.11: MATH 0, FLASH_ATTENTION 1, EFFICIENT_ATTENTION 2, CUDNN_ATTENTION 3,
        # OVERRIDEABLE 4); the default order there is [1, 2, 0, 3, 4]: flash, efficient, math, cuDNN
        names = {int(v): k for k, v in torch.nn.attention.SDPBackend.__members__.items()}
        order = tuple({"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn",
                       "MATH": "math"}.get(names.get(int(i), ""), "?") for i in get_order())
        order = tuple(b for b in order if b in BACKENDS) or DEFAULT_PRIORITY
    for b in order:
        if enabled[b] and checks[b](params, False):
            return b
    raise RuntimeError("PyTorch accepts no SDPA backend for this call")


# kernel-name fragments the profiler shows for each backend (CUDA), to detect what really ran
KERNEL_MARKERS = {
    "flash": ("flash_fwd", "flash::", "pytorch_flash"),
    "efficient": ("fmha_cutlass", "mem_efficient", "attention_kernel_batched", "_efficient_attention"),
    "cudnn": ("cudnn", "sm90_flash", "fmha_"),
    "math": (),
}
OP_MARKERS = {   # aten operator names (device-independent)
    "flash": ("_scaled_dot_product_flash_attention",),
    "efficient": ("_scaled_dot_product_efficient_attention",),
    "cudnn": ("_scaled_dot_product_cudnn_attention",),
}


def backend_from_ops(op_names) -> str:
    """Which SDPA backend ran, from the aten operator names a profiler recorded (math has no op of its own)."""
    names = " ".join(op_names)
    for b, markers in OP_MARKERS.items():
        if any(m in names for m in markers):
            return b
    if "scaled_dot_product_attention" in names or "_scaled_dot_product_attention_math" in names:
        return "math"
    raise ValueError("no scaled_dot_product_attention call among the recorded operators")
