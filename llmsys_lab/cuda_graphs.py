"""CUDA graphs for the engine's iterations: launch a whole forward pass with one call.

An iteration of a small model is a few hundred tiny kernels (per layer: norms, four projections,
RoPE, the K/V write, paged attention, the MLP); at small batch each takes a few microseconds on the
GPU, while Python and the launch path take longer to issue it. A CUDA graph records the launches
once and replays them with one call: no Python, no per-kernel launch cost.

What makes every iteration graphable, prefill chunks included, is that on the paged-kernel path
**every packed token is a decode row**: a token at position p of its sequence is one query that
attends to keys 0 .. p of its sequence, read through the sequence's block table, i.e. a row of the
paged decode kernel with context length p + 1. Causality is in the context lengths; a prefill chunk
of n tokens is n rows sharing one block table. So an iteration is fully described by three numbers
per packed token (token id, context length, row of the block-table tensor), whatever mix of prefill
and decode it holds. (Each prefill row re-reads its prefix: n^2 / 2 key reads for a chunk of n
instead of n, served mostly from L2 at the chunk sizes an engine schedules; a varlen prefill kernel
reads them once. Lesson 07 measures what this costs and what the graph saves.)

A graph replays fixed kernels on fixed addresses, so:

* **Buckets.** A graph is captured per iteration size in ``graph_buckets(max_batch, max_tokens)``:
  1, 2, 4, 8, 16, 32, 48, 64, ... up to max_batch (decode batches), then a quarter of each octave
  (320, 384, 448, 512, 640, ...) up to max_tokens. An iteration of n packed tokens runs the smallest
  bucket >= n, its extra rows padding. Each graph is captured the first time its bucket is needed,
  or all of them up front with ``capture_all`` (what a server does at start-up).
* **Static inputs.** Every input lives in one static (3, max bucket) int64 buffer: row 0 the tokens,
  row 1 the context lengths (the new token included), row 2 the row of each token's block table in
  the engine's device-side table. Positions, slots and block tables are derived from it inside the
  graph. Before a replay the engine copies the iteration's values into it (one host-to-device copy);
  padding rows point at a scratch block that no sequence owns, so their K/V writes land there, and
  their tokens are dropped.
* **Warm-up, then capture** (PyTorch's ``torch.cuda.graphs`` recipe): the step runs twice on a side
  stream first (compiling the Triton kernels and initialising cuBLAS outside the capture), then once
  under ``torch.cuda.graph``. Warm-up on the real inputs is harmless: it writes the same K/V to the same
  slots that the replay writes again.
* **Memory.** All buckets' graphs share one memory pool (their intermediates overlap; they never
  run at once, and a replay's output is read before the next replay). ``capture_all`` captures the
  largest bucket first, so the smaller ones fit in the memory it reserved.
* **Nothing syncs inside.** The captured step checks nothing on the host that needs the device's
  values (the engine validated tokens and tables when it built them), and the paged kernel's split
  count is fixed per bucket, so its launch grid never changes between replays.
"""
from __future__ import annotations

import bisect
from typing import Callable

