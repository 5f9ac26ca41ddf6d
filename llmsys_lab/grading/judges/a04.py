"""Assignment 04 (paged KV): the block allocator and block tables driven through operation sequences drawn per
submission (llmsys_lab.grading.drivers.a04) and replayed here on a model of the rules the assignment states;
gather_kv and paged_decode_attention against float64 computations on fresh caches and block tables."""
from __future__ import annotations

import math
from collections import deque

import torch

from ...errors import LabError
from ..harness import Call, Spec, _close, _err

ASSIGNMENT = "04_paged_kv"
DRIVERS = "llmsys_lab.grading.drivers.a04"
OK, OUT_OF_BLOCKS, BLOCK_ERROR, OTHER = 0, -1, -2, -3
PAD = -9
_SHOWN = {OK: "success", OUT_OF_BLOCKS: "OutOfBlocks", BLOCK_ERROR: "BlockError (not OutOfBlocks)",
          OTHER: "an exception that is not a BlockError"}


# ---- the model: the assignment's rules, written here -------------------------------------------------
class _Pool:
    def __init__(self, num_blocks, order):
        self.free = deque(range(num_blocks) if order is None else order)
        self.used: set[int] = set()

    def allocate(self):
        if not self.free:
            raise _Refused(OUT_OF_BLOCKS)
        block = self.free.popleft()
        self.used.add(block)
        return block

    def release(self, block):
        if block not in self.used:
            raise _Refused(BLOCK_ERROR)
        self.used.remove(block)
        self.free.append(block)


class _Refused(LabError):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


