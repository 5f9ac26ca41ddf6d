"""Decoding over a static KV cache: the model's own forward, compiled by Inductor and replayed from a CUDA graph.

A decode step of a small or medium model is launch-bound: per layer a dozen PyTorch operations, each
a kernel of a few microseconds, issued one by one from Python. Two tools remove that overhead, and
both need the step to have **fixed shapes and no host sync**:

* ``torch.compile`` (TorchDynamo traces the step into one graph, Inductor generates fused Triton
  kernels for the element-wise and normalisation work between the matmuls): fewer, larger kernels;
* a **CUDA graph** records the launches of one step once and replays them with a single call.

``KVCache`` cannot give fixed shapes (it returns the filled prefix, one column longer every step).
``StaticKVCache`` (kv_cache.py) can: every step attends over all ``max_len`` columns, and which
columns are visible is data on the device. ``StaticDecoder`` owns such a cache and runs the model's
one forward pass (``LlamaLM.forward``: no copy of the layer loop here) through it:

* ``prefill(ids, mask)``: the left-padded prompts, once, eagerly (a prompt's length changes from call
  to call; prefill is one large forward, not launch-bound);
* ``decode(tokens)``: one token per sequence. The step writes the token into a static input buffer,
  marks its column valid, runs the forward and advances the column and the positions *on the
  device*, so consecutive steps replay the same graph with no host work but the copy of the tokens.

``compile=True`` wraps the step in ``torch.compile(fullgraph=True)``: a graph break (an operation
Dynamo cannot trace, or a host sync) is an error, not a silent fallback. ``cuda_graph=True`` captures
the (compiled or eager) step once and replays it. Both default to on for a CUDA model and off on the
CPU, where neither helps (Inductor's CPU code needs a C++ compiler; CUDA graphs need CUDA).
``compile_seconds`` records the first step's time (tracing, Inductor, autotuning, capture), which the
next process pays again unless Inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) is warm.
"""
from __future__ import annotations

import time

import torch

from .cuda_graphs import capture
from .kv_cache import CacheError, StaticKVCache
from .speculative import Runner
from .validate import ShapeError, check_int


def compiled_step(fn, compile: bool | str, dynamic: bool | None = False):
    """fn, or fn under torch.compile(fullgraph=True) with Inductor (True) or the named backend.
    dynamic=False compiles for the shapes of the first call (a fixed-shape step); None lets TorchDynamo
    make a size symbolic when it changes (the engine's iterations of several sizes)."""
    if compile is False or compile is None:
        return fn
    if not isinstance(compile, (bool, str)):
        raise TypeError(f"compile must be a bool or a TorchDynamo backend name, got {compile!r}")
    return torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="inductor" if compile is True else compile)


def _static_setup(owner, model, max_len: int, compile, cuda_graph):
    """Checks and settings StaticDecoder and StaticRunner share: max_len within the model's context, compile
    and CUDA graphs on by default for a CUDA model (off on the CPU). Returns the model's LM-head weight."""
    check_int(max_len, "max_len", minimum=1)
    w = model.lm_head.weight
    if max_len > model.config.max_position_embeddings:
        raise ValueError(f"max_len = {max_len} exceeds the model's context of "
                         f"{model.config.max_position_embeddings} tokens")
    on_cuda = w.device.type == "cuda"
    owner.compile = on_cuda if compile is None else compile
    owner.cuda_graph = on_cuda if cuda_graph is None else bool(cuda_graph)
    if owner.cuda_graph and not on_cuda:
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {w.device}")
    owner.model, owner.max_len, owner.compile_seconds = model, max_len, 0.0
    return w