import torch


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: powers of two up to 32, then every 16, and max_batch itself."""
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    sizes = [b for b in (1, 2, 4, 8, 16, 32) if b < max_batch] + list(range(48, max_batch, 16))
    return sizes + [max_batch]


def graph_buckets(max_batch: int, max_tokens: int | None = None) -> list[int]:
    """Iteration sizes to capture: the decode buckets up to max_batch, then steps of a quarter of the
    power of two below (at least 16) up to max_tokens (prefill and mixed iterations)."""
    sizes = decode_buckets(max_batch)
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        n = max_batch
        while n < max_tokens:
            step = max(16, (1 << (n.bit_length() - 1)) // 4)
            n = min((n // step + 1) * step, max_tokens)
            sizes.append(n)
    return sizes


def bucket_for(buckets: list[int], n: int) -> int:
    """The smallest bucket that holds n rows."""
    i = bisect.bisect_left(buckets, n)
    if n < 1 or i == len(buckets):
        raise ValueError(f"an iteration of {n} rows does not fit the buckets {buckets}")
    return buckets[i]


def paged_rows(chunks) -> tuple[list[int], list[int], list[int], list[int]]:
    """An iteration as paged-attention rows. `chunks`: (new token ids, position of the first, block-table
    row) per request in batch order (a prefill chunk of n tokens, or a decode step's one token).
    Returns tokens, context lengths, table rows (one entry per packed token: the token at position p
    sees p + 1 keys) and `last`, the packed row of each request's last token (whose logits give its
    next token)."""
    tokens, lens, rows, last = [], [], [], []
    for ids, start, row in chunks:
        if not ids:
            raise ValueError(f"a chunk with no tokens (table row {row})")
        if start < 0:
            raise ValueError(f"a chunk at position {start} (table row {row}): positions start at 0")
        tokens += ids
        lens += range(start + 1, start + len(ids) + 1)
        rows += [row] * len(ids)
        last.append(len(tokens) - 1)
    return tokens, lens, rows, last


def padded_stage(tokens: list[int], lens: list[int], rows: list[int], size: int, pad: list[int]) -> torch.Tensor:
    """The (3, size) int64 stage of an iteration of len(tokens) packed rows padded to `size` with `pad`
    columns (token, context length, table row): rows 0 tokens, 1 context lengths, 2 table rows."""
    fill = size - len(tokens)
    if fill < 0:
        raise ValueError(f"{len(tokens)} rows do not fit a bucket of {size}")
    return torch.tensor([tokens + [pad[0]] * fill, lens + [pad[1]] * fill, rows + [pad[2]] * fill],
                        dtype=torch.int64)


def capture(step: Callable[[], torch.Tensor], warmup: int = 2, after_warmup: Callable[[], None] | None = None,
            stream: torch.cuda.Stream | None = None, pool=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """PyTorch's recipe: run `step` `warmup` times on a side stream (compiling Triton / Inductor code and
    initialising cuBLAS outside the capture; `after_warmup` after each run, e.g. to undo state the step
    advances), then record one call. Returns (graph, the step's output: the buffer each replay rewrites);
    the recorded call does not run until ``graph.replay()``."""
    side = stream if stream is not None else torch.cuda.Stream()
    main = torch.cuda.current_stream(side.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
            if after_warmup is not None:
                after_warmup()
    main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


class IterationGraphs:
    """One CUDA graph per bucket of an engine step `step(stage) -> next tokens`, `stage` (3, bucket) int64.

    `pad` is the stage column of a padding row (token, context length, table row): a row that reads
    and writes only the scratch block. ``run(tokens, lens, rows)`` pads the iteration's n rows to the
    bucket, copies them into the static buffer, captures the bucket's graph if it is new, replays it
    and returns the first n next tokens (a view of the graph's static output: read it before the
    next replay).
    """

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], buckets: list[int], pad: list[int],
                 device: torch.device, warmup: int = 2):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.step, self.buckets, self.pad, self.warmup = step, list(buckets), list(pad), warmup
        self.stage = torch.zeros(3, self.buckets[-1], dtype=torch.int64, device=device)   # static inputs
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}           # bucket -> (graph, out)
        # one memory pool for every bucket's graph: they never run at the same time, and each one's
        # output is read before the next replay, so their intermediates may share addresses
        self.pool = torch.cuda.graph_pool_handle()
        # one side stream for every warm-up: the caching allocator keeps freed memory per stream, so a
        # new stream per capture would strand each warm-up's memory on its own stream
        self.side = torch.cuda.Stream(device=device)

    @property
    def captured(self) -> list[int]:
        return sorted(self.graphs)

    @property
    def max_tokens(self) -> int:
        """The largest iteration a graph can run; a larger one runs eagerly."""
        return self.buckets[-1]

    def capture_all(self) -> None:
        """Capture every bucket now (largest first, so the smaller graphs reuse its memory), on padding
        rows only: they write to the scratch block, no sequence's K/V changes."""
        for size in reversed(self.buckets):
            if size not in self.graphs:
                stage = self.stage[:, :size]
                stage.copy_(padded_stage([], [], [], size, self.pad))
                self.graphs[size] = self._capture(stage)

    def run(self, tokens: list[int], lens: list[int], rows: list[int]) -> torch.Tensor:
        n = len(tokens)
        size = bucket_for(self.buckets, n)
        stage = self.stage[:, :size]
        stage.copy_(padded_stage(tokens, lens, rows, size, self.pad))   # the only per-iteration input copy
        if size not in self.graphs:
            self.graphs[size] = self._capture(stage)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:n]

    def _capture(self, stage: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        return capture(lambda: self.step(stage), self.warmup, stream=self.side, pool=self.pool)
