"""Serving DeepSeek-V3: prefill and decode on different GPUs with different parallelism, and MTP.

The deployment (DeepSeek-V3 report, section 3.4, H800 nodes of 8 GPUs):
* prefill: 4 nodes (32 GPUs); attention TP4 + sequence parallelism with DP8; MoE EP32 (8 routed
  experts per GPU per layer; the report adds 32 redundant experts, ignored here).
* decode: 40 nodes (320 GPUs); attention TP4 + SP with DP80; MoE EP320 (one routed expert per GPU;
  64 GPUs hold redundant and shared experts: modelled here as 256 expert GPUs + 64).

``deployment_memory`` puts the kit's counts on each GPU; ``disaggregated`` feeds per-GPU rates into
lesson 05's ``disaggregated_goodput``. The rates are a roofline model (``StepCost`` of lesson 02 on a
GPU of ``estimators.roofline``), not measurements.

Multi-token prediction (section 2.2 and 5.4.3): the MTP module predicts the token after next; used as a
one-token draft (gamma = 1) it is speculative decoding, so lesson 10's ``expected_speedup`` applies with
alpha = the acceptance of the second token (the report: 85-90 %) and c = the MTP module's cost relative
to the whole model's.
"""
from __future__ import annotations

from ..estimators.roofline import GPU, StepCost
from ..simulator import disaggregated_goodput
from ..speculative import expected_speedup, expected_tokens_per_step
from ..validate import ConfigError
from .model_config import DeepSeekV3Shape, forward_flops_per_token, kv_bytes_per_token, mla_params, mtp_params, param_breakdown

PREFILL = {"gpus": 32, "attention_tp": 4, "attention_dp": 8, "ep": 32}
DECODE = {"gpus": 320, "attention_tp": 4, "attention_dp": 80, "ep": 256}


def gpu_weight_bytes(s: DeepSeekV3Shape, attention_tp: int, ep: int, bytes_per_param: float = 1.0) -> dict:
    """Weight bytes on one GPU: attention (and the dense MLPs) split over attention_tp, the routed experts over
    ep, the shared experts, router, norms, embedding and head replicated (FP8: 1 byte a parameter)."""
    if s.moe.num_experts % ep:
        raise ConfigError(f"{s.moe.num_experts} routed experts do not split over ep = {ep}")
    p = param_breakdown(s)
    attention = (p["attention"] + p["dense_mlp"]) / attention_tp
    experts = p["routed_experts"] / ep
    replicated = p["shared_experts"] + p["router"] + p["norms"] + p["embedding"] + p["lm_head"]
    return {k: v * bytes_per_param for k, v in
            (("attention_and_dense", attention), ("routed_experts", experts), ("replicated", replicated),
             ("total", attention + experts + replicated))}


def mtp_speedup(alpha: float, s: DeepSeekV3Shape, context: int = 4096) -> dict:
    """MTP as a one-token draft: c = FLOPs of the MTP module per token / the main model's (its block, its
    projection and the shared output head)."""
    main = forward_flops_per_token(s, context)["total"]
    mp = mtp_params(s)
    c = (2 * mp["unique_active"] + 2 * s.vocab_size * s.hidden_size
         + 2 * s.mla.num_heads * context * (s.mla.qk_head_dim + s.mla.v_head_dim)) / main
    return {"c": c, "tokens_per_step": expected_tokens_per_step(alpha, 1), "speedup": expected_speedup(alpha, 1, c)}


def decode_step(s: DeepSeekV3Shape, batch_per_gpu: int, context: int, gpu: GPU, attention_tp: int = 4,
                ep: int = 256, bytes_per_param: float = 1.0) -> StepCost:
    """One decode step on one GPU of the decode deployment, `batch_per_gpu` sequences of `context` tokens per
    GPU: its weights read once; the latent caches of its TP group's sequences (batch_per_gpu x attention_tp:
    MLA's latent is shared by all heads, so tensor parallelism over heads does not split it); the FLOPs of
    batch_per_gpu tokens (the work of the whole system divided by its GPUs, routing balanced)."""
    f = forward_flops_per_token(s, context)
    w = gpu_weight_bytes(s, attention_tp, ep, bytes_per_param)["total"]
    kv = batch_per_gpu * attention_tp * context * kv_bytes_per_token(s, "bf16")
    return StepCost("decode", batch_per_gpu * f["total"], w + kv)


def disaggregated(s: DeepSeekV3Shape, gpu: GPU, prompt: int = 2048, output: int = 512, decode_batch: int = 64,
                  mfu: float = 0.4, prefill_gpus: int = 32, decode_gpus: int = 320) -> dict:
    """Requests/s per GPU: prefill at `mfu` of peak (compute-bound), decode from the roofline of one step
    at `decode_batch` sequences per GPU and the mean context, and the disaggregated goodput (lesson 05)."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu must be in (0, 1], got {mfu!r}")
    prefill_flops = prompt * forward_flops_per_token(s, prompt // 2)["total"]
    prefill_rps = mfu * gpu.flops / prefill_flops
    step = decode_step(s, decode_batch, prompt + output // 2, gpu)
    decode_rps = decode_batch / (step.time(gpu) * output)
    return {"prefill_rps_per_gpu": prefill_rps, "decode_rps_per_gpu": decode_rps, "decode_step_s": step.time(gpu),
            "decode_bound": step.bound(gpu),
            "goodput_per_gpu": disaggregated_goodput(prefill_rps, decode_rps, prefill_gpus, decode_gpus),
            "balanced_decode_per_prefill_gpu": prefill_rps / decode_rps}


__all__ = ["PREFILL", "DECODE", "gpu_weight_bytes", "mtp_speedup", "decode_step", "disaggregated", "mla_params"]
