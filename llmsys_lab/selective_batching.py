"""Orca's selective batching, made visible: which rows of the packed batch belong to which request.

The engine packs the new tokens of every scheduled request (whole prompts being prefilled and
single decode tokens alike) into one ``(sum of L_i, hidden)`` matrix, because everything except
attention treats rows independently: norms, projections, MLP. Attention mixes positions, so it is
split per request. This module records one real engine iteration from the outside (it wraps the
scheduler's decision and hooks the model's embedding, the first packed operator) and reports the
packed tensor's shape and each request's rows, so a lesson can print the slide's ``[7, H]`` tensor
from the engine itself rather than describe it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackedBatch:
    """One iteration's packed batch.

    shape:  shape of the embedding output, (total tokens, hidden): the tensor every non-attention
            operator of the iteration sees.
    rows:   request id -> range of rows it owns in that tensor, in packing order.
    kinds:  request id -> "prefill" (its prompt, or a chunk of it) or "decode" (one new token).
    token_ids: the token ids the embedding received, row by row.
    """

    shape: tuple[int, ...]
    rows: dict
    kinds: dict
    token_ids: list[int]

    def describe(self) -> str:
        lines = [f"packed tensor for the non-attention operators: [{self.shape[0]}, {self.shape[1]}]"]
        for rid, rng in self.rows.items():
            where = f"row {rng.start}" if len(rng) == 1 else f"rows {rng.start}..{rng.stop - 1}"
            lines.append(f"  {rid}: {where:<10} [{len(rng)}, H]  ({self.kinds[rid]}; attention on its own)")
        return "\n".join(lines)


def packed_rows(prefill, decode) -> tuple[dict, dict]:
    """Rows of each request in the packed batch, for a scheduler's Work: prefill chunks first, in
    order, then one row per decoding request (the order the engine packs them in)."""
    rows, kinds, at = {}, {}, 0
    for r, n in prefill:
        rows[r.id], kinds[r.id], at = range(at, at + n), "prefill", at + n
    for r in decode:
        rows[r.id], kinds[r.id], at = range(at, at + 1), "decode", at + 1
    return rows, kinds


def trace_step(engine) -> PackedBatch:
    """Run one ``engine.step()`` and return the packed batch it built.

    The scheduler's decision and the embedding's input/output are observed through a wrapper and
    a forward hook, both removed afterwards; the engine runs unchanged.
    """
    seen: dict = {}
    schedule = engine.scheduler.schedule

    def recording_schedule(*args, **kw):
        work = schedule(*args, **kw)
        seen["rows"], seen["kinds"] = packed_rows(work.prefill, work.decode)
        return work

    def hook(module, inputs, output):
        seen["shape"] = tuple(output.shape)                                  # (N, hidden)
        seen["ids"] = inputs[0].tolist()

    engine.scheduler.schedule = recording_schedule
    handle = engine.model.model.embed_tokens.register_forward_hook(hook)
    try:
        engine.step()
    finally:
        handle.remove()
        del engine.scheduler.schedule                                        # back to the class's method
    if "shape" not in seen:
        raise RuntimeError("the engine scheduled no work in this step: nothing was packed")
    return PackedBatch(seen["shape"], seen["rows"], seen["kinds"], seen["ids"])
