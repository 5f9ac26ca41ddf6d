"""A serving engine: the scheduler's decisions run on the real model with the paged KV cache.

Every iteration runs the requests the scheduler picked, prefill chunks and decodes together, in
one forward pass with **selective batching** (Orca): the tokens of all requests are packed into
one (total tokens, hidden) matrix for everything that does not mix positions (embedding, norms,
Q/K/V and output projections, MLP, LM head), and only attention is per request: each request's
queries attend to its own K/V, read through its block table. Decode rows go through the paged
attention kernel (one launch for all of them); prefill chunks are laid side by side in one padded,
masked attention call. Only that attention call sees padding; the matmuls never do.

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
from .attention import scaled_dot_product_attention
from .generate import check_token_ids
from .paged import BlockManager
from .paged_cache import PagedKVCache
from .scheduler import Outcome, Request, Scheduler


# ---- decode-attention dispatch ------------------------------------------------------------------
KERNEL_PATH = "triton paged decode kernel"
REFERENCE_PATH = "pytorch reference of paged decode attention (Triton unavailable)"
REFERENCE_BF16_PATH = "pytorch reference of paged decode attention (bf16 on a GPU below compute capability 8.0)"
PADDED_PATH = "padded attention (no paged decode kernel)"


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


def decode_attention(path: str):
    """The function for `path`. The engine builds the block tables itself, so the kernel skips its
    host-side table check (one reduction and a device-to-host sync per call and layer)."""
    import functools

    from .kernels.paged_attention import paged_attention_decode, paged_attention_reference

    return functools.partial(paged_attention_decode, check=False) if path == KERNEL_PATH else paged_attention_reference


class Engine:
    def __init__(self, model, num_blocks: int, block_size: int = 16, policy: str = "continuous",
                 max_batch: int = 8, token_budget: int = 2048, chunked_prefill: bool = False,
                 eos_token_id: int | None = 0, use_kernel: bool | None = None):
        self.model, self.cfg = model, model.config
        # the Triton paged-attention kernel for decode rows: by default on a GPU only (on a CPU
        # the interpreter would run it, correct but slow)
        self.use_kernel = model.lm_head.weight.is_cuda if use_kernel is None else use_kernel
        # which attention decode rows take (see decode_attention): recorded, so results say what ran
        self.attention_path = decode_attention_path(self.use_kernel, model.lm_head.weight.dtype,
                                                    model.lm_head.weight.device)
        self._decode_attention = decode_attention(self.attention_path)   # chosen once, called per layer
        self.blocks = BlockManager(num_blocks, block_size)
        self.cache = PagedKVCache(self.cfg, self.blocks, model.lm_head.weight.dtype, model.lm_head.weight.device)
        self.scheduler = Scheduler(self.blocks, policy, max_batch, token_budget, self.cfg.max_position_embeddings,
                                   chunked_prefill)
        self.eos = eos_token_id
        self.iteration = 0
        self.start = None
        self.log: list[dict] = []            # per iteration: requests, tokens, KV used/reserved, seconds

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id, prompt: list[int], max_new_tokens: int, arrival_step: int = 0) -> Request:
        """Queue a request; `arrival_step` is the first iteration it may be admitted in."""
        prompt = check_token_ids(prompt, self.cfg.vocab_size, f"request {request_id!r}")
        req = Request(request_id, prompt, max_new_tokens, arrival_step=arrival_step)
        self.scheduler.add(req)
        return req

    # ---- one iteration ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Run one iteration; return the requests that finished in it."""
        if self.start is None:
            self.start = time.perf_counter()
        self.iteration += 1
        began = time.perf_counter() - self.start
        for r in self.scheduler.waiting:                 # arrived now: the clock of its latency starts
            if r.arrival_time is None and r.arrival_step <= self.iteration:
                r.arrival_time = began
        work = self.scheduler.schedule(self.iteration)
        chunks = [(r, r.prefilled, n) for r, n in work.rows]
        if not chunks:
            return []
        logits = self._forward(chunks)
        next_tokens = logits.argmax(-1).tolist()             # one device-to-host copy per iteration
        now = time.perf_counter() - self.start
        # tokens, completion and preemption: the scheduler's one bookkeeping path (the simulator's too)
        outcome = self.scheduler.postprocess(work, next_tokens, now, eos=self.eos)
        for cow in outcome.copies:
            self.cache.copy_block(cow)
        self.log.append({"iteration": self.iteration, "requests": len(chunks), "tokens": sum(n for *_, n in chunks),
                         "kv_used": sum(r.num_tokens for r in self.scheduler.running),
                         "kv_reserved": (self.blocks.num_blocks - self.blocks.num_free) * self.blocks.block_size,
                         "seconds": now, "schedule": Outcome.record(work, outcome)})
        return outcome.finished

    def run(self):
        """Step until every queued request has finished; yield each finished request as it ends."""
        while self.scheduler.has_work:
            yield from self.step()

    # ---- the packed forward pass (selective batching) --------------------------------------
    def _forward(self, chunks) -> torch.Tensor:
        m, device = self.model, self.model.lm_head.weight.device
        ids = torch.tensor([t for r, s, n in chunks for t in r.token_slice(s, s + n)], device=device)
        pos = torch.tensor([p for _, s, n in chunks for p in range(s, s + n)], device=device)
        bounds = torch.tensor([0] + [n for *_, n in chunks]).cumsum(0).tolist()
        # where this step's new K/V go, computed once for all layers
        write = torch.tensor([x for r, s, n in chunks for x in self.blocks.slots(r.id, s, s + n)], device=device)
        # decode rows (one new token) read K/V through the block table with the Triton kernel on a
        # GPU; prefill chunks (and every row on a CPU) go through one padded attention call
        dec = [j for j, (_, s, n) in enumerate(chunks) if self.use_kernel and n == 1]
        pre = [j for j in range(len(chunks)) if j not in dec]
        if dec:
            bt, lens = self.cache.block_tables([chunks[j][0].id for j in dec])
            dec_rows = torch.tensor([bounds[j] for j in dec], device=device)
        if pre:
            padded = self._padded_batch([chunks[j] for j in pre], [bounds[j] for j in pre], device)
        x = m.model.embed_tokens(ids)                                           # (N, hidden)
        rope = m.model.layers[0].self_attn.rope
        cos, sin = rope.cos_sin(pos)                         # the same rotation in every layer
        for li, layer in enumerate(m.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)[None]     # (1, H, N, D)
            k = attn.k_proj(h).view(-1, attn.num_kv_heads, attn.head_dim).transpose(0, 1)[None]
            v = attn.v_proj(h).view(-1, attn.num_kv_heads, attn.head_dim).transpose(0, 1)[None]
            q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
            kc, vc = self.cache.k[li], self.cache.v[li]                         # (blocks, block_size, H_kv, D)
            kc.view(-1, *kc.shape[2:])[write] = k[0].transpose(0, 1)
            vc.view(-1, *vc.shape[2:])[write] = v[0].transpose(0, 1)
            o = torch.empty(len(ids), attn.num_heads, attn.head_dim, dtype=q.dtype, device=device)
            if dec:
                # the tables come from the BlockManager: no need to check them again on every layer
                o[dec_rows] = self._decode_attention(q[0, :, dec_rows].transpose(0, 1), kc, vc, bt, lens)
            if pre:
                q_rows, key_slots, mask, valid = padded
                ks = kc.view(-1, *kc.shape[2:])[key_slots].permute(0, 2, 1, 3)     # (P, H_kv, keys, D)
                vs = vc.view(-1, *vc.shape[2:])[key_slots].permute(0, 2, 1, 3)
                qs = q[0][:, q_rows].transpose(0, 1)                                # (P, H, queries, D)
                out = scaled_dot_product_attention(qs, ks, vs, mask=mask).transpose(1, 2)   # (P, queries, H, D)
                o[q_rows[valid]] = out[valid]
            x = x + attn.o_proj(o.reshape(len(ids), -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = torch.tensor([b - 1 for b in bounds[1:]], device=device)
        return m.lm_head(m.model.norm(x[last]))                                # (requests, vocab)

    def _padded_batch(self, chunks, offsets, device):
        """Index tensors that put P chunks side by side, padded to the longest, for one attention call.

        Chunk p has n_p new tokens at positions s_p .. s_p + n_p - 1 (rows offsets[p] .. of the packed
        batch) and attends to its keys 0 .. s_p + n_p - 1, read from the cache through its slots.
        Returns q_rows (P, Lq) packed-row indices, key_slots (P, Lk) cache slots, mask (P, 1, Lq, Lk)
        (query i of chunk p sees key j iff j <= s_p + i), and valid (P, Lq): real query rows. Padding
        points at row/slot 0 and is masked out (a padded query row sees no key; its output is dropped).
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
        return q_rows.to(device), key_slots.to(device), mask[:, None].to(device), valid.to(device)


def serve(model, prompts: list[list[int]], max_new_tokens, num_blocks: int, **engine_kw) -> tuple[Engine, dict]:
    """Run a list of prompts (all arriving at once) to completion; return the engine and {index: request}.
    `max_new_tokens`: one limit for all, or a list with one per prompt."""
    prompts = list(prompts)
    if isinstance(max_new_tokens, (list, tuple)):
        limits = list(max_new_tokens)
        if len(limits) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(limits)} max_new_tokens: give one limit per prompt "
                             f"(or a single int for all)")
    else:
        limits = [max_new_tokens] * len(prompts)
    engine = Engine(model, num_blocks, **engine_kw)
    for i, (p, n) in enumerate(zip(prompts, limits, strict=True)):
        engine.add_request(i, p, n)
    finished = {r.id: r for r in engine.run()}
    return engine, finished
