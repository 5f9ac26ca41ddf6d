"""Assignment 03 (KV cache): the student's KVCache driven through a scripted sequence of updates (layers, chunk
lengths and values drawn per submission), and generate_cached run on prompts drawn per submission; the cache's
answers, the tokens (each checked as the greedy choice of the uncached model on the sequence so far) and the calls
(one prefill, then one token per call against the growing cache) are judged here, outside the sandbox."""
from __future__ import annotations

import threading

import torch

from ..harness import Call, Spec, _err

ASSIGNMENT = "03_kv_cache"
DRIVERS = "llmsys_lab.grading.drivers.a03"
TOKEN_TOL = 1e-3      # logits of a cached and an uncached float32 forward differ by ~1e-5: ties within this pass


_LOADED: list = []
_LOCK = threading.Lock()           # submissions are prepared and judged on several threads at once


def _model():
    """The kit's tiny model (no tokenizer), loaded once."""
    with _LOCK:
        if not _LOADED:
            from ...model import TINY_MODEL_PATH, LlamaLM
            _LOADED.append(LlamaLM.from_pretrained(TINY_MODEL_PATH, torch.float32, "cpu").eval())
        return _LOADED[0]


def _cache_script(g):
    layers = int(torch.randint(2, 5, (), generator=g))
    batch, heads, dim = int(torch.randint(1, 4, (), generator=g)), int(torch.randint(1, 4, (), generator=g)), 8
    steps = [int(torch.randint(2, 7, (), generator=g))] + [1, 1, int(torch.randint(2, 4, (), generator=g))]
    ks, vs = [], []
    for t in steps:
        for _ in range(layers):
            ks.append(torch.randn(batch, heads, t, dim, generator=g))
            vs.append(torch.randn(batch, heads, t, dim, generator=g))
    return layers, steps, ks, vs


def calls(g: torch.Generator):
    t: dict[str, torch.Tensor] = {}
    out = []
    for c in range(2):
        layers, steps, ks, vs = _cache_script(g)
        for i, (k, v) in enumerate(zip(ks, vs)):
            t[f"c{c}.k{i}"], t[f"c{c}.v{i}"] = k, v
        out.append(Call(f"cache/{c}", "KVCache", [layers, {"tuple": [f"c{c}.k{i}" for i in range(len(ks))]},
                                                  {"tuple": [f"c{c}.v{i}" for i in range(len(vs))]}],
                        via=f"{DRIVERS}:drive_cache"))
    vocab = _model().config.vocab_size
    for p, (batch, length, new) in enumerate(((2, int(torch.randint(3, 9, (), generator=g)), 12),
                                              (1, int(torch.randint(5, 12, (), generator=g)), 16),
                                              (2, int(torch.randint(3, 9, (), generator=g)), 1))):
        t[f"p{p}"] = torch.randint(0, vocab, (batch, length), generator=g)
        out.append(Call(f"generate/{p}", "generate_cached", [f"p{p}", new], via=f"{DRIVERS}:drive_generate"))
    return out, t


def _judge_cache(t, outputs, errors):
    for call in (c for c in t["__calls__"] if c.fn == "KVCache"):
        if _err(errors, call.id):
            return _err(errors, call.id)
        layers, ks, vs = call.args[0], call.args[1]["tuple"], call.args[2]["tuple"]
        want, held, lengths = [torch.zeros(1, dtype=torch.float64)], {}, []
        for i, (k, v) in enumerate(zip(ks, vs)):
            layer = i % layers
            pk, pv = held.get(layer, (None, None))
            held[layer] = (t[k] if pk is None else torch.cat([pk, t[k]], 2), t[v] if pv is None else torch.cat([pv, t[v]], 2))
            want += [held[layer][0].double().reshape(-1), held[layer][1].double().reshape(-1)]
            if layer == layers - 1:
                lengths.append(float(held[layer][0].shape[2]))
        want = torch.cat(want + [torch.tensor(lengths, dtype=torch.float64)])
        got = outputs.get(call.id)
        script = f"{layers} layers, chunks of {[t[ks[i]].shape[2] for i in range(0, len(ks), layers)]} tokens"
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return f"{call.id} ({script}): update() returned keys/values of the wrong sizes"
        if got[0] != 0:
            return f"{call.id}: an empty cache has seq_len {got[0].item():g}, expected 0"
        n = len(lengths)
        if not torch.equal(got[-n:], want[-n:]):
            return f"{call.id} ({script}): seq_len after each step is {got[-n:].tolist()}, expected {want[-n:].tolist()}"
        if not torch.equal(got[:-n], want[:-n]):
            return f"{call.id} ({script}): the keys or values update() returned are not everything cached for that layer"
    return None


