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
            if call.get("via"):                                     # e.g. a Triton kernel launched by the kit
                fn = _via(call["via"])(fn, call["fn"], ns)
            if call.get("forbid"):
                fn = Tracer(call["forbid"]).wrap(fn)
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


class Tracer:
    """Runs a call with a profile hook that notes every Python function it enters whose code comes from a
    forbidden file (the kit's reference, transformers' implementation): an alias, ``functools.partial``,
    wrapper or ``__code__`` copy all still run code whose ``co_filename`` is that file. Raises after the call
    if any did, or if the hook was switched off meanwhile."""

    def __init__(self, forbid: list[str], allow: tuple[str, ...] = ()):
        import importlib

        self.files, self.hit, self.allow = {}, None, tuple(allow)
        self.hook = self._hook                   # one bound method, so that getprofile() can be compared with it
        for entry in forbid:
            package, _, rel = entry.partition(":")
            try:
                root = Path(importlib.import_module("llmsys_lab" if package == "kit" else package).__file__).parent
            except ImportError:
                continue
            shown = f"{'llmsys_lab' if package == 'kit' else package}/{rel}"
            self.files[str((root / rel).resolve())] = self.files[str(root / rel)] = shown

    def _hook(self, frame, event, arg):
        if event == "call" and self.hit is None and frame.f_code.co_filename in self.files and not (
                self.allow and getattr(frame.f_code, "co_qualname", frame.f_code.co_name).startswith(self.allow)):
            self.hit = f"{frame.f_code.co_name} of {self.files[frame.f_code.co_filename]}"
        return None

    def wrap(self, fn):
        import sys
        import threading

        def traced(*args, **kwargs):
            sys.setprofile(self.hook)
            threading.setprofile(self.hook)
            try:
                value = fn(*args, **kwargs)
            finally:
                switched_off = sys.getprofile() is not self.hook
                sys.setprofile(None)
                threading.setprofile(None)
            if self.hit:
                raise RuntimeError(f"your code ran {self.hit}, a reference implementation this exercise asks you "
                                   "to write yourself")
            if switched_off:
                raise RuntimeError("the call tracing was switched off while your function ran")
            return value
        return traced


def _via(name: str):
    """A launcher of this module (VIA) or a driver function of ``llmsys_lab.grading.drivers`` ("module:function")."""
    if ":" not in name:
        return VIA[name]
    import importlib.util

    module, _, function = name.partition(":")
    if not module.startswith("llmsys_lab.grading.drivers.") or not module.rpartition(".")[2].isidentifier():
        raise ValueError(f"unknown probe driver {name!r}")
    # a fresh copy from the (read-only) file, not the module the notebook may have imported and patched
    path = Path(__file__).resolve().parent / "drivers" / f"{module.rpartition('.')[2]}.py"
    spec = importlib.util.spec_from_file_location(module, path)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return getattr(fresh, function)


def _student_triton_kernel(kernel, name):
    """kernel itself if it is a @triton.jit function written in the notebook, else TypeError.

    ``type()`` (not ``isinstance``) so that no subclass or object posing as a kernel passes, and the function's
    code must come from a notebook cell, not from the kit or another installed module."""
    import triton.runtime.jit

    kinds = [triton.runtime.jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        kinds.append(InterpretedFunction)
    except ImportError:  # pragma: no cover  (Triton builds without the interpreter)
        pass
    if type(kernel) not in kinds:
        raise TypeError(f"{name} must be a @triton.jit kernel, got {type(kernel).__name__}")
    import sys

    fn = getattr(kernel, "fn", None)
    code = getattr(fn, "__code__", None)
    installed = [p for p in {sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[1])} if p]
    if code is None or getattr(fn, "__module__", None) != "__main__" or any(
            str(Path(code.co_filename).resolve()).startswith(p) for p in installed):
        raise TypeError(f"{name} must be a @triton.jit kernel written in your notebook, not one imported from a module")
    return kernel


def _launch_add_rmsnorm(kernel, name, ns=None):
    """The assignment's launcher, as the kit runs it: outputs inside NaN guard zones, one program per row."""
    import torch
    import triton

    import llmsys_lab

    kernel = _student_triton_kernel(kernel, name)
    device = llmsys_lab.default_device()

    def launch(x, residual, weight, eps):
        rows, hidden = x.shape
        block = triton.next_power_of_2(hidden)

        def placed(t):
            buf = torch.full((t.numel() + 2 * block,), float("nan"), dtype=t.dtype, device=device)
            inner = buf[block:block + t.numel()].view(t.shape)
            inner.copy_(t)
            return buf, inner

        (_, x), (_, residual), (_, weight) = placed(x), placed(residual), placed(weight)
        (out_buf, normed), (res_buf, new_residual) = placed(torch.zeros_like(x)), placed(torch.zeros_like(x))
        kernel[(rows,)](x, residual, weight, normed, new_residual, hidden, eps, BLOCK=block)
        for what, buf in (("normed", out_buf), ("new_residual", res_buf)):
            outside = torch.cat([buf[:block], buf[block + x.numel():]])
            if not torch.isnan(outside).all():
                raise RuntimeError(f"the kernel wrote outside {what}, past the end of a row")
        return normed, new_residual
    return launch


