"""Arithmetic intensity and the roofline: why decode at small batch is memory-bound.

A step that performs F FLOPs and moves B bytes through GPU memory takes at least
max(F / peak_flops, B / bandwidth). Its arithmetic intensity AI = F / B decides which
term wins: below the ridge point peak_flops / bandwidth the step is memory-bound.

* Prefill processes s prompt tokens per sequence at once: every weight read from memory
  is used for b * s tokens, so AI grows with b * s (compute-bound).
* Decode processes one token per sequence: every weight is read to serve only b tokens,
  and each sequence also reads its whole KV cache, so AI is about b FLOPs per weight byte
  pair (memory-bound at small b).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..configs import ModelConfig
from ..validate import ConfigError
from .flops import forward_flops_table, total_flops
from .memory import kv_bytes_per_token, weight_bytes


@dataclass(frozen=True)
class GPU:
    name: str
    flops: float          # dense bf16/fp16 tensor-core FLOP/s (datasheet)
    bandwidth: float      # HBM bytes/s (datasheet)
    memory: float         # bytes
    capability: tuple = (8, 0)   # CUDA compute capability: decides PyTorch's SDPA backend order

    @property
    def ridge(self) -> float:
        """FLOPs per byte at which compute and memory time are equal."""
        return self.flops / self.bandwidth


GB = 1e9
GPUS = {g.name: g for g in [
    GPU("T4", 65e12, 320 * GB, 16 * 2**30, (7, 5)),
    GPU("A100-40GB", 312e12, 1555 * GB, 40 * 2**30),
    GPU("A100-80GB", 312e12, 2039 * GB, 80 * 2**30),
    GPU("H100-SXM", 989e12, 3350 * GB, 80 * 2**30, (9, 0)),
    GPU("H200", 989e12, 4800 * GB, 141 * 2**30, (9, 0)),
]}


def get_gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[name]


@dataclass(frozen=True)
class StepCost:
    phase: str
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes

    def time(self, gpu: GPU) -> float:
        return max(self.flops / gpu.flops, self.bytes / gpu.bandwidth)

    def bound(self, gpu: GPU) -> str:
        return "compute" if self.intensity >= gpu.ridge else "memory"

    def attainable(self, gpu: GPU) -> float:
        return min(gpu.flops, self.intensity * gpu.bandwidth)


def prefill_cost(cfg: ModelConfig, batch: int, prompt: int, dtype: str = "bf16") -> StepCost:
    """Forward over `prompt` tokens: weights read once, K/V of every token written."""
    flops = total_flops(forward_flops_table(cfg, batch, prompt, causal=True), cfg)
    moved = weight_bytes(cfg, dtype) + batch * prompt * kv_bytes_per_token(cfg, dtype)
    return StepCost("prefill", flops, moved)


def decode_cost(cfg: ModelConfig, batch: int, context: int, dtype: str = "bf16") -> StepCost:
    """One new token per sequence against a KV cache of `context` tokens: weights read once,
    every sequence's cache read, one token's K/V written."""
    flops = total_flops(forward_flops_table(cfg, batch, 1, causal=True, past=context), cfg)
    moved = weight_bytes(cfg, dtype) + batch * (context + 1) * kv_bytes_per_token(cfg, dtype)
    return StepCost("decode", flops, moved)
