"""The KV interface the model's attention calls, and the packed paged batch the serving engine builds.

The model is written once (``LlamaLM.forward`` -> ``LlamaBlock.forward`` -> ``MultiHeadAttention``).
Where the keys and values of earlier tokens live, and how a query finds the ones it may see, is
the business of the ``kv_cache`` object passed down to every attention layer. Each layer hands it
the new tokens' projected and rotated q, k, v and gets the attention output back:

    o = kv_cache.attend(layer_idx, q, k, v, causal=..., mask=...)

Four layouts implement it:

* ``KVCache`` (lesson 03): one contiguous (B, H_kv, max_len, D) slab per layer; append, then attend.
* ``PagedBatch`` (lesson 04): the same padded (B, T) batch, its K/V stored in the blocks of a
  ``PagedKVCache``; write through the block tables, gather back, attend.
* ``StaticKVCache`` (kv_cache.py, compiled decoding): the contiguous slab with shapes that never change,
  every step attending over all its columns under a mask kept on the device (capturable, compilable).
* ``PackedPagedBatch`` (this module, the engine's): the tokens of every scheduled request packed
  into one row of N tokens (selective batching: matmuls see (N, hidden), never padding). It carries
  the batch layout vLLM-style engines build each iteration: the positions of the N tokens, the slot
  each token's K/V is written to (``slot_mapping``), the packed rows whose logits are wanted
  (``logit_rows``), and for the attention itself either every row's block table and context length
  (read by the paged decode kernel: a token at position p is a query over keys 0 .. p, prefill
  chunks included) or the padded, masked layout of the iteration's chunks (without the kernel). Its
  ``attend`` writes the new K/V into the pool and runs attention per request.

A layout may also provide ``positions`` (the token positions, when it knows them better than the
model can infer from ``seq_len`` and the mask) and ``logit_rows``; ``packed = True`` says that
``input_ids`` is the packed (N,) token vector rather than a (B, T) batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .attention import scaled_dot_product_attention
from .validate import ShapeError


class KVLayout:
    """The KV interface of the model's attention (implemented by KVCache, PagedBatch, PackedPagedBatch).

    Subclasses that store K/V as a padded (B, H_kv, S, D) batch implement ``update(layer, k, v) ->
    (all keys, all values)``, ``seq_len`` and ``check_batch``; the default ``attend`` appends and
    attends with the kit's scaled_dot_product_attention (what MultiHeadAttention did before the
    interface existed, so outputs are unchanged)."""

    packed = False                      # input_ids is a (B, T) batch
    own_checks = False                  # True: the layout checks the input and supplies positions and masks
    positions: torch.Tensor | None = None     # None: the model derives positions from seq_len / the mask
    logit_rows: torch.Tensor | None = None    # None: logits for every token

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (B, H, T, D), k and v (B, H_kv, T, D) of the T new tokens -> attention output (B, H, T, D)."""
        k, v = self.update(layer_idx, k, v)
        return scaled_dot_product_attention(q, k, v, causal=causal, mask=mask)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):      # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must implement attend() or update()")


@dataclass(frozen=True)
class PaddedPrefill:
    """An iteration's P chunks side by side, padded to the longest, for one masked attention call (the
    engine's path without the paged kernel; built by Engine._padded_batch).

    Chunk p has n_p new tokens at positions s_p .. s_p + n_p - 1 and attends to its keys 0 .. s_p + n_p - 1,
    read from the cache through their slots. Padding points at row / slot 0 and is masked out."""

    q_rows: torch.Tensor      # (P, Lq) int64: the packed row of each query
    key_slots: torch.Tensor   # (P, Lk) int64: the cache slot of each key
    mask: torch.Tensor        # (P, 1, Lq, Lk) bool: query i of chunk p sees key j iff j <= s_p + i
    valid: torch.Tensor       # (P, Lq) bool: real query rows (a padded one's output is dropped)


