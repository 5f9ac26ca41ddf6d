"""A paged KV store: real K/V tensors in the physical blocks of a ``BlockManager``.

Layout per layer: (num_blocks, block_size, kv_heads, head_dim), so one token's K (or V) is
one row of a block, and a sequence's tokens are scattered over whatever blocks it was given.
``PagedBatch`` lets the lesson-03 model run on it: each layer writes the new tokens' K/V into
their slots and reads every sequence's K/V back through its block table (a gather; the Triton
kernel in llmsys_lab/kernels/paged_attention.py reads the blocks directly).
"""
from __future__ import annotations

import torch

from .configs import ModelConfig
from .forward_batch import KVLayout
from .paged import BlockManager, CopyOnWrite


class PagedKVCache:
    """`scratch_blocks` extra blocks after the manager's pool (ids num_blocks, ...) that the manager
    never hands out: the serving engine points the padding rows of a CUDA-graphed decode batch at
    one, so they write and read there and never touch a real sequence's block."""

    def __init__(self, cfg: ModelConfig, manager: BlockManager, dtype=torch.float32, device="cpu",
                 scratch_blocks: int = 0):
        if not isinstance(scratch_blocks, int) or isinstance(scratch_blocks, bool) or scratch_blocks < 0:
            raise ValueError(f"scratch_blocks must be an int >= 0, got {scratch_blocks!r}")
        self.cfg, self.manager = cfg, manager
        self.scratch_blocks = scratch_blocks
        shape = (cfg.num_layers, manager.num_blocks + scratch_blocks, manager.block_size, cfg.num_kv_heads,
                 cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def nbytes(self) -> int:
        """Bytes of the pool's K and V (scratch blocks not counted: they hold no sequence)."""
        per_block = self.k[:, 0].numel() * self.k.element_size()
        return 2 * per_block * self.manager.num_blocks

    def slots(self, seq_id, start: int, count: int) -> torch.Tensor:
        return torch.tensor(self.manager.slots(seq_id, start, start + count), dtype=torch.long, device=self.k.device)

    def write(self, layer: int, seq_id, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (kv_heads, count, head_dim) for positions start .. start + count - 1."""
        idx = self.slots(seq_id, start, k.shape[1])
        flat_k = self.k[layer].view(-1, *self.k.shape[3:])           # (blocks * block_size, H, D)
        flat_v = self.v[layer].view(-1, *self.v.shape[3:])
        flat_k[idx] = k.transpose(0, 1).to(self.k.dtype)
        flat_v[idx] = v.transpose(0, 1).to(self.v.dtype)

    def gather(self, layer: int, seq_id, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_heads, length, head_dim) K and V of a sequence, read through its block table."""
        idx = self.slots(seq_id, 0, length)
        flat_k = self.k[layer].view(-1, *self.k.shape[3:])
        flat_v = self.v[layer].view(-1, *self.v.shape[3:])
        return flat_k[idx].transpose(0, 1), flat_v[idx].transpose(0, 1)

    def copy_block(self, cow: CopyOnWrite | None) -> None:
        if cow is not None:
            self.k[:, cow.dst] = self.k[:, cow.src]
            self.v[:, cow.dst] = self.v[:, cow.src]

    def block_tables(self, seq_ids: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max blocks) int32 block tables (padded with 0) and (B,) int32 context lengths."""
        tables = [self.manager.table(s) for s in seq_ids]
        width = max(len(t.blocks) for t in tables)
        bt = torch.tensor([t.blocks + [0] * (width - len(t.blocks)) for t in tables], dtype=torch.int32)
        lens = torch.tensor([t.num_tokens for t in tables], dtype=torch.int32)
        return bt.to(self.k.device), lens.to(self.k.device)


class PagedBatch(KVLayout):
    """The `kv_cache` argument of LlamaLM.forward for a batch of sequences in a PagedKVCache.

    Rows are left-padded: row b's last `new_counts[b]` columns are its new tokens, whose
    tokens the BlockManager already holds (they were added/appended before the forward).
    update() writes their K/V into the blocks and returns every sequence's full K/V,
    left-padded to the longest, to match the attention mask the caller passes.
    """

    def __init__(self, cache: PagedKVCache, seq_ids: list, new_counts: list[int]):
        self.cache, self.seq_ids, self.new_counts = cache, list(seq_ids), list(new_counts)
        self.totals = [cache.manager.table(s).num_tokens for s in self.seq_ids]
        self.width = max(self.totals)

    @property
    def seq_len(self) -> int:               # columns before the new ones in the padded layout
        return self.width - max(self.new_counts)

    def check_batch(self, batch: int) -> None:
        if batch != len(self.seq_ids):
            raise ValueError(f"this paged batch has {len(self.seq_ids)} sequences but got a batch of {batch}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        b, h, _, d = k.shape
        out_k = k.new_zeros(b, h, self.width, d)
        out_v = v.new_zeros(b, h, self.width, d)
        for row, (seq, n, total) in enumerate(zip(self.seq_ids, self.new_counts, self.totals)):
            self.cache.write(layer, seq, total - n, k[row, :, -n:], v[row, :, -n:])
            ks, vs = self.cache.gather(layer, seq, total)
            out_k[row, :, self.width - total:] = ks
            out_v[row, :, self.width - total:] = vs
        return out_k, out_v

    def attention_mask(self) -> torch.Tensor:
        mask = torch.zeros(len(self.seq_ids), self.width, dtype=torch.bool)
        for row, total in enumerate(self.totals):
            mask[row, self.width - total:] = True
        return mask.to(self.cache.k.device)
