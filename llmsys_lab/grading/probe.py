"""Runs inside the sandboxed kernel after the notebook: calls the student's functions on the harness's
inputs and writes what they returned (safetensors) and raised (JSON) into the job folder.

Nothing here decides a grade: whatever a submission does to this module, it can only change the data
it hands back, which the harness outside checks against references it computes itself.
"""
from __future__ import annotations

import json
from pathlib import Path


def run(work: str) -> None:
    import torch
    from IPython import get_ipython
    from safetensors.torch import load_file, save_file

    work = Path(work)
    ns = get_ipython().user_ns
    tensors = load_file(str(work / "probe_in.safetensors"))
    outputs, errors = {}, {}
    for call in json.loads((work / "probe_calls.json").read_text()):
        fn = ns.get(call["fn"])
        _Counted.calls = 0
        try:
            if fn is None:
                raise NameError(f"name '{call['fn']}' is not defined")
            first = call["args"][0] if call["args"] else None
            if isinstance(first, dict) and "repeat" in first:      # one call per row: [(row, *rest), ...]
                rest = _args(call["args"][1:], tensors)             # one generator for all the rows
                outs = [_tensor(fn(row, *rest, **call["kwargs"])) for row in tensors[first["repeat"]].tolist()]
                out = torch.stack(outs)
            elif isinstance(first, dict) and "kvcache" in first:    # a function that changes a cache in place
                cache = _cache(first["kvcache"], tensors)
                fn(cache, *_args(call["args"][1:], tensors), **call["kwargs"])
                outputs[f"{call['id']}#k"] = cache.k.detach().cpu().contiguous().clone()
                outputs[f"{call['id']}#v"] = cache.v.detach().cpu().contiguous().clone()
                outputs[f"{call['id']}#lengths"] = torch.tensor([int(n) for n in cache.lengths])
                continue
            else:
                value = fn(*_args(call["args"], tensors), **call["kwargs"])
                if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) and v.numel() > 1
                                                                       for v in value):
                    for i, part in enumerate(value):                 # a tuple of tensors: id#0, id#1, ...
                        outputs[f"{call['id']}#{i}"] = part.detach().cpu().contiguous().clone()
                    continue
                out = _tensor(value)
            outputs[call["id"]] = out.detach().cpu().contiguous().clone()
            if any(isinstance(a, dict) and "counted" in a for a in call["args"]):
                outputs[f"{call['id']}@calls"] = torch.tensor(_Counted.calls)
        except Exception as err:  # noqa: BLE001  (reported to the harness as data)
            errors[call["id"]] = [type(err).__name__, str(err)[:500]]
    save_file(outputs, str(work / "probe_out.safetensors"))
    (work / "probe_errors.json").write_text(json.dumps(errors))


def _cache(spec, tensors):
    from llmsys_lab.kv_cache import KVCache

    k = tensors[spec["k"]].clone()
    layers, batch, heads, max_len, head_dim = k.shape
    cache = KVCache(layers, batch, heads, head_dim, max_len)
    cache.k, cache.v, cache.lengths = k, tensors[spec["v"]].clone(), list(spec["lengths"])
    return cache


class _Counted:
    """Stands for a model: forwards everything to it and counts its forward passes (calls)."""
    calls = 0

    def __init__(self, model):
        object.__setattr__(self, "_model", model)

    def __call__(self, *args, **kwargs):
        _Counted.calls += 1
        return self._model(*args, **kwargs)

    def forward(self, *args, **kwargs):
        _Counted.calls += 1
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _args(args, tensors):
    import torch
    from IPython import get_ipython

    out = []
    for a in args:
        if isinstance(a, str) and a in tensors:
            out.append(tensors[a].clone())
        elif isinstance(a, dict) and "counted" in a:           # a namespace object whose calls are counted
            out.append(_Counted(get_ipython().user_ns[a["counted"]]))
        elif isinstance(a, dict) and "ns" in a:
            out.append(get_ipython().user_ns[a["ns"]])
        elif isinstance(a, dict) and "tuple" in a:
            out.append(tuple(tensors[name].clone() for name in a["tuple"]))
        elif isinstance(a, dict) and "generator" in a:
            out.append(torch.Generator().manual_seed(int(a["generator"])))
        else:
            out.append(a)
    return out


def _tensor(value):
    """A returned tensor as is; a tuple or list of ints (e.g. (accepted, next token)) as an int64 tensor."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) or (isinstance(v, torch.Tensor) and v.numel() == 1)
                                                for v in value):
        return torch.tensor([int(v) for v in value], dtype=torch.int64)
    raise TypeError(f"returned {type(value).__name__}, not a tensor or a tuple of ints")