class PackedPagedBatch(KVLayout):
    """One engine iteration's tokens, packed, with their K/V in a PagedKVCache.

    N packed tokens; R requests (their rows are contiguous: prefill chunks first, then one row per
    decoding request). Every tensor is on the cache's device; nothing here syncs with the host, so
    the forward pass on the paged-kernel path can be captured in a CUDA graph (see cuda_graphs.py).

    positions     (N,) int64   each token's position in its sequence (RoPE)
    slot_mapping  (N,) int64   flat slot (block * block_size + offset) its K/V is written to
    logit_rows    (R,) int64   the packed rows whose logits are returned (None: every row)
    Attention, one of:
    block_tables  (N, W) int32, context_lens (N,) int32: every row's table and length (its position + 1),
    decode_attention  paged decode attention(q (N, H, D), k_pool, v_pool, tables, lens) -> (N, H, D)
    prefill       a PaddedPrefill: every row attended with padded masked attention
    """

    packed = True

    def __init__(self, cache, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 logit_rows: torch.Tensor | None = None, block_tables: torch.Tensor | None = None,
                 context_lens: torch.Tensor | None = None, decode_attention: Callable | None = None,
                 prefill: tuple | None = None):
        paged = decode_attention is not None and block_tables is not None and context_lens is not None
        if paged == (prefill is not None):
            raise ValueError("a packed batch attends one way: give decode_attention with block_tables and "
                             "context_lens (the paged rows), or prefill (a PaddedPrefill), not both or neither")
        if prefill is not None and not isinstance(prefill, PaddedPrefill):
            raise TypeError(f"prefill must be a PaddedPrefill, got {type(prefill).__name__}")
        self.cache, self.positions, self.slot_mapping, self.logit_rows = cache, positions, slot_mapping, logit_rows
        self.block_tables, self.context_lens = block_tables, context_lens
        self.decode_attention, self.prefill = decode_attention, prefill

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    def check_input(self, input_ids: torch.Tensor) -> None:
        """Shape and device only: the engine checked every token id when the request was added, and a
        value check here would sync with the host (and could not run inside a CUDA graph)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
            raise ShapeError("a packed batch takes the packed (N,) token ids, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        if input_ids.shape[0] != self.num_tokens:
            raise ShapeError(f"{input_ids.shape[0]} token ids for a packed batch of {self.num_tokens} tokens")
        if input_ids.device != self.positions.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the batch is on {self.positions.device}")

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (1, H, N, D), k and v (1, H_kv, N, D) -> (1, H, N, D). Causality is in the layout itself
        (a paged row sees its context_lens tokens, a padded query its mask row), so `causal` and
        `mask` are not used."""
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]     # (blocks, block_size, H_kv, D)
        # the new tokens' K/V into their slots (index_copy_: no host sync, capturable)
        kc.view(-1, *kc.shape[2:]).index_copy_(0, self.slot_mapping, k[0].transpose(0, 1))
        vc.view(-1, *vc.shape[2:]).index_copy_(0, self.slot_mapping, v[0].transpose(0, 1))
        qt = q[0].transpose(0, 1)                                      # (N, H, D)
        out = self._padded(qt, kc, vc) if self.prefill is not None else self._paged(qt, kc, vc)
        return out.transpose(0, 1)[None]                               # (1, H, N, D)

    def _paged(self, qt, kc, vc) -> torch.Tensor:
        """Every row through the paged decode attention: row i sees its context_lens[i] keys."""
        return self.decode_attention(qt, kc, vc, self.block_tables, self.context_lens)

    def _padded(self, qt, kc, vc) -> torch.Tensor:
        """The chunks side by side, padded, through one masked attention call (see PaddedPrefill)."""
        pre = self.prefill
        ks = kc.view(-1, *kc.shape[2:])[pre.key_slots].permute(0, 2, 1, 3)       # (P, H_kv, keys, D)
        vs = vc.view(-1, *vc.shape[2:])[pre.key_slots].permute(0, 2, 1, 3)
        qs = qt[pre.q_rows].transpose(1, 2)                                        # (P, H, queries, D)
        out = scaled_dot_product_attention(qs, ks, vs, mask=pre.mask).transpose(1, 2)   # (P, queries, H, D)
        o = torch.empty_like(qt)                                       # (N, H, D)
        o[pre.q_rows[pre.valid]] = out[pre.valid]
        return o
