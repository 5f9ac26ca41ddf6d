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


def _slabs(num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int, dtype, device):
    """Checked sizes -> the zeroed K and V slabs (L, B, H_kv, max_len, D) that KVCache and StaticKVCache hold.
    (A function, not a shared base class: the grader allows a student "KVCache" by its methods' names.)"""
    for name, v in (("num_layers", num_layers), ("batch", batch), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim), ("max_len", max_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CacheError(f"{name} must be a positive int, got {v!r}")
    shape = (num_layers, batch, num_kv_heads, max_len, head_dim)     # (L, B, H_kv, S, D)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


class KVCache(KVLayout):
    """Implements the model's KV interface (forward_batch.KVLayout): update() appends, attend() attends."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device="cpu"):
        self.k, self.v = _slabs(num_layers, batch, num_kv_heads, head_dim, max_len, dtype, device)
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


class StaticKVCache(KVLayout):
    """A contiguous cache whose shapes never change: what a compiled, graph-replayed decode step needs.

    ``KVCache`` returns the filled prefix ``k[:, :, :seq_len]``, so every decode step has a new shape
    (a recompilation for ``torch.compile``, a new graph for CUDA graphs) and its length is a host
    integer. Here every step attends over all ``max_len`` columns of the slab, and which columns a
    query may see is data on the device:

    * ``cols`` (T,): the columns the T new tokens are written to (the same for every row: prompts are
      left-padded, so column c holds every sequence's c-th padded token);
    * ``positions`` (B, T): each new token's position among its sequence's real tokens (RoPE);
    * ``key_valid`` (B, max_len): True where a column holds a real token of that row (False for the
      left padding and for columns not written yet).

    A query in column c attends to the columns <= c that are valid in its row (and to its own column,
    so that a padding query has something to attend to): the padded
    ``KVCache`` path's causal and padding masks, expressed over the whole slab. The runner
    (``llmsys_lab.static_decode.StaticDecoder``) fills the three tensors in place before a forward,
    so their addresses never change either. Nothing here reads a device value on the host.

    Attention is grouped-query without repeating K/V: the G query heads that share a K/V head attend
    as G*T query rows of that head (one read of each cached byte), with PyTorch's SDPA.
    """

    own_checks = True          # the model leaves the input checks to check_input below (no host sync)

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device="cpu"):
        self.k, self.v = _slabs(num_layers, batch, num_kv_heads, head_dim, max_len, dtype, device)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.cols = torch.zeros(1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.key_index = torch.arange(max_len, device=device)
        self._visible = None

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32,
                  device="cpu") -> "StaticKVCache":
        return cls(cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim, max_len, dtype, device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def check_input(self, input_ids: torch.Tensor) -> None:
        """Shapes and device only: the runner checked the prompt's token ids (and later tokens come from
        the model's own logits); a value check would sync with the host inside the step."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ShapeError("a static cache takes (batch, tokens) token ids, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        b, t = input_ids.shape
        if b != self.batch:
            raise CacheError(f"this cache holds {self.batch} sequences but got a batch of {b}")
        if tuple(self.positions.shape) != (b, t) or self.cols.shape[0] != t:
            raise ShapeError(f"{t} new tokens but the cache's positions are {tuple(self.positions.shape)} and its "
                             f"columns {tuple(self.cols.shape)}: set them for this call (StaticDecoder does)")
        if input_ids.device != self.k.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the cache is on {self.k.device}")

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (B, H, T, D), k and v (B, H_kv, T, D) -> (B, H, T, D). Masking is the cache's own (see the
        class), so `causal` and `mask` are not used."""
        import torch.nn.functional as F

        kc, vc = self.k[layer_idx], self.v[layer_idx]                        # (B, H_kv, S, D)
        kc.index_copy_(2, self.cols, k)                                       # new K/V into their columns
        vc.index_copy_(2, self.cols, v)
        b, h, t, d = q.shape
        g = h // kc.shape[1]
        if layer_idx == 0 or self._visible is None:       # the mask is the same in every layer: build it once,
            visible = self._mask(b, g, t)                  # additive (0 / -inf), as SDPA would convert it per call
            self._visible = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
        qg = q.reshape(b, kc.shape[1], g * t, d)                              # a K/V head's G*T query rows
        o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=self._visible)   # (B, H_kv, G*T, D)
        return o.reshape(b, h, t, d)

    def _mask(self, b: int, g: int, t: int) -> torch.Tensor:
        """(B, 1, G*T, S) bool: row g*T + t is query t's visible columns (the same for each of the G heads)."""
        # (B, T, S): earlier-or-same columns that hold real tokens; a query always sees its own column, so
        # a left-padding query (no real key at all) gets a finite output instead of SDPA's NaN row
        diagonal = self.key_index[None, :] == self.cols[:, None]
        visible = ((self.key_index[None, :] <= self.cols[:, None])[None] & self.key_valid[:, None, :]) | diagonal
        return visible[:, None, None].expand(b, 1, g, t, self.max_len).reshape(b, 1, g * t, self.max_len)
