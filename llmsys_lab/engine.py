"""A serving engine: the scheduler's decisions run on the real model with the paged KV cache.

Every iteration runs the requests the scheduler picked, prefill chunks and decodes together, in
one forward pass with **selective batching** (Orca): the tokens of all requests are packed into
one (total tokens, hidden) matrix for everything that does not mix positions (embedding, norms,
Q/K/V and output projections, MLP, LM head), and only attention is per request: each request's
queries attend to its own K/V, read through its block table. With the paged kernel (on a GPU, and
wherever ``use_kernel=True``) every packed token is a row of the paged decode kernel: a token at
position p attends to keys 0 .. p of its sequence, so a prefill chunk of n tokens is n rows sharing
its block table and causality is in the context lengths (one launch per layer for the whole
iteration). Without the kernel (the CPU default) prefill chunks are laid side by side in one padded,
masked attention call. Only that attention call sees padding; the matmuls never do.

**One forward pass.** The engine does not run the layers itself: it builds the iteration's layout,
a ``PackedPagedBatch`` (positions, slot mapping, each row's block table and context length, or the
prefill chunks' padded layout; llmsys_lab/forward_batch.py), and calls the
model, ``model(packed_token_ids, kv_cache=batch)``. The model's attention layers call the layout's
``attend``: the same ``LlamaLM`` / ``LlamaBlock`` / ``MultiHeadAttention`` code that ``generate``,
``paged_generate`` and speculative decoding run on the contiguous and paged caches.

**CUDA graphs** (llmsys_lab/cuda_graphs.py). On the Triton kernel path an iteration, decode, prefill
or both, is three numbers per packed token (token, context length, block-table row), so it is
padded up to a bucket size (1, 2, 4, 8, 16, 32, 48, ... up to max_batch, then steps of a quarter
octave up to ``min(token_budget, max_graph_tokens)``; ``graph_buckets``) and replayed from a CUDA
graph captured for that bucket (at its first use, or all at once with ``capture_graphs()``);
padding rows write to a scratch block of the KV pool that no sequence owns, and their tokens are
dropped. A larger iteration runs eagerly. ``cuda_graphs=None`` turns graphs on where they can run
(a CUDA model with the paged kernel). Forward hooks do not run on a replay, so an iteration runs
eagerly whenever a module of the model has a forward hook. ``log[i]["graph"]`` says whether
iteration i was replayed. The paged kernel's split count (``num_splits``) is fixed per bucket,
eager or graphed, so both run the same kernels.

**Incremental host work.** Each running request owns a row of a device-side block-table tensor
for as long as it runs; a row is uploaded only when the request's table changed (a new block, or
a copy-on-write / prefix-cache swap of its last block), and released when the request leaves. An
iteration then sends one (3, tokens) tensor (tokens, context lengths, table rows) to the device;
positions and slots are computed there. What stays per request is reading its last token and
length (O(1) each); prefill chunks list their new tokens (they are new work anyway).

Finished requests (EOS or max_new_tokens) leave after the iteration and are returned at once
(streaming); their blocks go back to the pool for the next admission. The engine only runs the
model: tokens, completion and preemption are applied by ``Scheduler.postprocess``, the same path the
simulator takes, so both produce the same schedule on the same workload (``log[i]["schedule"]``).

Clocks: a request's ``arrival_step`` / ``admitted_step`` are iterations; ``arrival_time``,
``first_token_time``, ``finished_time`` and ``token_times`` are seconds since the engine's first
iteration began (a request arrives at the start of iteration ``arrival_step``).
"""
from __future__ import annotations

import time

import torch

from ._runtime import triton_available
from .cuda_graphs import IterationGraphs, bucket_for, graph_buckets, paged_rows
from .forward_batch import PackedPagedBatch, PaddedPrefill
from .generate import check_token_ids
from .paged import BlockManager
from .paged_cache import PagedKVCache
from .sampling import SamplingBatch, SamplingParams, sample
from .scheduler import Outcome, Request, Scheduler
from .validate import check_bool, check_token_id


# ---- decode-attention dispatch ------------------------------------------------------------------
KERNEL_PATH = "triton paged decode kernel"
REFERENCE_PATH = "pytorch reference of paged decode attention (Triton unavailable)"
REFERENCE_BF16_PATH = "pytorch reference of paged decode attention (bf16 on a GPU below compute capability 8.0)"
PADDED_PATH = "padded attention (no paged decode kernel)"
MAX_GRAPH_TOKENS = 8192         # the largest iteration replayed from a CUDA graph, by default


