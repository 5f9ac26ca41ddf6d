"""PagedAttention's memory manager (vLLM): KV cache in fixed-size blocks, allocated on demand.

* ``BlockAllocator``: physical blocks, a free list and reference counts.
* ``BlockTable``: one sequence's logical blocks -> (physical block, # filled).
* ``BlockManager``: sequences, their tables, on-demand allocation as tokens arrive, freeing when a
  request finishes, copy-on-write sharing (parallel sampling from one prompt) and prefix caching
  (full blocks found again by their tokens and the prefix before them, kept after release until
  evicted; a lookup compares the tokens, so a hash collision can never share a block).

Only bookkeeping lives here; ``paged_cache.py`` keeps the K/V tensors in these blocks.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .errors import LabError


class BlockError(LabError, ValueError):
    """A block-level operation is invalid (double free, unknown block or sequence, finished sequence)."""


class OutOfBlocks(BlockError):
    """Not enough free blocks for a request: the block budget is exhausted."""


class BlockAllocator:
    """Hands out physical block numbers in `order` (default 0, 1, 2, ...) and counts references.

    Every call checks its block first: an unknown id, a double release or a release of a block that
    is still referenced would otherwise put one block on the free list twice, and two sequences would
    later be handed the same block (one's K/V overwriting the other's).
    """

    def __init__(self, num_blocks: int, order: list[int] | None = None):
        if not _is_int(num_blocks) or num_blocks <= 0:
            raise BlockError(f"num_blocks must be a positive int, got {num_blocks!r}")
        order = list(range(num_blocks)) if order is None else list(order)
        if sorted(order) != list(range(num_blocks)):
            raise BlockError(f"order must be a permutation of 0..{num_blocks - 1}")
        self.num_blocks = num_blocks
        self.free_list = deque(order)
        self._is_free = [True] * num_blocks            # membership of free_list, in O(1)
        self.refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    def allocate(self) -> int:
        if not self.free_list:
            raise OutOfBlocks(f"no free block: all {self.num_blocks} blocks are in use")
        block = self.free_list.popleft()
        self._is_free[block] = False
        self.refcount[block] = 1
        return block

    def _check(self, block: int) -> None:
        if not _is_int(block) or not 0 <= block < self.num_blocks:
            raise BlockError(f"unknown block {block!r} (blocks are 0..{self.num_blocks - 1})")

    def incref(self, block: int) -> None:
        self._check(block)
        if self.refcount[block] == 0:
            raise BlockError(f"block {block} is free: it cannot be shared")
        self.refcount[block] += 1

    def decref(self, block: int) -> int:
        """Drop one reference; return the references left (0: the caller decides where it goes)."""
        self._check(block)
        if self.refcount[block] == 0:
            raise BlockError(f"block {block} is already free (double free)")
        self.refcount[block] -= 1
        return self.refcount[block]

    def release(self, block: int) -> None:
        """Put a block with no references back on the free list."""
        self._check(block)
        if self._is_free[block]:
            raise BlockError(f"block {block} is already free (double release)")
        if self.refcount[block] != 0:
            raise BlockError(f"block {block} still has {self.refcount[block]} references")
        self._is_free[block] = True
        self.free_list.append(block)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class BlockTable:
    """Logical block i of a sequence lives in physical block `blocks[i]`, holding `filled[i]` tokens."""
    blocks: list[int] = field(default_factory=list)
    filled: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)     # the token ids, to find full blocks in the cache
    # per block: the id of the prefix-cache entry it was verified against (None: not in the cache)
    cache_ids: list[int | None] = field(default_factory=list)
    finished: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(self.filled)


@dataclass
class CopyOnWrite:
    """The caller must copy physical block `src` to `dst` (K and V) before writing to `dst`."""
    src: int
    dst: int


@dataclass(frozen=True)
class CachedBlock:
    """A full block in the prefix cache: its tokens and the entry of the block before it.

    A lookup compares both, so a hash collision is a miss, never a shared block: the block's tokens
    must be equal, and so must everything before them, which holds by induction because the parent
    entry was itself verified (entry ids are never reused, unlike physical block numbers).
    """
    block: int
    tokens: tuple[int, ...]
    parent: int                     # entry id of the previous block (ROOT for a sequence's first block)
    entry: int                      # this entry's id


ROOT = 0                            # the parent of a sequence's first block


class BlockManager:
    """Sequences and their block tables on one pool.

    Every operation is atomic: it either succeeds or raises (``BlockError`` / ``OutOfBlocks``) with
    the manager exactly as it was before, so a caller may catch ``OutOfBlocks``, preempt someone
    and try again.
    """

    def __init__(self, num_blocks: int, block_size: int, order: list[int] | None = None,
                 prefix_caching: bool = False):
        if not _is_int(block_size) or block_size <= 0:
            raise BlockError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks, order)
        self.tables: dict[object, BlockTable] = {}
        self.finished: set = set()
        self.prefix_caching = prefix_caching
        self.cached: dict[int, CachedBlock] = {}           # key of a full block -> its cache entry
        self.block_key: dict[int, int] = {}                # physical block -> its key in `cached`
        self.evictable: OrderedDict[int, None] = OrderedDict()   # cached blocks nobody uses, LRU first
        self.hits = self.misses = 0
        self._next_entry = ROOT + 1

    # ---- capacity ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: free plus evictable cached blocks."""
        return self.allocator.num_free + len(self.evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.num_free

    def _new_block(self) -> int:
        """A free block, evicting the least recently released cached block if none is free.
        Raises OutOfBlocks before changing anything."""
        if self.allocator.num_free == 0 and self.evictable:
            victim, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_key.pop(victim)]
            self.allocator.release(victim)
        return self.allocator.allocate()

    # ---- sequences -----------------------------------------------------------------------------
    def table(self, seq_id) -> BlockTable:
        if seq_id in self.finished:
            raise BlockError(f"sequence {seq_id!r} has finished and its blocks were freed")
        if seq_id not in self.tables:
            raise BlockError(f"unknown sequence {seq_id!r}")
        return self.tables[seq_id]

    def _check_new_id(self, seq_id) -> None:
        if seq_id in self.tables or seq_id in self.finished:
            raise BlockError(f"sequence {seq_id!r} already exists")

    def add(self, seq_id, tokens: list[int]) -> BlockTable:
        """Register a request and allocate blocks for its prompt (reusing cached prefix blocks)."""
        self._check_new_id(seq_id)
        tokens = list(tokens)
        if len(tokens) == 0:
            raise BlockError(f"sequence {seq_id!r} has an empty prompt")
        for i, t in enumerate(tokens):
            if not _is_int(t):
                raise BlockError(f"sequence {seq_id!r}: token {i} is {t!r}, not an int")
        need = self.blocks_needed(len(tokens))
        if need > self.num_free:
            raise OutOfBlocks(f"sequence {seq_id!r} needs {need} blocks for {len(tokens)} tokens "
                              f"(block size {self.block_size}) but only {self.num_free} of {self.num_blocks} are free")
        # each logical block takes at most one block off num_free (a new one, or an evictable cached
        # one in its place), so the check above guarantees the appends below cannot run out
        table = self.tables[seq_id] = BlockTable()
        for tok in tokens:
            self._append(table, tok)
        return table

    def append(self, seq_id, token: int) -> CopyOnWrite | None:
        """Add one generated token, allocating a block when the last one is full."""
        table = self.table(seq_id)
        if not _is_int(token):
            raise BlockError(f"sequence {seq_id!r}: token is {token!r}, not an int")
        return self._append(table, token)

    def _append(self, table: BlockTable, token: int) -> CopyOnWrite | None:
        bs, cow = self.block_size, None
        if not table.blocks or table.filled[-1] == bs:
            table.blocks.append(self._new_block())          # raises before any change
            table.filled.append(0)
            table.cache_ids.append(None)
        elif self.allocator.refcount[table.blocks[-1]] > 1:       # shared partial block: copy on write
            src = table.blocks[-1]
            dst = self._new_block()                         # first the new block (may raise) ...
            self.allocator.decref(src)                      # ... then drop the shared one
            table.blocks[-1] = dst
            cow = CopyOnWrite(src, dst)
        table.filled[-1] += 1
        table.tokens.append(token)
        if self.prefix_caching and table.filled[-1] == bs:
            self._cache_full_block(table)
        return cow

    @staticmethod
    def _block_key(parent: int, tokens: tuple[int, ...]) -> int:
        """Where a full block is looked up; equal keys are only candidates (see CachedBlock)."""
        return hash((parent, tokens))

    def _cache_full_block(self, table: BlockTable) -> None:
        """A block just filled: share an identical cached block if there is one, else publish it."""
        parent = ROOT if len(table.blocks) == 1 else table.cache_ids[-2]
        if parent is None:                      # the block before it is not in the cache: neither is this
            return
        tokens = tuple(table.tokens[-self.block_size:])
        key = self._block_key(parent, tokens)
        block = table.blocks[-1]
        entry = self.cached.get(key)
        if entry is not None and entry.parent == parent and entry.tokens == tokens:
            if entry.block == block:
                return
            self.hits += 1
            hit = entry.block
            if hit in self.evictable:
                del self.evictable[hit]
                self.allocator.refcount[hit] = 1
            else:
                self.allocator.incref(hit)
            if self.allocator.decref(block) == 0:
                self.allocator.release(block)
            table.blocks[-1] = hit
            table.cache_ids[-1] = entry.entry
        elif entry is None:
            self.misses += 1
            self.cached[key] = CachedBlock(block, tokens, parent, self._next_entry)
            self.block_key[block] = key
            table.cache_ids[-1] = self._next_entry
            self._next_entry += 1
        else:                                   # a collision: another block owns the key; keep ours private
            self.misses += 1

    def fork(self, parent_id, child_id) -> BlockTable:
        """Parallel sampling: the child shares every block of the parent (copy on write later)."""
        parent = self.table(parent_id)
        self._check_new_id(child_id)
        for b in parent.blocks:
            self.allocator.incref(b)
        child = self.tables[child_id] = BlockTable(list(parent.blocks), list(parent.filled), list(parent.tokens),
                                                   list(parent.cache_ids))
        return child

    def free(self, seq_id, reuse_id: bool = False) -> None:
        """The request finished: drop its references; unused blocks return to the pool.

        The id is retired (using it again is an error) unless `reuse_id`: a preempted request is
        freed and later added again under the same id."""
        table = self.table(seq_id)
        for b in reversed(table.blocks):
            if self.allocator.decref(b) == 0:
                if b in self.block_key:
                    self.evictable[b] = None            # keep its K/V for a later identical prefix
                else:
                    self.allocator.release(b)
        table.finished = True
        del self.tables[seq_id]
        if not reuse_id:
            self.finished.add(seq_id)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def slots(self, seq_id, start: int, stop: int) -> list[int]:
        """Physical slots (block * block_size + offset) of token positions start .. stop - 1."""
        table, bs = self.table(seq_id), self.block_size
        if not 0 <= start <= stop <= table.num_tokens:
            raise BlockError(f"sequence {seq_id!r} has {table.num_tokens} tokens, no positions {start}..{stop - 1}")
        return [table.blocks[p // bs] * bs + p % bs for p in range(start, stop)]

    def slot(self, seq_id, position: int) -> int:
        return self.slots(seq_id, position, position + 1)[0]

    # ---- rollback (speculative decoding) ----------------------------------------------------------
    def truncate(self, seq_id, num_tokens: int) -> list[int]:
        """Keep the first `num_tokens` tokens of a sequence; return the physical blocks it gave up.

        Rejected draft tokens are dropped: blocks left empty lose this sequence's reference (and go
        back to the pool, or to the evictable prefix cache, exactly as in free()). A kept block that
        is now partly filled must not be written in place if someone else may read it: when shared,
        the next append copies it (copy on write); when published in the prefix cache and not
        shared, it is unpublished, since its tokens will change.
        """
        table, bs = self.table(seq_id), self.block_size
        if not _is_int(num_tokens) or not 1 <= num_tokens <= table.num_tokens:
            raise BlockError(f"cannot truncate sequence {seq_id!r} to {num_tokens!r} tokens: it holds "
                             f"{table.num_tokens} (keep 1..{table.num_tokens}; free() drops a whole sequence)")
        keep_blocks = self.blocks_needed(num_tokens)
        dropped = []
        while len(table.blocks) > keep_blocks:
            b = table.blocks.pop()
            table.filled.pop()
            table.cache_ids.pop()
            if self.allocator.decref(b) == 0:
                if b in self.block_key:
                    self.evictable[b] = None
                else:
                    self.allocator.release(b)
            dropped.append(b)
        table.filled[-1] = num_tokens - (keep_blocks - 1) * bs
        del table.tokens[num_tokens:]
        last = table.blocks[-1]
        if table.filled[-1] < bs:
            table.cache_ids[-1] = None                  # no longer a full block of this sequence
            if last in self.block_key and self.allocator.refcount[last] == 1:
                del self.cached[self.block_key.pop(last)]
        return dropped