class _Tables:
    def __init__(self, num_blocks, order, block_size):
        self.pool, self.bs = _Pool(num_blocks, order), block_size
        self.tables: dict[str, list[int]] = {}
        self.filled: dict[str, list[int]] = {}

    def add(self, seq, n):
        need = -(-n // self.bs)
        if need > len(self.pool.free):
            raise _Refused(OUT_OF_BLOCKS)
        self.tables[seq] = [self.pool.allocate() for _ in range(need)]
        self.filled[seq] = [self.bs] * (need - 1) + [n - self.bs * (need - 1)]

    def append(self, seq):
        if seq not in self.tables:
            raise _Refused(BLOCK_ERROR)
        if self.filled[seq][-1] == self.bs:
            self.tables[seq].append(self.pool.allocate())
            self.filled[seq].append(0)
        self.filled[seq][-1] += 1

    def free(self, seq):
        if seq not in self.tables:
            raise _Refused(BLOCK_ERROR)
        for block in reversed(self.tables.pop(seq)):
            self.pool.release(block)
        del self.filled[seq]

    def record(self, seq, num_blocks):
        if seq not in self.tables:
            return [0] + [PAD] * (2 * num_blocks)
        b, f = self.tables[seq], self.filled[seq]
        return [1] + b + [PAD] * (num_blocks - len(b)) + f + [PAD] * (num_blocks - len(f))


def _apply(obj, op):
    try:
        value = getattr(obj, op[0])(*op[1:])
        return OK if value is None else value
    except _Refused as refused:
        return refused.code


# ---- operation sequences drawn per submission ---------------------------------------------------------
def _pick(g, n):
    return int(torch.randint(n, (), generator=g))


def _perm(g, n):
    return torch.randperm(n, generator=g).tolist()


def _allocator_ops(g, num_blocks, order, length):
    """Allocations and releases (of used blocks, double frees, numbers outside the pool), then the pool run dry."""
    pool, ops = _Pool(num_blocks, order), []
    for i in range(length):
        eager = (i // 12) % 2 == 0                       # phases that fill the pool and phases that drain it
        r = torch.rand((), generator=g).item()
        if r < (0.7 if eager else 0.25) or not pool.used:
            op = ["allocate"]
        elif r < 0.9:
            op = ["release", sorted(pool.used)[_pick(g, len(pool.used))]]
        elif r < 0.96 or not pool.free:
            op = ["release", (sorted(set(range(num_blocks)) - pool.used) or [num_blocks])[
                _pick(g, max(1, num_blocks - len(pool.used)))]]
        else:
            op = ["release", num_blocks + _pick(g, 5)]
        ops.append(op)
        _apply(pool, op)
    ops += [["allocate"]] * (len(pool.free) + 2)           # exhaustion
    block = sorted(pool.used | set(range(num_blocks)))[_pick(g, num_blocks)]
    ops += [["release", block], ["release", block], ["allocate"], ["allocate"]]   # a double free, then reuse
    return ops


def _table_ops(g, num_blocks, block_size, length, max_prompt):
    """Adds (some too large for the free blocks), appends (some needing a new block with none free), frees
    and frees of unknown or finished sequences; every name is added once."""
    model, ops, live, done, n = _Tables(num_blocks, None, block_size), [], [], [], 0
    for _ in range(length):
        r = torch.rand((), generator=g).item()
        if r < 0.25 or not live:
            ops.append(["add", f"s{n}", 1 + _pick(g, max_prompt)])
            n += 1
        elif r < 0.8:
            ops.append(["append", live[_pick(g, len(live))]])
        elif r < 0.95:
            ops.append(["free", live[_pick(g, len(live))]])
        else:
            ops.append(["free", done[_pick(g, len(done))] if done and r < 0.975 else f"never{n}"])
        if _apply(model, ops[-1]) == OK:
            if ops[-1][0] == "add":
                live.append(ops[-1][1])
            elif ops[-1][0] == "free":
                live.remove(ops[-1][1])
                done.append(ops[-1][1])
    return ops


def _names(ops):
    return sorted({op[1] for op in ops}, key=lambda s: (len(s), s))


_LECTURE = ([7, 1, 5, 0, 2, 3, 4, 6], [7, 1, 3, 2, 5, 0, 4, 6])
_FIXED_TRACE = [["add", "a", 5], ["add", "b", 3], ["append", "b"], ["append", "b"], ["add", "c", 5], ["free", "a"],
                ["add", "c", 5], ["append", "c"], ["append", "c"], ["free", "b"], ["append", "c"], ["add", "d", 2]]


def _calls(g: torch.Generator):
    t: dict[str, torch.Tensor] = {}
    calls = []
    for i in range(4):
        num_blocks = 3 + _pick(g, 10)
        order = _perm(g, num_blocks) if i % 2 else None
        calls.append(Call(f"alloc/{i}", "BlockAllocator", [num_blocks, order, _allocator_ops(g, num_blocks, order, 60)],
                          via=f"{DRIVERS}:drive_allocator"))

    def tables(cid, num_blocks, order, block_size, ops):
        calls.append(Call(cid, "BlockTables", [num_blocks, order, block_size, ops, _names(ops)],
                          via=f"{DRIVERS}:drive_tables"))

    lecture = [["add", "A", 6], ["append", "A"], ["append", "A"], ["append", "A"]]
    for i, order in enumerate(list(_LECTURE) + [_perm(g, 8), _perm(g, 8)]):
        two = i % 2 == 1
        tables(f"lecture/{i}", 8, order, 4, lecture + ([["add", "B", 7]] if two else []) + [["free", "A"]]
               + ([["append", "B"], ["append", "B"], ["free", "B"]] if two else []))
    tables("trace/fixed", 6, None, 2, _FIXED_TRACE)
    for i, (num_blocks, block_size, length, max_prompt) in enumerate(((16, 3, 300, 12), (16, 3, 300, 12),
                                                                      (16, 3, 300, 12), (5, 1, 120, 4),
                                                                      (10, 2 + _pick(g, 4), 200, 20))):
        ops = _table_ops(g, num_blocks, block_size, length, max_prompt)
        tables(f"trace/{i}", num_blocks, _perm(g, num_blocks), block_size, ops)

    for i, (nb, bs, h, d, dtype, kind) in enumerate(((10, 4, 2, 8, torch.float32, "list"),
                                                      (12, 3, 1, 16, torch.float64, "int32"),
                                                      (7, 8, 4, 4, torch.float32, "int64"),
                                                      (9, 1, 2, 8, torch.float32, "list"))):
        t[f"g{i}.k"] = torch.randn(nb, bs, h, d, generator=g, dtype=dtype)
        t[f"g{i}.v"] = torch.randn(nb, bs, h, d, generator=g, dtype=dtype)
        for j, length in enumerate((1 + _pick(g, nb * bs), bs * (1 + _pick(g, nb)), 1)):
            table = _perm(g, nb)[:-(-length // bs) + _pick(g, 2)] or [0]          # sometimes one block more
            if kind != "list":
                t[f"g{i}.{j}.table"] = torch.tensor(table, dtype=getattr(torch, kind))
                table = f"g{i}.{j}.table"
            calls.append(Call(f"gather/{i}/{j}", "gather_kv", [f"g{i}.k", f"g{i}.v", table, length]))

    for i, (b, h_kv, group, d, bs, nb, dtype, scale) in enumerate((
            (3, 2, 4, 16, 4, 20, torch.float32, 1.0), (2, 4, 1, 8, 8, 6, torch.float32, 1.0),
            (4, 1, 4, 8, 2, 40, torch.float32, 3.0), (2, 2, 2, 16, 1, 30, torch.float64, 1.0),
            (1 + _pick(g, 4), 1 + _pick(g, 3), 1 + _pick(g, 3), 8, 1 + _pick(g, 6), 48, torch.float32, 1.0))):
        per_seq = nb // b
        lengths = [1 + _pick(g, per_seq * bs) for _ in range(b)]
        lengths[_pick(g, b)] = 1 if i % 2 else per_seq * bs                         # one token; a full table
        perm = _perm(g, nb)
        rows = [perm[s * per_seq:s * per_seq + -(-n // bs)] for s, n in enumerate(lengths)]
        width = max(len(r) for r in rows)
        t[f"p{i}.tables"] = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
        t[f"p{i}.lengths"] = torch.tensor(lengths, dtype=torch.int32)
        t[f"p{i}.q"] = torch.randn(b, h_kv * group, d, generator=g, dtype=dtype) * scale
        t[f"p{i}.k"] = torch.randn(nb, bs, h_kv, d, generator=g, dtype=dtype) * scale
        t[f"p{i}.v"] = torch.randn(nb, bs, h_kv, d, generator=g, dtype=dtype)
        calls.append(Call(f"paged/{i}", "paged_decode_attention", [f"p{i}.{x}" for x in ("q", "k", "v", "tables",
                                                                                          "lengths")]))
    return calls, t


# ---- judges ---------------------------------------------------------------------------------------------
def _calls_of(t, prefix):
    return [c for c in t["__calls__"] if c.id.startswith(prefix)]


def _shown_op(op):
    return " ".join(str(x) for x in op)


def _judge_allocator(t, outputs, errors):
    for call in _calls_of(t, "alloc/"):
        if _err(errors, call.id):
            return _err(errors, call.id)
        num_blocks, order, ops = call.args
        got = outputs.get(call.id)
        where = f"BlockAllocator({num_blocks}{'' if order is None else f', order={order}'})"
        if not isinstance(got, torch.Tensor) or got.numel() != 1 + 2 * len(ops):
            return f"{call.id}: {where}: no result for every operation"
        got = got.tolist()
        pool = _Pool(num_blocks, order)
        if got[0] != num_blocks:
            return f"{where}: num_free of a fresh allocator is {got[0]}, expected {num_blocks}"
        for i, op in enumerate(ops):
            want, free = _apply(pool, op), len(pool.free)
            value, num_free = got[1 + 2 * i], got[2 + 2 * i]
            history = "; ".join(_shown_op(o) for o in ops[max(0, i - 6):i + 1])
            if value != want:
                shown = (lambda x: f"block {x}" if op[0] == "allocate" and x >= 0 else _SHOWN.get(x, x))
                return f"{where}, operation {i} ({_shown_op(op)}; the last ones: {history}): expected " \
                       f"{shown(want)}, got {shown(value)}"
            if num_free != free:
                return f"{where}, after operation {i} ({_shown_op(op)}): num_free {num_free}, expected {free}"
    return None


def _judge_tables(prefix):
    def judge(t, outputs, errors):
        for call in _calls_of(t, prefix):
            if _err(errors, call.id):
                return _err(errors, call.id)
            num_blocks, order, block_size, ops, names = call.args
            rec = 3 + 1 + 2 * num_blocks
            got = outputs.get(call.id)
            where = f"{num_blocks} blocks{'' if order is None else f' (free list {order})'}, block size {block_size}"
            if not isinstance(got, torch.Tensor) or got.numel() != rec * len(ops) + (rec - 3) * len(names):
                return f"{call.id}: {where}: no result for every operation"
            got = got.tolist()
            model = _Tables(num_blocks, order, block_size)
            for i, op in enumerate(ops):
                want = [_apply(model, op), len(model.pool.free), len(model.tables)] + model.record(op[1], num_blocks)
                mine = got[rec * i:rec * (i + 1)]
                if mine == want:
                    continue
                history = "; ".join(_shown_op(o) for o in ops[max(0, i - 5):i + 1])
                at = f"{where}: operation {i} ({_shown_op(op)}; the last ones: {history})"
                if mine[0] != want[0]:
                    return f"{at}: expected {_SHOWN[want[0]]}, got {_SHOWN.get(mine[0], mine[0])}"
                if mine[1] != want[1]:
                    return f"{at}: afterwards num_free is {mine[1]}, expected {want[1]}"
                if mine[2] != want[2]:
                    return f"{at}: afterwards {mine[2]} sequences are live, expected {want[2]}"
                return f"{at}: afterwards {_shown_table(op[1], mine[3:], num_blocks)}, expected " \
                       f"{_shown_table(op[1], want[3:], num_blocks)}"
            base = rec * len(ops)
            for j, seq in enumerate(names):
                mine = got[base + (rec - 3) * j: base + (rec - 3) * (j + 1)]
                want = model.record(seq, num_blocks)
                if mine != want:
                    return f"{where}: at the end of the {len(ops)} operations, " \
                           f"{_shown_table(seq, mine, num_blocks)}, expected {_shown_table(seq, want, num_blocks)}"
        return None
    return judge


def _shown_table(seq, record, num_blocks):
    if not record[0]:
        return f"sequence {seq!r} absent"
    blocks = [b for b in record[1:1 + num_blocks] if b != PAD]
    filled = [f for f in record[1 + num_blocks:] if f != PAD]
    return f"sequence {seq!r} has blocks {blocks} filled {filled}"


def _gather_ref(k, v, table, length):
    bs = k.shape[1]
    table = torch.as_tensor(table).long()
    pos = torch.arange(length)
    blocks = table[pos // bs]
    return (k.double()[blocks, pos % bs].transpose(0, 1).to(k.dtype),
            v.double()[blocks, pos % bs].transpose(0, 1).to(v.dtype))


def _judge_gather(t, outputs, errors):
    for call in _calls_of(t, "gather/"):
        if _err(errors, call.id):
            return _err(errors, call.id)
        k, v, table, length = call.args
        table = t[table] if isinstance(table, str) else table
        shown_table = table.tolist() if isinstance(table, torch.Tensor) else table
        want = _gather_ref(t[k], t[v], table, length)
        for j, name in enumerate(("keys", "values")):
            why = _close(outputs.get(f"{call.id}#{j}"), want[j], 0.0, 0.0)
            if why:
                return (f"gather_kv on caches of shape {tuple(t[k].shape)} {str(t[k].dtype)[6:]}, table {shown_table} "
                        f"({'a list' if isinstance(table, list) else f'a {str(table.dtype)[6:]} tensor'}), "
                        f"length {length}: {name}: {why}")
    return None


def _paged_ref(q, k_cache, v_cache, tables, lengths):
    b, h, d = q.shape
    out = torch.zeros(b, h, d, dtype=torch.float64)
    for i in range(b):
        k, v = _gather_ref(k_cache.double(), v_cache.double(), tables[i], int(lengths[i]))
        group = h // k.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        scores = torch.einsum("hd,htd->ht", q[i].double(), k) / math.sqrt(d)
        out[i] = torch.einsum("ht,htd->hd", torch.softmax(scores, -1), v)
    return out.to(q.dtype)


def _judge_paged(t, outputs, errors):
    for call in _calls_of(t, "paged/"):
        if _err(errors, call.id):
            return _err(errors, call.id)
        q, k, v, tables, lengths = (t[a] for a in call.args)
        why = _close(outputs.get(call.id), _paged_ref(q, k, v, tables, lengths), 1e-5, 1e-5)
        if why:
            return (f"paged_decode_attention, q {tuple(q.shape)}, caches {tuple(k.shape)} {str(q.dtype)[6:]}, "
                    f"lengths {lengths.tolist()}: {why}")
    return None


SPEC = Spec(
    hide=[], calls=_calls,
    forbid=("kit:paged.py", "kit:paged_cache.py", "kit:paged_generate.py", "kit:kernels/paged_attention.py"),
    judge={"test_allocator": _judge_allocator, "test_lecture_block_table": _judge_tables("lecture/"),
           "test_traces": _judge_tables("trace/"), "test_gather": _judge_gather,
           "test_paged_attention": _judge_paged})