def decode_attention_path(use_kernel: bool, dtype=None, device=None) -> str:
    """The path decode rows take: the Triton kernel, or its PyTorch reference reading the same
    blocks (same result, never called the kernel) where Triton is missing (macOS, native Windows)
    or the kernel refuses the dtype (bf16 on a T4: see _runtime.check_kernel_dtype)."""
    if not use_kernel:
        return PADDED_PATH
    if not triton_available():
        return REFERENCE_PATH
    if dtype == torch.bfloat16 and device is not None and torch.device(device).type == "cuda":
        from ._runtime import gpu_capability

        if gpu_capability(torch.device(device)) < (8, 0):
            return REFERENCE_BF16_PATH
    return KERNEL_PATH


def decode_attention(path: str, num_splits: int | None = None):
    """The function for `path`. The engine builds the block tables itself, so the kernel skips its
    host-side table check (one reduction and a device-to-host sync per call and layer); its split
    count is fixed by the caller (a CUDA graph needs the same launch grid on every replay)."""
    import functools

    from .kernels.paged_attention import paged_attention_decode, paged_attention_reference

    if path == KERNEL_PATH:
        return functools.partial(paged_attention_decode, check=False, num_splits=num_splits)
    return paged_attention_reference


class Engine:
    """Continuous batching on the paged KV cache (see the module docstring).

    use_kernel: decode rows through the Triton paged kernel (default: on a GPU only).
    cuda_graphs: replay iterations from CUDA graphs; None = on when the model is on a CUDA GPU and
        rows take the paged kernel; True elsewhere is an error (ValueError). ``engine.cuda_graphs``
        says what runs, ``engine.graph_buckets`` the iteration sizes (packed tokens) that are captured
        (each at its first use, or all by ``capture_graphs()``; ``engine.graphs.captured`` lists those
        captured so far).
    max_graph_tokens: the largest iteration replayed from a graph (its memory grows with the size);
        larger ones (a long prefill) run eagerly.
    num_splits: the paged kernel's split-KV count: an int for every batch, or None to choose it per
        bucket from the shape (kernels.paged_attention.choose_num_splits).
    check_finite: raise FloatingPointError, naming the iteration and the requests, when a request's
        logits hold NaN or inf (off by default; computed on the device with the next tokens, no extra sync).
    eos_token_id: None, or a token id of the model's vocabulary.

    When nothing runs and the next request arrives later, ``step`` jumps to that request's arrival
    iteration instead of stepping through the idle ones (``log[i]["iteration"]`` says which ran).
    """

    def __init__(self, model, num_blocks: int, block_size: int = 16, policy: str = "continuous",
                 max_batch: int = 8, token_budget: int = 2048, chunked_prefill: bool = False,
                 eos_token_id: int | None = 0, use_kernel: bool | None = None, cuda_graphs: bool | None = None,
                 num_splits: int | None = None, max_graph_tokens: int = MAX_GRAPH_TOKENS,
                 check_finite: bool = False, compile: bool | str = False):
        self.model, self.cfg = model, model.config
        self.eos = check_token_id(eos_token_id, "eos_token_id", self.cfg.vocab_size)
        # NaN/inf logits raise FloatingPointError naming the iteration and requests (computed on the
        # device inside the step, read with the tokens: no extra sync, graphs keep working)
        self.check_finite = check_bool(check_finite, "check_finite")
        weight = model.lm_head.weight
        device = weight.device
        # the Triton paged-attention kernel for decode rows: by default on a GPU only (on a CPU
        # the interpreter would run it, correct but slow)
        if use_kernel is not None and not isinstance(use_kernel, bool):
            raise ValueError(f"use_kernel must be True, False or None (on a GPU only), got {use_kernel!r}")
        self.use_kernel = weight.is_cuda if use_kernel is None else use_kernel
        # which attention decode rows take (see decode_attention): recorded, so results say what ran
        self.attention_path = decode_attention_path(self.use_kernel, weight.dtype, device)
        if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool)
                                       or num_splits < 1):
            raise ValueError(f"num_splits must be None (chosen per batch bucket) or an int >= 1, got {num_splits!r}")
        self.num_splits = num_splits
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True, False or None (on where possible), got {cuda_graphs!r}")
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda" and self.attention_path == KERNEL_PATH
        elif cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA GPU, but it is on {device}: a CUDA graph "
                             "records and replays GPU kernel launches (use cuda_graphs=False or None)")
        elif cuda_graphs and self.attention_path != KERNEL_PATH:
            raise ValueError(f"cuda_graphs=True needs decode rows on the {KERNEL_PATH}, but they take the "
                             f"{self.attention_path} (use cuda_graphs=False or None)")
        self.cuda_graphs = cuda_graphs
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, policy, max_batch, token_budget, self.cfg.max_position_embeddings,
                                   chunked_prefill)              # checks max_batch and token_budget
        if not isinstance(max_graph_tokens, int) or isinstance(max_graph_tokens, bool) or max_graph_tokens < max_batch:
            raise ValueError(f"max_graph_tokens must be an int >= max_batch = {max_batch} (a decode batch is "
                             f"max_batch tokens), got {max_graph_tokens!r}")
        if self.attention_path == KERNEL_PATH:              # refused now, not inside the first forward pass
            from .kernels.paged_attention import check_block_size

            try:
                check_block_size(block_size)
            except ValueError as e:
                raise ValueError(f"block_size = {block_size}: {e} (or use use_kernel=False)") from None
        # graphs pad decode batches with rows that use one scratch block past the pool (id num_blocks)
        self.cache = PagedKVCache(self.cfg, self.blocks, weight.dtype, device, scratch_blocks=int(cuda_graphs))
        # iteration sizes in packed tokens (split counts are per bucket; the graphs' sizes when on)
        self.buckets = graph_buckets(max_batch, min(token_budget, max_graph_tokens))
        self.graph_buckets = list(self.buckets) if cuda_graphs else []
        # device-side block tables: row i belongs to one running request while it runs; the last row is
        # the padding rows' (every entry the scratch block)
        self.max_blocks_per_seq = min(self.blocks.blocks_needed(self.cfg.max_position_embeddings), num_blocks)
        self._tables = torch.zeros(max_batch + 1, self.max_blocks_per_seq, dtype=torch.int32, device=device)
        self._tables[max_batch] = num_blocks if cuda_graphs else 0
        self._free_rows = list(range(max_batch - 1, -1, -1))
        self._row: dict[Request, int] = {}                 # running request -> its row of _tables
        self._uploaded: dict[Request, tuple] = {}          # request -> (table, blocks, last block) on the device
        self._decode_fns: dict[int, object] = {}           # split count -> decode attention function
        self._bucket_splits: dict[int, int] = {}           # bucket -> split count
        self._modules = list(model.modules())
        # compile=True: every iteration's forward (the packed batch's positions, slots and tables derived on
        # the device, the model, the paged kernel as the opaque operator llmsys_lab::paged_decode) through
        # torch.compile(fullgraph=True): a graph break is an error. One compilation per split count (a Python
        # constant of the step), sizes dynamic otherwise. A string names another TorchDynamo backend.
        from .static_decode import compiled_step

        self.compile = compile
        self._run_step = compiled_step(self._step, compile, dynamic=None)
        self.graphs = (IterationGraphs(self._run, self.buckets, pad=[0, 1, max_batch], device=device)
                       if cuda_graphs else None)
        self.capture_seconds = 0.0             # time capture_graphs() took (0: graphs captured at first use)
        self.iteration = 0
        self.start = None
        self.log: list[dict] = []            # per iteration: requests, tokens, KV used/reserved, seconds, graph

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id, prompt: list[int], max_new_tokens: int, arrival_step: int = 0,
                    sampling: SamplingParams | None = None) -> Request:
        """Queue a request; `arrival_step` is the first iteration it may be admitted in. `sampling`:
        its decoding settings (llmsys_lab.sampling; None = greedy): temperature, top-k, top-p, seed and
        stop token ids are applied here (max_new_tokens is the limit; stop strings are the server's)."""
        prompt = check_token_ids(prompt, self.cfg.vocab_size, f"request {request_id!r}")
        req = Request(request_id, prompt, max_new_tokens, arrival_step=arrival_step)
        if sampling is not None:
            if not isinstance(sampling, SamplingParams):
                raise TypeError(f"sampling must be a SamplingParams or None, got {type(sampling).__name__}")
            sampling.check_vocab(self.cfg.vocab_size)
            req.sampling = sampling.with_seed()          # an unseeded request gets a random seed now
            req.stop_token_ids = frozenset(sampling.stop_token_ids)
        self.scheduler.add(req)
        return req

    def abort(self, req: Request) -> bool:
        """Cancel `req` (a client went away, a stop string was seen): it leaves the queue or the batch
        now, between iterations, and its blocks go back to the pool. False if it had already finished."""
        sched = self.scheduler
        if req.finished:
            return False
        if req in sched.running:
            sched.running.remove(req)
            self.blocks.free(req.id)
            self._release_row(req)
        elif req in sched.waiting:
            sched.waiting.remove(req)
        else:
            return False
        req.finished = req.aborted = True
        return True

    # ---- one iteration ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Run one iteration; return the requests that finished in it."""
        if self.start is None:
            self.start = time.perf_counter()
        waiting = self.scheduler.waiting
        if not self.scheduler.running and waiting and waiting[0].arrival_step > self.iteration + 1:
            self.iteration = waiting[0].arrival_step - 1     # nothing runs until then: skip the idle iterations
        self.iteration += 1
        began = time.perf_counter() - self.start
        for r in self.scheduler.waiting:                 # arrived now: the clock of its latency starts
            if r.arrival_time is None and r.arrival_step <= self.iteration:
                r.arrival_time = began
        work = self.scheduler.schedule(self.iteration)
        if not work.prefill and not work.decode:
            return []
        next_tokens, graphed = self._forward(work)       # one device-to-host copy per iteration
        now = time.perf_counter() - self.start
        # tokens, completion and preemption: the scheduler's one bookkeeping path (the simulator's too)
        outcome = self.scheduler.postprocess(work, next_tokens, now, eos=self.eos)
        for cow in outcome.copies:
            self.cache.copy_block(cow)
        for r in outcome.left:                           # finished or preempted: its table row is free
            self._release_row(r)
        self.log.append({"iteration": self.iteration, "requests": len(work.prefill) + len(work.decode),
                         "tokens": work.num_tokens,
                         "kv_used": sum(r.num_tokens for r in self.scheduler.running),
                         "kv_reserved": (self.blocks.num_blocks - self.blocks.num_free) * self.blocks.block_size,
                         "seconds": now, "graph": graphed, "schedule": Outcome.record(work, outcome)})
        return outcome.finished

    def run(self):
        """Step until every queued request has finished; yield each finished request as it ends."""
        while self.scheduler.has_work:
            yield from self.step()

    # ---- device-side block tables (updated only where they changed) ----------------------------
    def _table_row(self, r: Request) -> int:
        """r's row of the device block tables, uploading the entries that changed since the last upload."""
        row = self._row.get(r)
        if row is None:
            row = self._row[r] = self._free_rows.pop()
        table = self.blocks.table(r.id)
        blocks = table.blocks
        seen = self._uploaded.get(r)
        if seen is not None and seen[0] is table and seen[1] == len(blocks) and seen[2] == blocks[-1]:
            return row                                           # unchanged: nothing to send
        # only the last block of a table can change in place (copy on write, a prefix-cache hit)
        first = 0 if seen is None or seen[0] is not table else max(0, min(seen[1], len(blocks)) - 1)
        self._tables[row, first:len(blocks)] = torch.tensor(blocks[first:], dtype=torch.int32)
        self._uploaded[r] = (table, len(blocks), blocks[-1])
        return row

    def _release_row(self, r: Request) -> None:
        row = self._row.pop(r, None)
        if row is not None:
            self._free_rows.append(row)
            self._uploaded.pop(r, None)

    def capture_graphs(self) -> float:
        """Capture the CUDA graph of every bucket now (a server's start-up), rather than each at its
        first use while requests wait; returns the seconds it took. Nothing when graphs are off."""
        if self.graphs is None:
            return 0.0
        began = time.perf_counter()
        self.graphs.capture_all()
        torch.cuda.synchronize(self._tables.device)
        self.capture_seconds = time.perf_counter() - began
        return self.capture_seconds

    def _splits_for(self, rows: int) -> int:
        """The paged kernel's split count for an iteration of `rows` packed rows: the bucket's (an iteration
        larger than every bucket, which runs eagerly, is its own bucket). Chosen outside the step, so that
        a compiled step sees it as a number (one compilation per split count)."""
        bucket = bucket_for(self.buckets, rows) if rows <= self.buckets[-1] else rows
        splits = self._bucket_splits.get(bucket)
        if splits is None:
            splits = self.num_splits
            if splits is None and self.attention_path == KERNEL_PATH:
                from .kernels.paged_attention import choose_num_splits

                w = self.model.lm_head.weight
                sms = torch.cuda.get_device_properties(w.device).multi_processor_count if w.is_cuda else None
                splits = choose_num_splits(bucket, self.cfg.num_kv_heads,
                                           self.max_blocks_per_seq * self.blocks.block_size, sms)
            splits = self._bucket_splits[bucket] = splits or 1
        return splits

    def _decode_fn(self, splits: int):
        fn = self._decode_fns.get(splits)
        if fn is None:
            fn = self._decode_fns[splits] = decode_attention(self.attention_path, splits)
        return fn

    def _run(self, stage: torch.Tensor) -> torch.Tensor:
        """The (compiled) step for this stage's size."""
        return self._run_step(stage, self._splits_for(stage.shape[1]))

    def _hooked(self) -> bool:
        """A forward hook on any module (or a global one) would be skipped by a graph replay: run eagerly then."""
        from torch.nn.modules import module

        if module._global_forward_hooks or module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._modules)

    # ---- the packed forward pass (selective batching) --------------------------------------
    def _forward(self, work) -> tuple[list[int], bool]:
        """Next token of every request of `work` (batch order), and whether a CUDA graph produced them."""
        if not self.use_kernel:
            return self._checked(self._sample(self._padded_step(work), work).tolist(), work), False
        # every packed token is a paged-attention row: (token, context length incl. itself, table row)
        chunks = [(r.token_slice(r.prefilled, r.prefilled + n), r.prefilled, self._table_row(r))
                  for r, n in work.prefill]
        chunks += [([r.output[-1]], r.num_tokens - 1, self._table_row(r)) for r in work.decode]
        tokens, lens, rows, last = paged_rows(chunks)
        if self.graphs is not None and len(tokens) <= self.graphs.max_tokens and not self._hooked():
            out, graphed = self.graphs.run(tokens, lens, rows), True
        else:
            stage = torch.tensor([tokens, lens, rows], dtype=torch.int64).to(self._tables.device)
            out, graphed = self._run(stage), False
        # sampling runs on the logits of each request's last row, on the device, after the replay
        logits = out.index_select(0, torch.tensor(last, device=out.device))
        out = self._sample(logits, work).tolist()       # the iteration's one device-to-host copy
        return self._checked(out, work), graphed

    def _step(self, stage: torch.Tensor, splits: int = 1) -> torch.Tensor:
        """An iteration from its (3, N) int64 stage on the device: tokens, context lengths, table rows.
        Everything else is computed on the device, with no host sync: CUDA graphs capture this.
        Returns the logits after each of the N rows, (N, vocab) (the engine samples each request's last)."""
        tokens, lens, rows = stage[0], stage[1], stage[2]
        positions = lens - 1                                                   # (N,) each token's
        tables = self._tables.index_select(0, rows)                            # (N, W) int32
        bs = self.blocks.block_size
        slots = tables.gather(1, (positions // bs)[:, None])[:, 0].long() * bs + positions % bs
        batch = PackedPagedBatch(self.cache, positions, slots, block_tables=tables, context_lens=lens.int(),
                                 decode_attention=self._decode_fn(splits))
        return self.model(tokens, kv_cache=batch)                              # (N, vocab)

    def _sample(self, logits: torch.Tensor, work) -> torch.Tensor:
        """Next tokens from (requests, vocab) logits in batch order, each with its request's settings
        (greedy: the argmax, exactly); with check_finite, -1 marks a row whose logits hold NaN or inf."""
        reqs = work.requests
        if all(r.sampling is None or r.sampling.greedy for r in reqs):
            nxt = logits.argmax(-1)
        else:
            nxt = sample(logits, SamplingBatch.build([r.sampling for r in reqs], [len(r.output) for r in reqs],
                                                     logits.shape[-1], logits.device))
        if self.check_finite:
            nxt = torch.where(torch.isfinite(logits).all(-1), nxt, -1)
        return nxt

    def _checked(self, tokens: list[int], work) -> list[int]:
        if self.check_finite and -1 in tokens:
            bad = [r.id for r, t in zip(work.requests, tokens) if t == -1]
            raise FloatingPointError(f"iteration {self.iteration}: the logits of request(s) {bad} hold NaN or inf "
                                     "(the model's output is not usable; check its weights and dtype)")
        return tokens

    def _padded_step(self, work) -> torch.Tensor:
        """An iteration without the paged kernel, eagerly: every request's new tokens (a prefill chunk
        or one decode token) through one padded, masked attention call over keys read from the pool."""
        device = self._tables.device
        chunks = [(r, r.prefilled, n) for r, n in work.rows]
        ids = torch.tensor([t for r, s, n in chunks for t in r.token_slice(s, s + n)], device=device)
        pos = torch.tensor([p for _, s, n in chunks for p in range(s, s + n)], device=device)
        bounds = torch.tensor([0] + [n for *_, n in chunks]).cumsum(0).tolist()
        # where this step's new K/V go, computed once for all layers
        write = torch.tensor([x for r, s, n in chunks for x in self.blocks.slots(r.id, s, s + n)], device=device)
        batch = PackedPagedBatch(self.cache, pos, write,
                                 logit_rows=torch.tensor([b - 1 for b in bounds[1:]], device=device),
                                 prefill=self._padded_batch(chunks, bounds[:-1], device))
        return self.model(ids, kv_cache=batch)                                 # (requests, vocab)

    def _padded_batch(self, chunks, offsets, device):
        """Index tensors that put P chunks side by side, padded to the longest, for one attention call.

        Chunk p has n_p new tokens at positions s_p .. s_p + n_p - 1 (rows offsets[p] .. of the packed
        batch) and attends to its keys 0 .. s_p + n_p - 1, read from the cache through its slots.
        Returns a PaddedPrefill: q_rows (P, Lq) packed-row indices, key_slots (P, Lk) cache slots, mask
        (P, 1, Lq, Lk) (query i of chunk p sees key j iff j <= s_p + i), and valid (P, Lq): real query rows.
        Padding points at row/slot 0 and is masked out (a padded query row sees no key; its output is dropped).
        """
        lq = max(n for *_, n in chunks)
        lk = max(s + n for _, s, n in chunks)
        q_rows = torch.zeros(len(chunks), lq, dtype=torch.long)
        key_slots = torch.zeros(len(chunks), lk, dtype=torch.long)
        for p, ((r, s, n), off) in enumerate(zip(chunks, offsets)):
            q_rows[p, :n] = torch.arange(off, off + n)
            key_slots[p, :s + n] = torch.tensor(self.blocks.slots(r.id, 0, s + n))
        starts = torch.tensor([s for _, s, _ in chunks])[:, None, None]
        counts = torch.tensor([n for *_, n in chunks])[:, None]
        i, j = torch.arange(lq)[None, :, None], torch.arange(lk)[None, None, :]
        valid = torch.arange(lq)[None, :] < counts                              # (P, Lq)
        mask = (j <= starts + i) & valid[:, :, None]                            # (P, Lq, Lk)
        return PaddedPrefill(q_rows.to(device), key_slots.to(device), mask[:, None].to(device), valid.to(device))


def serve(model, prompts: list[list[int]], max_new_tokens, num_blocks: int, capture_graphs: bool = False,
          **engine_kw) -> tuple[Engine, dict]:
    """Run a list of prompts (all arriving at once) to completion; return the engine and {index: request}.
    `max_new_tokens`: one limit for all, or a list with one per prompt. `capture_graphs`: capture every
    CUDA graph before the first iteration (a server's start-up; ``engine.capture_seconds`` says how long),
    instead of each at its first use."""
    prompts = list(prompts)
    if isinstance(max_new_tokens, (list, tuple)):
        limits = list(max_new_tokens)
        if len(limits) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(limits)} max_new_tokens: give one limit per prompt "
                             f"(or a single int for all)")
    else:
        limits = [max_new_tokens] * len(prompts)
    engine = Engine(model, num_blocks, **engine_kw)
    if capture_graphs:
        engine.capture_graphs()
    for i, (p, n) in enumerate(zip(prompts, limits, strict=True)):
        engine.add_request(i, p, n)
    finished = {r.id: r for r in engine.run()}
    return engine, finished