# ---- assignment 08: the student's functions run on gloo ranks, started here; raw results come back ------
RANK_PREAMBLE = """
import torch.nn.functional as F
from llmsys_lab.parallel.tensor_parallel import copy_to_tp, reduce_from_tp
from llmsys_lab.grading.probe import DDP_FORBIDDEN, KIT_PARALLEL, TP_ALLOWED, DDPNet, Tracer, count_messages
"""
TP_HELPERS = ("shard_columns", "shard_rows", "column_parallel_linear", "row_parallel_linear", "tp_mlp")
KIT_PARALLEL = ["kit:parallel/ring.py", "kit:parallel/tensor_parallel.py", "kit:parallel/data_parallel.py",
                "kit:parallel/ddp.py", "kit:parallel/fsdp.py", "kit:parallel/sequence_parallel.py"]
TP_ALLOWED = ("copy_to_tp", "reduce_from_tp", "_CopyToTP.", "_ReduceFromTP.")
DDP_FORBIDDEN = KIT_PARALLEL + ["kit:parallel/overlap.py", "kit:parallel/zero.py", "torch:nn/parallel/distributed.py"]


def _ddp_net_class():
    import torch
    from torch import nn

    class DDPNet(nn.Module):
        """Assignment 08's data-parallel model: an embedding tied to the LM head (one parameter used twice), a
        frozen up projection, a trainable down projection and a norm gain; parameters() order: emb, up, down, gain.
        Built from given float64 weights, so every rank and the harness hold the same model."""

        def __init__(self, emb, up, down, gain):
            super().__init__()
            self.emb = nn.Parameter(emb.clone())
            self.up = nn.Parameter(up.clone(), requires_grad=False)
            self.down = nn.Parameter(down.clone())
            self.gain = nn.Parameter(gain.clone())

        def forward(self, ids):
            x = self.emb[ids]                                                    # (B, T, H)
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
            x = x + torch.nn.functional.gelu(h @ self.up.T) @ self.down.T
            return x @ self.emb.T                                                # the tied LM head

        def loss(self, ids):
            logits = self(ids[:, :-1])
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return DDPNet


def DDPNet(*weights):  # noqa: N802  (a class, built on first use)
    return _ddp_net_class()(*weights)


def count_messages():
    """Counts, on this rank, the bytes of every point-to-point send and every collective call, where every
    torch.distributed function ends: the process group's and its backends' methods (so an alias, a private
    helper or the group object itself is counted too). Returns the counter dict."""
    import torch._C._distributed_c10d as c10d

    counter = {"sent": 0, "collectives": 0}
    collectives = ("allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "_allgather_base",
                   "allgather_into_tensor_coalesced", "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced",
                   "broadcast", "reduce", "alltoall", "alltoall_base", "gather", "scatter", "all_gather_single",
                   "all_to_all_single", "reduce_scatter_single")
    for cls in {c10d.ProcessGroup, getattr(c10d, "Backend", None), getattr(c10d, "ProcessGroupGloo", None)} - {None}:
        send = cls.__dict__.get("send")
        if send is not None:
            def counted_send(self, tensors, *args, _send=send, **kwargs):
                counter["sent"] += sum(t.numel() * t.element_size() for t in tensors)
                return _send(self, tensors, *args, **kwargs)
            setattr(cls, "send", counted_send)
        for name in collectives:
            method = cls.__dict__.get(name)
            if method is not None:
                def counted(self, *args, _method=method, **kwargs):
                    counter["collectives"] += 1
                    return _method(self, *args, **kwargs)
                setattr(cls, name, counted)
    return counter


