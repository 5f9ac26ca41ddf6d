"""Assignment 03 (KV cache), probe side: the student's KVCache class driven by a scripted list of updates, and
generate_cached run on a freshly loaded copy of the kit's tiny model whose calls are recorded. No reference answers
here: what the cache returned, the tokens and the calls go back to the harness as data."""
from __future__ import annotations

_MODEL = []


def drive_cache(cls, name, ns):
    """KVCache(num_layers); per step, update(layer, k, v) for every layer in order; returns, flat (float64):
    seq_len of the empty cache, then per update the returned keys and values, then seq_len after each step."""
    import torch

    def run(num_layers, ks, vs):
        cache = cls(num_layers=int(num_layers))
        parts, lengths = [torch.tensor([float(cache.seq_len)], dtype=torch.float64)], []
        for i, (k, v) in enumerate(zip(ks, vs)):
            got = cache.update(i % num_layers, k, v)
            if not isinstance(got, tuple) or len(got) != 2 or not all(isinstance(x, torch.Tensor) for x in got):
                raise TypeError(f"{name}.update must return (keys, values), two tensors")
            parts += [got[0].detach().double().reshape(-1), got[1].detach().double().reshape(-1)]
            if i % num_layers == num_layers - 1:
                lengths.append(float(cache.seq_len))
        return torch.cat(parts + [torch.tensor(lengths, dtype=torch.float64)])
    return run


class _Recorder:
    """The model, recording per call (tokens given, tokens cached) as the notebook's CallRecorder does."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []

    def __call__(self, input_ids=None, kv_cache=None, **kwargs):
        self.calls.append((int(input_ids.shape[1]), -1 if kv_cache is None else int(kv_cache.seq_len)))
        return self.model(input_ids, kv_cache=kv_cache, **kwargs)

    forward = __call__


def drive_generate(fn, name, ns):
    """generate_cached(model, prompt, n) -> (ids, calls): calls is [[number of calls, -1], (tokens, cached)...]."""
    import torch

    from llmsys_lab.model import load_tiny

    if not _MODEL:
        _MODEL.append(load_tiny()[0])

    def run(prompt, max_new_tokens):
        recorder = _Recorder(_MODEL[0])
        ids = fn(recorder, prompt, int(max_new_tokens))
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must return a tensor of token ids, got {type(ids).__name__}")
        calls = torch.tensor([[len(recorder.calls), -1]] + [list(c) for c in recorder.calls], dtype=torch.int64)
        return ids.detach().long().cpu(), calls
    return run
