"""The model's decode step over a static KV cache, nothing else: the yardstick for the engine.

The serving engine (llmsys_lab.engine) pays for flexibility every iteration: a scheduler in Python,
requests of different lengths packed into one batch, K/V in paged blocks read through block tables,
one host sync to learn the new tokens. ``PlainDecode`` is the same model's decode step with none of
that: every sequence of a fixed batch has a slot in a contiguous cache reserved up front, the shapes
never change, and the next tokens stay on the device. That makes it *capturable*: the whole step can
be recorded once as a CUDA graph and replayed with one launch (``torch.cuda.CUDAGraph``), and
*compilable*: ``torch.compile`` traces it into one graph whose small operations Inductor fuses.
benchmarks/decode_step.py and lesson 07 measure the engine against it.
"""
from __future__ import annotations

import copy

import torch

from .kv_cache import StaticKVCache
from .model import LlamaLM
from .static_decode import compiled_step


class PlainDecode:
    """The same model's decode step over a static, contiguous KV cache (kv_cache.StaticKVCache).

    Everything a CUDA graph needs: fixed shapes (the cache holds `max_len` positions per sequence,
    keys past the current position are masked out), inputs in static buffers (`tokens`, `positions`;
    every sequence of the batch is at the same position) and no host sync (the next tokens stay on
    the device, written back into `tokens`). The step is the model's own forward pass
    (``LlamaLM.forward`` with the static cache as its KV layout); the cache's grouped-query attention
    reads every cached K/V byte once without repeating K/V.

    compile=True runs the step through ``torch.compile(fullgraph=True)`` (Inductor fuses the
    element-wise and normalisation work between the matmuls; the first step compiles). A string
    names another TorchDynamo backend ("eager" traces without generating code: the tests' check that
    the step has no graph break).
    """

    def __init__(self, model: LlamaLM, batch: int, max_len: int, compile: bool | str = False):
        for name, v in (("batch", batch), ("max_len", max_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        cfg, w = model.config, model.lm_head.weight
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len = {max_len} exceeds the model's context of {cfg.max_position_embeddings} tokens")
        self.model, self.batch, self.max_len = model, batch, max_len
        self.cache = StaticKVCache.for_model(cfg, batch, max_len, w.dtype, w.device)
        self.cache.key_valid.fill_(True)               # no padding: the causal part of the mask is all there is
        self.tokens = torch.zeros(batch, dtype=torch.long, device=w.device)       # static input buffers
        self.positions = torch.zeros(batch, dtype=torch.long, device=w.device)
        self.cache.positions = self.positions.view(batch, 1)                      # the same memory
        self.cache.cols = self.positions[:1]                                      # column = position
        self._step = compiled_step(self._eager_step, compile)

    @property
    def k(self) -> torch.Tensor:
        return self.cache.k

    @property
    def v(self) -> torch.Tensor:
        return self.cache.v

    def fill_random(self, context: int, generator=None) -> None:
        """Every sequence holds `context` cached tokens (random K/V: the bytes, not the values, set the time)."""
        if not 0 <= context < self.max_len:
            raise ValueError(f"context must be in 0..{self.max_len - 1} (the next token needs a free slot), "
                             f"got {context}")
        self.cache.k.normal_(generator=generator)
        self.cache.v.normal_(generator=generator)
        self.positions.fill_(context)

    def _eager_step(self) -> torch.Tensor:
        logits = self.model(self.tokens[:, None], kv_cache=self.cache)[:, -1]       # (B, vocab)
        self.tokens.copy_(logits.argmax(-1))
        return logits

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Append the K/V of `tokens` at `positions`, attend, return logits (B, vocab); the argmax
        goes back into `tokens` for the next step."""
        return self._step()


def check_plain_step(model: LlamaLM, batch: int = 2, length: int = 12, seed: int = 0) -> float:
    """The plain step is the model: decoding a sequence token by token with it gives the logits of the
    model's own forward pass over the whole sequence (fp32 copy, so the check is tight). Returns max |err|."""
    ref_model = copy.deepcopy(model).float()
    dev = ref_model.lm_head.weight.device
    ids = torch.randint(1, model.config.vocab_size, (batch, length),
                        generator=torch.Generator().manual_seed(seed)).to(dev)
    with torch.no_grad():
        want = ref_model(ids).float()                                                   # (B, T, vocab)
    plain = PlainDecode(ref_model, batch, length)
    err = 0.0
    for t in range(length):
        plain.tokens.copy_(ids[:, t])
        plain.positions.fill_(t)
        err = max(err, (plain.step().float() - want[:, t]).abs().max().item())
    del ref_model, plain
    return err