def _tokens(call, t, outputs, errors):
    if _err(errors, call.id):
        return _err(errors, call.id)
    prompt, new = t[call.args[0]], call.args[1]
    ids = outputs.get(f"{call.id}#0")
    if ids is None or outputs.get(f"{call.id}#1") is None:
        return f"{call.id}: generate_cached returned nothing usable"
    if tuple(ids.shape) != (prompt.shape[0], prompt.shape[1] + new):
        return f"{call.id}: the result has shape {tuple(ids.shape)}, expected {(prompt.shape[0], prompt.shape[1] + new)}"
    if not torch.equal(ids[:, :prompt.shape[1]], prompt):
        return f"{call.id}: the result must start with the prompt"
    if (ids < 0).any() or (ids >= _model().config.vocab_size).any():
        return f"{call.id}: token ids outside the vocabulary"
    with torch.no_grad():
        logits = _model()(ids[:, :-1]).double()                 # the uncached model on the sequence so far
    for i in range(prompt.shape[1], ids.shape[1]):
        row = logits[:, i - 1]
        chosen = row.gather(1, ids[:, i:i + 1])[:, 0]
        if (chosen < row.max(1).values - TOKEN_TOL).any():
            b = int((chosen < row.max(1).values - TOKEN_TOL).nonzero()[0])
            return (f"{call.id} (a {prompt.shape[1]}-token prompt, {new} new tokens): sequence {b}, new token "
                    f"{i - prompt.shape[1] + 1} is {int(ids[b, i])}, greedy decoding chooses {int(row[b].argmax())}")
    return None


def _judge_equal(t, outputs, errors):
    for call in (c for c in t["__calls__"] if c.fn == "generate_cached"):
        why = _tokens(call, t, outputs, errors)
        if why:
            return why
    return None


def _judge_steps(t, outputs, errors):
    for call in (c for c in t["__calls__"] if c.fn == "generate_cached"):
        if _err(errors, call.id):
            return _err(errors, call.id)
        calls = outputs.get(f"{call.id}#1")
        if calls is None or calls.dim() != 2 or calls.shape[1] != 2 or int(calls[0, 0]) != calls.shape[0] - 1:
            return f"{call.id}: generate_cached returned nothing usable"
        seen = [tuple(int(x) for x in row) for row in calls[1:]]
        length, new = t[call.args[0]].shape[1], call.args[1]
        if not seen or seen[0] != (length, 0):
            return (f"{call.id}: the first call should be the prefill of {length} prompt tokens with an empty cache; "
                    f"got {seen[0] if seen else 'no call'} as (tokens, cached)")
        for i, step in enumerate(seen[1:], start=1):
            if step != (1, length + i - 1):
                return (f"{call.id}: call {i} should run 1 new token with {length + i - 1} cached, got {step[0]} "
                        f"tokens with {step[1]} cached" + (" (no cache passed)" if step[1] == -1 else ""))
        if len(seen) not in (new, new + 1):
            return f"{call.id}: {new} new tokens need {new} model calls (1 prefill + {new - 1} decode steps), got {len(seen)}"
    return None


SPEC = Spec(
    hide=[], calls=calls,
    forbid=("kit:kv_cache.py", "kit:generate.py", "kit:plain_decode.py", "kit:paged_cache.py", "kit:paged.py",
            "kit:paged_generate.py", "kit:engine.py", "transformers:cache_utils.py",
            "transformers:generation/utils.py"),
    judge={"test_cache": _judge_cache, "test_generate_equal": _judge_equal, "test_decode_steps": _judge_steps})
