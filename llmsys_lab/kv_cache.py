"""A contiguous KV cache: keys and values of every past token, per layer, reserved up front.

Decoding one token needs that token's query against the keys and values of *all* earlier
tokens. Recomputing those every step repeats the whole prefix (O(t) work per step, O(t^2)
per sequence); the cache stores them once and appends one position per step.

This cache reserves `max_len` positions for every sequence of the batch when it is created,
the way systems before vLLM did. Lesson 04 measures how much of that reservation sits
unused and replaces it with paged blocks.
"""
from __future__ import annotations

import torch

from .configs import ModelConfig
from .errors import LabError
from .forward_batch import KVLayout
from .validate import ShapeError, check_tensor


class CacheError(LabError, ValueError):
    """The cache cannot take this update (full, wrong batch, wrong dtype or device)."""


class KVCache(KVLayout):
    """Implements the model's KV interface (forward_batch.KVLayout): update() appends, attend() attends."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device="cpu"):
        for name, v in (("num_layers", num_layers), ("batch", batch), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("max_len", max_len)):
            if not isinstance(v, int) or v <= 0:
                raise CacheError(f"{name} must be a positive int, got {v!r}")
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)     # (L, B, H_kv, S, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * num_layers          # positions filled, per layer

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu") -> "KVCache":
        return cls(cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim, max_len, dtype, device)

    # ---- shape -----------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def seq_len(self) -> int:
        """Tokens cached so far (those of the last layer to be fully updated)."""
        return self.lengths[-1]

    def nbytes(self) -> int:
        """Bytes reserved (K and V, all layers, all max_len positions)."""
        return self.k.numel() * self.k.element_size() * 2

    def used_bytes(self) -> int:
        """Bytes holding real tokens."""
        return self.nbytes() * self.seq_len // self.max_len

    # ---- update ----------------------------------------------------------------------------
    def check_batch(self, batch: int) -> None:
        if batch != self.batch:
            raise CacheError(f"this cache holds {self.batch} sequences but got a batch of {batch}; a cache "
                             "belongs to the batch it was created for (make a new one with KVCache.for_model)")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, H_kv, T, D) at this layer; return all cached keys and values so far."""
        check_tensor(k, "k", "B H_kv T D")
        if k.shape != v.shape:
            raise ShapeError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        self.check_batch(k.shape[0])
        if k.shape[1] != self.k.shape[2] or k.shape[3] != self.k.shape[4]:
            raise ShapeError(f"k has {k.shape[1]} heads of size {k.shape[3]}, the cache holds "
                             f"{self.k.shape[2]} heads of size {self.k.shape[4]}")
        if k.dtype != self.k.dtype or k.device != self.k.device:
            raise CacheError(f"the cache holds {self.k.dtype} on {self.k.device}, got {k.dtype} on {k.device}")
        start, t = self.lengths[layer], k.shape[2]
        if start + t > self.max_len:
            raise CacheError(f"the cache is full: {start} + {t} tokens > max_len = {self.max_len}")
        self.k[layer, :, :, start:start + t] = k
        self.v[layer, :, :, start:start + t] = v
        self.lengths[layer] = start + t
        return self.k[layer, :, :, :start + t], self.v[layer, :, :, :start + t]

    # ---- rollback (speculative decoding) ----------------------------------------------------
    def truncate(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` positions of every layer and forget the rest.

        Speculative decoding appends the K/V of drafted tokens that the target may then reject;
        their positions are dropped here, so the next forward writes over them. The dropped
        positions are zeroed, so a rolled-back cache equals one built from the kept tokens alone.
        """
        if not isinstance(num_tokens, int) or not 0 <= num_tokens <= min(self.lengths):
            raise CacheError(f"cannot truncate to {num_tokens!r} tokens: the cache holds {min(self.lengths)} "
                             "(truncate keeps a prefix, it cannot add positions)")
        self.k[:, :, :, num_tokens:] = 0
        self.v[:, :, :, num_tokens:] = 0
        self.lengths = [num_tokens] * len(self.lengths)
