"""Assignment 04 (paged KV): the student's BlockAllocator and BlockTables driven through scripted operation
sequences. Each operation's outcome and the state it leaves are recorded as a flat int64 tensor; the harness
replays the same operations on its own model outside the sandbox. No answer is computed here."""
from __future__ import annotations

OK, OUT_OF_BLOCKS, BLOCK_ERROR, OTHER = 0, -1, -2, -3
PAD = -9


def _outcome(err, ns) -> int:
    out_of_blocks, block_error = ns.get("OutOfBlocks"), ns.get("BlockError")
    if isinstance(out_of_blocks, type) and isinstance(err, out_of_blocks) and isinstance(err, ValueError):
        return OUT_OF_BLOCKS
    if isinstance(block_error, type) and isinstance(err, block_error) and isinstance(err, ValueError):
        return BLOCK_ERROR
    return OTHER


def _int(x, what) -> int:
    value = int(x)
    if value != x:
        raise TypeError(f"{what} is {x!r}, not an integer")
    return value


def drive_allocator(fn, name, ns):
    """ops: ["allocate"] or ["release", block]. Per op: (the allocated block, 0 for a release, or the error
    code), then num_free afterwards."""
    def run(num_blocks, order, ops):
        allocator = fn(num_blocks) if order is None else fn(num_blocks, order=list(order))
        out = [_int(allocator.num_free, "num_free")]
        for op in ops:
            try:
                value = _int(allocator.allocate(), "the allocated block") if op[0] == "allocate" else (
                    allocator.release(op[1]), OK)[1]
            except Exception as err:  # noqa: BLE001  (recorded: the harness decides whether it was due)
                value = _outcome(err, ns)
            out += [value, _int(allocator.num_free, "num_free")]
        return _tensor(out)
    return run


def _table(bt, seq, num_blocks):
    """present flag, blocks padded to num_blocks, filled padded to num_blocks."""
    if seq not in bt.tables:
        return [0] + [PAD] * (2 * num_blocks)
    blocks, filled = list(bt.tables[seq]), list(bt.filled[seq])
    if len(blocks) > num_blocks or len(filled) > num_blocks:
        raise ValueError(f"sequence {seq!r} holds more than the pool's {num_blocks} blocks")
    return ([1] + [_int(b, "a block number") for b in blocks] + [PAD] * (num_blocks - len(blocks))
            + [_int(f, "a filled count") for f in filled] + [PAD] * (num_blocks - len(filled)))


def drive_tables(fn, name, ns):
    """BlockTables(BlockAllocator(num_blocks, order), block_size) (both the notebook's) through ops
    ["add", seq, n] / ["append", seq] / ["free", seq]. Per op: outcome, num_free, number of live sequences and
    the touched sequence's table; at the end every named sequence's table."""
    def run(num_blocks, order, block_size, ops, names):
        allocator_cls = ns.get("BlockAllocator")
        if allocator_cls is None:
            raise NameError("name 'BlockAllocator' is not defined")
        allocator = allocator_cls(num_blocks) if order is None else allocator_cls(num_blocks, order=list(order))
        bt = fn(allocator, block_size)
        out = []
        for op in ops:
            try:
                getattr(bt, op[0])(*op[1:])
                outcome = OK
            except Exception as err:  # noqa: BLE001
                outcome = _outcome(err, ns)
            out += [outcome, _int(bt.allocator.num_free, "num_free"), len(bt.tables)] + _table(bt, op[1], num_blocks)
        for seq in names:
            out += _table(bt, seq, num_blocks)
        return _tensor(out)
    return run


def _tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.int64)