class StaticDecoder:
    """Prefill and decode a fixed batch of ``batch`` sequences of at most ``max_len`` tokens each."""

    def __init__(self, model, batch: int, max_len: int, compile: bool | str | None = None,
                 cuda_graph: bool | None = None):
        check_int(batch, "batch", minimum=1)
        w = _static_setup(self, model, max_len, compile, cuda_graph)
        self.batch = batch
        self.cache = StaticKVCache.for_model(model.config, batch, max_len, w.dtype, w.device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=w.device)     # the step's static input
        self._decode_cols = self.cache.cols                                          # (1,) the next column
        self._decode_positions = self.cache.positions                                # (B, 1) the next position
        self._step = compiled_step(self._eager_step, self.compile)
        self._graph = self._graph_logits = None
        self.next_col = 0            # host copy of the next column: the only state the host needs

    # ---- the step ---------------------------------------------------------------------------------
    def _eager_step(self) -> torch.Tensor:
        """One token per row from ``tokens``: mark its column valid, run the model, advance."""
        cache = self.cache
        cache.key_valid.index_fill_(1, cache.cols, True)
        logits = self.model(self.tokens, kv_cache=cache)[:, -1]            # (B, vocab)
        cache.cols.add_(1)
        cache.positions.add_(1)
        return logits

    # ---- public -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the (left-padded) prompts (B, T0) once; return the last column's logits (B, vocab).

        attention_mask (B, T0): True for real tokens, False for left padding (None: no padding). Token ids
        are checked here, once: the decode steps do not look at values on the host."""
        model = self.model
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        model.check_input(input_ids)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ShapeError(f"attention_mask must have the prompts' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        b, t = input_ids.shape
        if b != self.batch:
            raise CacheError(f"this decoder holds {self.batch} sequences but got a batch of {b}")
        if t >= self.max_len:
            raise CacheError(f"a prompt of {t} tokens leaves no column of max_len = {self.max_len} to decode into")
        mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        cache = self.cache
        cache.k.zero_()
        cache.v.zero_()
        cache.key_valid.zero_()
        cache.key_valid[:, :t] = mask
        cache.cols = torch.arange(t, device=input_ids.device)
        cache.positions = (mask.long().cumsum(-1) - 1).clamp(min=0)                 # real tokens only, as transformers
        try:
            logits = model(input_ids, kv_cache=cache)[:, -1]
        finally:
            cache.cols, cache.positions = self._decode_cols, self._decode_positions
        self._decode_cols.fill_(t)
        self._decode_positions.copy_(mask.long().sum(-1, keepdim=True))
        self.next_col = t
        return logits

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) and return the logits of the next (B, vocab).

        The returned tensor is the graph's output buffer when a CUDA graph replays: read it (argmax,
        sample) before the next call, which overwrites it."""
        if self.next_col == 0:
            raise CacheError("decode() before prefill(): the cache holds no prompt")
        if self.next_col >= self.max_len:
            raise CacheError(f"the static cache is full: {self.max_len} columns used (make the decoder with a "
                             "larger max_len)")
        if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != (self.batch,):
            raise ShapeError(f"decode takes one token id per sequence, shape ({self.batch},), got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        self.tokens.copy_(tokens[:, None])
        if self._graph is not None:
            self._graph.replay()
            logits = self._graph_logits
        elif self.cuda_graph:
            logits = self._capture()
        elif self.compile is not False and self.compile_seconds == 0.0:
            start = time.perf_counter()
            logits = self._step()
            self.compile_seconds = time.perf_counter() - start
        else:
            logits = self._step()
        self.next_col += 1
        return logits

    # ---- CUDA graph -------------------------------------------------------------------------------
    def _capture(self) -> torch.Tensor:
        """First decode call with cuda_graph: warm up (compile) on a side stream, capture, then replay
        for this step. The warm-up steps advance the cache, so the columns are restored around them:
        their K/V writes land in the same column the real step writes again."""
        start = time.perf_counter()
        cache = self.cache
        col, positions, valid = cache.cols.clone(), cache.positions.clone(), cache.key_valid.clone()

        def rewind():
            cache.cols.copy_(col)
            cache.positions.copy_(positions)
            cache.key_valid.copy_(valid)

        self._graph, self._graph_logits = capture(self._step, after_warmup=rewind)
        rewind()                                   # capture records the step; it does not run it
        self._graph.replay()
        torch.cuda.synchronize()
        self.compile_seconds = time.perf_counter() - start
        return self._graph_logits


class StaticRunner(Runner):
    """One sequence over a StaticKVCache, for speculative decoding: forward T new tokens, roll back for free.

    The interface of speculative decoding's runners (``forward(new) -> logits``, ``truncate(n)``,
    ``tokens``). Token i of the sequence lives in column i and has position i (one sequence, no padding),
    so every column is valid and the causal part of the mask is all there is: a forward of T tokens at
    columns start .. start + T - 1 writes their K/V before attending, and a query never sees a column
    past its own. That makes **rollback free**: ``truncate(n)`` only moves the host's count back; the
    rejected drafts' K/V stay in the slab until the next forward overwrites them, and no query can see
    them before that.

    Forwards of up to ``graph_tokens`` tokens (a draft step: 1; a verify pass: gamma + 1) run compiled
    (``compile``) and replayed from a CUDA graph per T (``cuda_graph``), with the tokens and their columns
    copied into static buffers first; longer ones (the prompt) run eagerly, once per sequence.
    """

    def __init__(self, model, max_len: int, compile: bool | str | None = None, cuda_graph: bool | None = None,
                 graph_tokens: int = 8):
        check_int(graph_tokens, "graph_tokens", minimum=1)
        w = _static_setup(self, model, max_len, compile, cuda_graph)
        self.graph_tokens = graph_tokens
        self.cache = StaticKVCache.for_model(model.config, 1, max_len, w.dtype, w.device)
        self.cache.key_valid.fill_(True)
        self.tokens: list[int] = []                      # the tokens whose K/V the cache holds
        self._step = compiled_step(self._forward, self.compile)
        self._static: dict[int, tuple] = {}              # T -> (ids (1, T), cols (T,), graph or None, logits)

    def _forward(self, ids: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        self.cache.cols, self.cache.positions = cols, cols[None]
        return self.model(ids, kv_cache=self.cache)[0]                   # (T, vocab)

    @torch.no_grad()
    def forward(self, new: list[int]) -> torch.Tensor:
        """Append `new` tokens; return their logits (len(new), V) (a graph's output buffer for short
        forwards: read it before the next call)."""
        t, start = len(new), len(self.tokens)
        if t == 0:
            raise ValueError("forward() needs at least one new token")
        if start + t > self.max_len:
            raise CacheError(f"the static cache is full: {start} + {t} tokens > max_len = {self.max_len}")
        dev = self.cache.k.device
        ids = torch.tensor([new], dtype=torch.long, device=dev)
        cols = torch.arange(start, start + t, device=dev)
        if t > self.graph_tokens:                                          # the prompt: once, eagerly
            logits = self._forward(ids, cols)
        else:
            logits = self._replay(t, ids, cols)
        self.tokens.extend(new)
        return logits

    def _replay(self, t: int, ids: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        if t not in self._static:
            began = time.perf_counter()
            s_ids, s_cols = ids.clone(), cols.clone()
            graph = out = None
            if self.cuda_graph:                              # warm-up (compiles) writes the same K/V again
                graph, out = capture(lambda: self._step(s_ids, s_cols))
                torch.cuda.synchronize()
            elif self.compile is not False:
                self._step(s_ids, s_cols)                   # compile now, so it is timed apart
            self.compile_seconds += time.perf_counter() - began
            self._static[t] = (s_ids, s_cols, graph, out)
        s_ids, s_cols, graph, out = self._static[t]
        s_ids.copy_(ids)
        s_cols.copy_(cols)
        if graph is None:
            return self._step(s_ids, s_cols)
        graph.replay()
        return out

    def truncate(self, n: int) -> list[int]:
        """Forget every token from n on (host bookkeeping only: see the class)."""
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(self.tokens):
            raise CacheError(f"cannot truncate to {n!r} tokens: the cache holds {len(self.tokens)}")
        self.tokens = self.tokens[:n]
        return []
