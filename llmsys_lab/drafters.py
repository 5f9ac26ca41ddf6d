"""Drafters for speculative decoding: who proposes the gamma tokens the target then verifies.

* ``ModelDrafter``: a small language model with the target's tokenizer (the trained
  llmsys-tiny-draft, or ``truncated_model(target, n)``: the target's first n layers with its own
  norm and head, a drafter that needs no training) runs gamma cheap decode steps on its own KV cache.
* ``PromptLookupDrafter``: no model at all. Finds the last earlier occurrence of the context's
  final n-gram and proposes the tokens that followed it; pays off when the output repeats its
  input (code editing, summaries that quote, retrieval answers, repetitive text).

A drafter implements ``check_target(target)``, ``begin(max_len)`` and
``propose(context, gamma, sampling, generator) -> (tokens, q)`` where q is (len(tokens), V), the
distributions the tokens were drawn from, or None for a deterministic proposal (a point mass).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .model import TINY_MODEL_PATH, LlamaLM
from .speculative import RUNNER_CACHES, Sampling, _common_prefix, _draw, check_same_vocab, make_runner
from .validate import check_int


def _check_propose_args(context, gamma) -> None:
    """gamma = 0 is a valid request (an empty proposal: the step is a plain decode step)."""
    check_int(gamma, "gamma (tokens to propose)", minimum=0)
    if not isinstance(context, (list, tuple)) or not context:
        raise ValueError(f"context must hold at least one token (the prompt so far), got {context!r}")

DRAFT_MODEL_PATH = TINY_MODEL_PATH.parent / "llmsys-tiny-draft"


class ModelDrafter:
    """Draft with a small model: gamma autoregressive steps on its own KV cache (``cache``: 'contiguous', or
    'static' for one-token steps compiled and replayed from a CUDA graph on a GPU).

    Between calls the cache keeps the K/V of the context it has seen; tokens that the target
    rejected are found by comparing the cached tokens with the new context and rolled back
    (KVCache.truncate), so each call only runs the tokens that are new since the last one.
    """

    def __init__(self, model: LlamaLM, cache: str = "contiguous"):
        if not isinstance(model, LlamaLM):
            raise TypeError(f"the draft model must be a LlamaLM, got {type(model).__name__}")
        if cache not in RUNNER_CACHES:
            raise ValueError(f"cache must be one of {', '.join(map(repr, RUNNER_CACHES))}, got {cache!r}")
        self.model, self.cache = model, cache
        self.runner = None

    def check_target(self, target) -> None:
        check_same_vocab(self.model.config, target.config)
        if self.model.lm_head.weight.device != target.lm_head.weight.device:
            raise ValueError(f"the draft model is on {self.model.lm_head.weight.device} but the target is on "
                             f"{target.lm_head.weight.device}")

    def begin(self, max_len: int) -> None:
        """A fresh cache for a new sequence of at most max_len tokens."""
        if max_len > self.model.config.max_position_embeddings:
            raise ValueError(f"sequences of {max_len} tokens exceed the draft model's context of "
                             f"{self.model.config.max_position_embeddings}")
        self.runner = make_runner(self.model, max_len, self.cache)

    @torch.no_grad()
    def propose(self, context: list[int], gamma: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> tuple[list[int], torch.Tensor]:
        """Up to gamma draft tokens after `context` and the (gamma, V) distributions they were drawn
        from; gamma = 0 gives an empty proposal ([], a (0, V) tensor)."""
        _check_propose_args(context, gamma)
        if self.runner is None:
            raise RuntimeError("call begin(max_len) before propose (speculative_generate does)")
        if gamma == 0:                                        # nothing to draft: an empty proposal
            w = self.model.lm_head.weight
            return [], torch.zeros(0, self.model.config.vocab_size, device=w.device)
        keep = min(_common_prefix(self.runner.tokens, context), len(context) - 1)
        self.runner.truncate(keep)                            # roll back what the target rejected
        logits = self.runner.forward(context[keep:])[-1]       # (V,) next-token logits
        tokens, qs = [], []
        for i in range(gamma):
            q = sampling.probs(logits)
            tok = int(q.argmax()) if not sampling.do_sample else _draw(q, generator)
            tokens.append(tok)
            qs.append(q)
            if i < gamma - 1:
                logits = self.runner.forward([tok])[-1]
        return tokens, torch.stack(qs)


class PromptLookupDrafter:
    """Propose the continuation of the latest earlier match of the context's last n tokens.

    Tries n = max_ngram down to min_ngram; proposes up to gamma tokens (fewer, or none, when the
    match is near the end or there is no match: the step is then a plain decode step).
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not (isinstance(min_ngram, int) and isinstance(max_ngram, int) and 1 <= min_ngram <= max_ngram):
            raise ValueError(f"need 1 <= min_ngram <= max_ngram (ints), got min_ngram={min_ngram!r}, "
                             f"max_ngram={max_ngram!r}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def check_target(self, target) -> None:
        pass

    def begin(self, max_len: int) -> None:
        pass

    def propose(self, context: list[int], gamma: int, sampling: Sampling = Sampling(),
                generator: torch.Generator | None = None) -> tuple[list[int], None]:
        _check_propose_args(context, gamma)
        if gamma == 0:
            return [], None
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):       # latest earlier occurrence first
                if context[start:start + n] == tail:
                    follow = context[start + n:start + n + gamma]
                    if follow:
                        return follow, None
        return [], None


def truncated_model(target: LlamaLM, num_layers: int) -> LlamaLM:
    """The target's first `num_layers` blocks, then its final norm and LM head (weights shared).

    An early-exit drafter that needs no training (the idea behind self-speculative decoding,
    e.g. LayerSkip): it costs num_layers / L of a target step and agrees with the target where
    the upper layers change little.
    """
    total = target.config.num_layers
    if not isinstance(num_layers, int) or not 1 <= num_layers < total:
        raise ValueError(f"num_layers must be an int in 1..{total - 1} (the target has {total} layers), "
                         f"got {num_layers!r}")
    draft = LlamaLM.__new__(LlamaLM)                 # no fresh weights: the target's modules are reused
    nn.Module.__init__(draft)
    draft.config = dataclasses.replace(target.config, num_layers=num_layers,
                                       name=f"{target.config.name}-first{num_layers}")
    draft.model = nn.Module()
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.layers = nn.ModuleList(target.model.layers[:num_layers])
    draft.model.norm = target.model.norm
    draft.model.rotary_emb = target.model.rotary_emb
    draft.lm_head = target.lm_head
    return draft.eval()


def load_draft(path: str | Path = DRAFT_MODEL_PATH, device="cpu", dtype=torch.float32) -> LlamaLM:
    """The bundled draft model for llmsys-tiny (train it with scripts/train_draft_model.py)."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no draft model at {path}: train it with scripts/train_draft_model.py, "
                                "or use truncated_model(target, n)")
    return LlamaLM.from_pretrained(path, dtype, device)
