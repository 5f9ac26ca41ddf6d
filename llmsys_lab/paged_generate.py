"""Generation on the paged KV cache: blocks are allocated as tokens arrive and freed as soon as a
request finishes (the finished sequence leaves the batch, its blocks go back to the pool)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .generate import _check_prompts, check_sampling
from .paged import BlockManager
from .paged_cache import PagedBatch, PagedKVCache


@dataclass
class PagedOutput:
    new_tokens: list[list[int]]            # per prompt, up to and including EOS
    manager: BlockManager
    cache: PagedKVCache
    peak_blocks: int                       # most blocks in use at once


def _left_pad(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)


@torch.no_grad()
def generate_paged(model, prompts, max_new_tokens: int = 32, block_size: int = 16, num_blocks: int | None = None,
                   eos_token_id: int | None = 0, pad_token_id: int = 0, order: list[int] | None = None,
                   prefix_caching: bool = False, on_step=None) -> PagedOutput:
    """Greedy generation for a batch of prompts on a paged KV cache of `num_blocks` blocks
    (default: enough for every prompt plus max_new_tokens). on_step(step, manager) is called
    after each step's blocks have been updated (the visualiser uses it)."""
    cfg = model.config
    prompts = _check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings, max_new_tokens)
    device = model.lm_head.weight.device
    if num_blocks is None:
        num_blocks = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
    manager = BlockManager(num_blocks, block_size, order, prefix_caching)
    cache = PagedKVCache(cfg, manager, model.lm_head.weight.dtype, device)
    for seq, p in enumerate(prompts):
        manager.add(seq, p)
    active, counts, rows = list(range(len(prompts))), [len(p) for p in prompts], prompts
    new = [[] for _ in prompts]
    peak = manager.num_blocks - manager.num_free
    step = 0
    while active:
        batch = PagedBatch(cache, active, counts)
        logits = model(_left_pad(rows, pad_token_id, device), attention_mask=batch.attention_mask(), kv_cache=batch)
        next_ids = logits[:, -1].argmax(-1).tolist()
        still = []
        for seq, tok in zip(active, next_ids):
            new[seq].append(tok)
            if tok == eos_token_id or len(new[seq]) == max_new_tokens:
                manager.free(seq)                         # finished: its blocks return at once
            else:
                cache.copy_block(manager.append(seq, tok))
                still.append(seq)
        peak = max(peak, manager.num_blocks - manager.num_free)
        if on_step is not None:
            on_step(step, manager)
        active, counts, rows = still, [1] * len(still), [[new[s][-1]] for s in still]
        step += 1
    return PagedOutput(new, manager, cache, peak)


@torch.no_grad()
def sample_parallel(model, prompt: list[int], generators: list[torch.Generator], max_new_tokens: int = 32,
                    block_size: int = 16, num_blocks: int | None = None, temperature: float = 1.0,
                    top_k: int | None = None, eos_token_id: int | None = 0) -> PagedOutput:
    """Several samples of one prompt (one per generator) that share the prompt's blocks.

    The prompt is prefilled once; every sample forks its block table (references, no copies),
    and a sample's first write into a shared, partly filled block copies that block first.
    """
    from .generate import next_tokens

    cfg, n = model.config, len(generators)
    (prompt,) = _check_prompts([prompt], cfg.vocab_size, cfg.max_position_embeddings, max_new_tokens)
    check_sampling(temperature, top_k)
    if n == 0:
        raise ValueError("sample_parallel needs at least one generator (one per sample)")
    device = model.lm_head.weight.device
    if num_blocks is None:
        num_blocks = -(-len(prompt) // block_size) + n * -(-max_new_tokens // block_size) + n
    manager = BlockManager(num_blocks, block_size)
    cache = PagedKVCache(cfg, manager, model.lm_head.weight.dtype, device)
    manager.add(0, prompt)
    batch = PagedBatch(cache, [0], [len(prompt)])
    logits = model(torch.tensor([prompt], device=device), attention_mask=batch.attention_mask(), kv_cache=batch)
    for s in range(1, n):
        manager.fork(0, s)
    last = [logits[:, -1]] * n
    new = [[] for _ in range(n)]
    active, peak = list(range(n)), manager.num_blocks - manager.num_free
    while active:
        still = []
        for s in active:
            tok = int(next_tokens(last[s], True, temperature, top_k, generators[s])[0])
            new[s].append(tok)
            if tok == eos_token_id or len(new[s]) == max_new_tokens:
                manager.free(s)
            else:
                cache.copy_block(manager.append(s, tok))
                still.append(s)
        peak = max(peak, manager.num_blocks - manager.num_free)
        if not still:
            break
        batch = PagedBatch(cache, still, [1] * len(still))
        logits = model(torch.tensor([[new[s][-1]] for s in still], device=device),
                       attention_mask=batch.attention_mask(), kv_cache=batch)
        for row, s in enumerate(still):
            last[s] = logits[row:row + 1, -1]
        active = still
    return PagedOutput(new, manager, cache, peak)
