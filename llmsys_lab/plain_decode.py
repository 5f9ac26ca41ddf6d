"""A decode step written directly in PyTorch over a static KV cache: the yardstick for the engine.

The serving engine (llmsys_lab.engine) pays for flexibility every iteration: a scheduler in Python,
requests of different lengths packed into one batch, K/V in paged blocks read through block tables,
one host sync to learn the new tokens. ``PlainDecode`` is the same model's decode step with none of
that: every sequence of a fixed batch has a slot in a contiguous cache reserved up front, the shapes
never change, and the next tokens stay on the device. That makes it the fastest a PyTorch decode step
of this model can be without new kernels, and *capturable*: the whole step can be recorded once as
a CUDA graph and replayed with one launch (``torch.cuda.CUDAGraph``). benchmarks/decode_step.py and
lesson 07 measure the engine against it.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .model import LlamaLM


class PlainDecode:
    """The same model's decode step written directly in PyTorch over a static, contiguous KV cache.

    Everything a CUDA graph needs: fixed shapes (the cache holds `max_len` positions per sequence,
    keys past a sequence's position are masked out), inputs in static buffers (`tokens`, `positions`)
    and no host sync (the next tokens stay on the device, written back into `tokens`).
    The query heads that share one K/V head attend as `group` query rows against that head's keys,
    so SDPA reads every cached K/V byte once without repeating K/V (grouped-query attention).
    """

    def __init__(self, model: LlamaLM, batch: int, max_len: int):
        for name, v in (("batch", batch), ("max_len", max_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        cfg, w = model.config, model.lm_head.weight
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len = {max_len} exceeds the model's context of {cfg.max_position_embeddings} tokens")
        self.model, self.batch, self.max_len = model, batch, max_len
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)    # (L, B, H_kv, S, D)
        self.k = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=w.device)       # static input buffers
        self.positions = torch.zeros(batch, dtype=torch.long, device=w.device)
        self.rows = torch.arange(batch, device=w.device)
        self.keys = torch.arange(max_len, device=w.device)
        self.rope = model.model.layers[0].self_attn.rope

    def fill_random(self, context: int, generator=None) -> None:
        """Every sequence holds `context` cached tokens (random K/V: the bytes, not the values, set the time)."""
        if not 0 <= context < self.max_len:
            raise ValueError(f"context must be in 0..{self.max_len - 1} (the next token needs a free slot), "
                             f"got {context}")
        self.k.normal_(generator=generator)
        self.v.normal_(generator=generator)
        self.positions.fill_(context)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Append the K/V of `tokens` at `positions`, attend, return logits (B, vocab); the argmax
        goes back into `tokens` for the next step."""
        m, b, g = self.model, self.batch, self.heads // self.kv_heads
        x = m.model.embed_tokens(self.tokens)                                          # (B, hidden)
        cos, sin = self.rope.cos_sin(self.positions[:, None])                          # (B, 1, D)
        visible = (self.keys[None, :] <= self.positions[:, None])[:, None, None, :]    # (B, 1, 1, S)
        for li, layer in enumerate(m.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, self.heads, 1, self.head_dim)                   # (B, H, 1, D)
            k = attn.k_proj(h).view(b, self.kv_heads, 1, self.head_dim)                # (B, H_kv, 1, D)
            v = attn.v_proj(h).view(b, self.kv_heads, 1, self.head_dim)
            q, k = self.rope.rotate(q, cos, sin), self.rope.rotate(k, cos, sin)
            kc, vc = self.k[li], self.v[li]                                            # (B, H_kv, S, D)
            kc[self.rows, :, self.positions] = k[:, :, 0]
            vc[self.rows, :, self.positions] = v[:, :, 0]
            qg = q.view(b, self.kv_heads, g, self.head_dim)                            # (B, H_kv, G, D)
            o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=visible)          # (B, H_kv, G, D)
            x = x + attn.o_proj(o.reshape(b, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = m.lm_head(m.model.norm(x))                                            # (B, vocab)
        self.tokens.copy_(logits.argmax(-1))
        return logits


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