def rank_ring(sizes, inputs):
    """On every rank: ring_all_reduce on this rank's tensor of each size; per size y, t after the call, the bytes
    this rank sent and the number of collectives it called, as one flat float64 tensor. The kit's parallel code
    (its own ring) is traced and refused."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    counter = count_messages()
    tracer = Tracer(KIT_PARALLEL)
    parts = []
    for i, n in enumerate(sizes):
        x = inputs[i * world + rank].clone()
        counter.update(sent=0, collectives=0)
        y = tracer.wrap(ring_all_reduce)(x)  # noqa: F821  (shipped with this function)
        y = torch.as_tensor(y).reshape(-1)
        if y.numel() != n:
            raise ValueError(f"ring_all_reduce returned {y.numel()} values for a tensor of {n}")
        parts += [y.double(), x.reshape(-1).double(), torch.tensor([counter["sent"], counter["collectives"]],
                                                                     dtype=torch.float64)]
    return torch.cat(parts)


def rank_tp(x, r, w1, w2):
    """On every rank: tp_mlp on this rank's shards (cut here, not by the student's functions); y, the input's
    gradient and both shards' gradients for the loss (y * r).sum(), flat. The kit's TP layers are refused
    (copy_to_tp / reduce_from_tp are the exercise's tools)."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    n = w1.shape[0] // world
    x = x.clone().requires_grad_()
    s1 = w1[rank * n:(rank + 1) * n].clone().requires_grad_()
    s2 = w2[:, rank * n:(rank + 1) * n].clone().requires_grad_()
    y = Tracer(KIT_PARALLEL, allow=TP_ALLOWED).wrap(tp_mlp)(x, s1, s2)  # noqa: F821  (shipped with this function)
    (y * r).sum().backward()
    if x.grad is None or s1.grad is None or s2.grad is None:
        raise RuntimeError("tp_mlp's output does not depend on the input and both weight shards through autograd")
    return torch.cat([y.detach().reshape(-1), x.grad.reshape(-1), s1.grad.reshape(-1), s2.grad.reshape(-1)])


def rank_ddp(bucket_bytes, ids, ids2, emb, up, down, gain):
    """On every rank: the student's register_ddp_hooks on DDPNet's parameters (the tied one listed twice), then two
    backward passes on this rank's slices of two batches (gradients set to None in between), all traced (the kit's
    DDP and torch's are refused). Returns, flat: per pass the gradients of emb, down and gain; then 1.0 if the
    frozen weight got a gradient, and per pass the number of collectives called while the hooks ran."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    model = DDPNet(emb, up, down, gain)
    counter = count_messages()
    parts, collectives, frozen = [], [], False

    def steps():
        register_ddp_hooks([*model.parameters(), model.emb], bucket_bytes)  # noqa: F821  (shipped with this function)
        nonlocal frozen
        for batch in (ids, ids2):
            for p in model.parameters():
                p.grad = None                                               # optimizer.zero_grad()
            counter.update(sent=0, collectives=0)
            model.loss(batch.chunk(world)[rank]).backward()
            collectives.append(float(counter["collectives"]))
            frozen = frozen or model.up.grad is not None
            grads = [p.grad for p in (model.emb, model.down, model.gain)]
            if any(g is None for g in grads):
                raise RuntimeError("after a backward pass a trainable parameter has no gradient")
            parts.extend(g.reshape(-1).double().clone() for g in grads)

    Tracer(DDP_FORBIDDEN).wrap(steps)()
    return torch.cat(parts + [torch.tensor([float(frozen), *collectives], dtype=torch.float64)])


def _on_ranks(rank_fn, helper_names):
    def via(fn, name, ns):
        from llmsys_lab.parallel import launch

        helpers = tuple(ns[h] for h in helper_names if h in ns and callable(ns[h]))
        if name not in helper_names or ns.get(name) is not fn:
            helpers = helpers + (fn,)

        def run(world, *args):
            return torch_cat([torch_as(r) for r in launch(rank_fn, int(world), args=args, helpers=helpers,
                                                             preamble=RANK_PREAMBLE, timeout=60, backend="gloo")])
        return run
    return via


def torch_cat(parts):
    import torch
    return torch.cat(parts)


def torch_as(value):
    import torch
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"a rank returned {type(value).__name__}")
    return value.reshape(-1)


def _ring_via(fn, name, ns):
    run = _on_ranks(rank_ring, ("ring_all_reduce",))(fn, name, ns)
    return lambda world, sizes, inputs: run(world, list(sizes), list(inputs))


VIA = {"add_rmsnorm": _launch_add_rmsnorm, "ring_ranks": _ring_via, "tp_ranks": _on_ranks(rank_tp, TP_HELPERS),
       "ddp_ranks": _on_ranks(rank_ddp, ("register_ddp_hooks",))}


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
        elif isinstance(a, dict) and "config" in a:              # a model configuration, built here
            from llmsys_lab.configs import ModelConfig
            out.append(ModelConfig(**a["config"]))
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
    if isinstance(value, (int, float)) and not isinstance(value, bool):       # a number: exact for ints
        return torch.tensor([value], dtype=torch.int64 if isinstance(value, int) else torch.float64)
    if isinstance(value, (tuple, list)) and value and any(isinstance(v, float) for v in value) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return torch.tensor([float(v) for v in value], dtype=torch.float64)
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) or (isinstance(v, torch.Tensor) and v.numel() == 1)
                                                for v in value):
        return torch.tensor([int(v) for v in value], dtype=torch.int64)
    raise TypeError(f"returned {type(value).__name__}, not a tensor or a tuple of ints")
