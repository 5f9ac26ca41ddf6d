"""Assignment 06 (FlashAttention): block statistics, online attention and the Triton forward kernel on inputs
drawn per submission, judged here against attention computed in float64. The harness launches the kernel with its
own copy of the assignment's launcher and accepts only a @triton.jit function written in the notebook."""
from __future__ import annotations

import math

import torch

from ..harness import Call, Spec, _close, _err

ASSIGNMENT = "06_flash_attention"
DRIVERS = "llmsys_lab.grading.drivers.a06"
# a GPU's fp32 tl.dot uses TF32 (about 3 decimal digits); the interpreter (CPU) is exact to ~1e-6
KERNEL_TOL = 5e-3
# (B, H, T, D, causal, block_m, block_n, test)
KERNEL_CASES = {"f0": (1, 2, 128, 32, False, 32, 32, "test_flash_forward"),
                "f1": (2, 1, 64, 64, False, 16, 32, "test_flash_forward"),
                "c0": (1, 2, 128, 32, True, 32, 32, "test_flash_causal"),
                "c1": (2, 1, 64, 16, True, 16, 32, "test_flash_causal"),
                "r0": (1, 2, 72, 16, False, 32, 32, "test_flash_ragged"),
                "r1": (1, 2, 72, 16, True, 32, 32, "test_flash_ragged"),
                "r2": (2, 3, 45, 16, True, 16, 16, "test_flash_ragged")}


def _stats(s, v):
    """(m, l, o) of one block of keys, float64."""
    s, v = s.double(), v.double()
    m = s.max(dim=-1).values
    p = torch.exp(s - m[..., None])
    return m, p.sum(-1), p @ v


def _attention(q, k, v, causal=False):
    """softmax(q k^T / sqrt(D)) v and the log-sum-exp per row, float64."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        t_q, t_k = s.shape[-2:]
        s = s.masked_fill(~torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def _merge_cases(g):
    """name -> (s, v, split): the two blocks' statistics are the merge's inputs; empty blocks either side."""
    rows, keys, d = int(torch.randint(2, 7, (), generator=g)), int(torch.randint(6, 20, (), generator=g)), 16
    out = {}
    for i, scale in enumerate((3.0, 3.0, 600.0)):
        s, v = torch.randn(2, rows, keys, generator=g) * scale, torch.randn(2, keys, d, generator=g)
        out[f"merge/{i}"] = (s, v, int(torch.randint(1, keys, (), generator=g)))
    return out


def calls(g: torch.Generator):
    t: dict[str, torch.Tensor] = {}
    out = []
    for cid, (s, v, split) in _merge_cases(g).items():
        t[f"{cid}.s"], t[f"{cid}.v"] = s, v
        first = [x.float() for x in _stats(s[..., :split], v[..., :split, :])]
        second = [x.float() for x in _stats(s[..., split:], v[..., split:, :])]
        names = []
        for j, x in enumerate(first + second):
            t[f"{cid}.in{j}"] = x
            names.append(f"{cid}.in{j}")
        out.append(Call(cid, "merge", names, via=f"{DRIVERS}:drive_merge"))
        if cid == "merge/0":                          # an empty block as the first, then as the second argument
            m, l, o = first
            empty = [torch.full_like(m, float("-inf")), torch.zeros_like(l), torch.zeros_like(o)]
            for j, x in enumerate(empty):
                t[f"empty.{j}"] = x
            out.append(Call("merge/empty_first", "merge", ["empty.0", "empty.1", "empty.2"] + names[:3],
                            via=f"{DRIVERS}:drive_merge"))
            out.append(Call("merge/empty_second", "merge", names[:3] + ["empty.0", "empty.1", "empty.2"],
                            via=f"{DRIVERS}:drive_merge"))
    s_len = int(torch.randint(33, 60, (), generator=g))
    t["o.q"], t["o.k"], t["o.v"] = (torch.randn(2, 3, 10, 24, generator=g), torch.randn(2, 3, s_len, 24, generator=g),
                                    torch.randn(2, 3, s_len, 24, generator=g))
    for block_n in (s_len, 16, 5, 1):
        out.append(Call(f"online/{block_n}", "online_attention", ["o.q", "o.k", "o.v", block_n],
                        via=f"{DRIVERS}:drive_online"))
    t["ol.q"], t["ol.k"], t["ol.v"] = (torch.randn(1, 1, 4, 8, generator=g) * 40, torch.randn(1, 1, 9, 8, generator=g) * 40,
                                       torch.randn(1, 1, 9, 8, generator=g))
    out.append(Call("online/large", "online_attention", ["ol.q", "ol.k", "ol.v", 2], via=f"{DRIVERS}:drive_online"))
    for cid, (B, H, T, D, causal, bm, bn, _) in KERNEL_CASES.items():
        for x in "qkv":
            t[f"{cid}.{x}"] = torch.randn(B, H, T, D, generator=g)
        out.append(Call(f"flash/{cid}", "flash_fwd_kernel", [f"{cid}.q", f"{cid}.k", f"{cid}.v", causal, bm, bn],
                        via=f"{DRIVERS}:drive_flash"))
    return out, t


def _judge_merge(t, outputs, errors):
    for cid in ("merge/0", "merge/1", "merge/2", "merge/empty_first", "merge/empty_second"):
        if _err(errors, cid):
            return _err(errors, cid)
        base = "merge/0" if cid.startswith("merge/empty") else cid
        m, l, o = _stats(t[f"{base}.s"], t[f"{base}.v"])
        if cid.startswith("merge/empty"):                # merging with an empty block changes nothing
            m, l, o = (t[f"merge/0.in{j}"].double() for j in range(3))
        got = outputs.get(cid)
        if not isinstance(got, torch.Tensor) or got.numel() != m.numel() + l.numel() + o.numel():
            return f"{cid}: merge must return (m, l, o) shaped like its inputs"
        gm, gl, go = got.split([m.numel(), l.numel(), o.numel()])
        if cid == "merge/2":                            # scores in the hundreds: o / l is what must be exact
            ratio = (go.reshape(o.shape) / gl.reshape(l.shape)[..., None]).float()
            why = _close(gm.reshape(m.shape).float(), m.float(), 1e-4, 1e-5) or _close(
                ratio, (o / l[..., None]).float(), 1e-5, 1e-4)
        else:
            why = next((f"{what}: {w}" for what, a, b in (("m", gm, m), ("l", gl, l), ("o", go, o))
                        if (w := _close(a.reshape(b.shape).float(), b.float(), 1e-5, 1e-5))), None)
        if why:
            return f"{cid}: {why}"
    return None


def _judge_online(t, outputs, errors):
    for call in (c for c in t["__calls__"] if c.id.startswith("online/")):
        if _err(errors, call.id):
            return _err(errors, call.id)
        q, k, v = (t[name] for name in call.args[:3])
        ref, _ = _attention(q, k, v)
        tol = 5e-4 if call.id == "online/large" else 1e-5   # scores ~1e3: fp32 rounds them by ~1e-4
        why = _close(outputs.get(call.id), ref.float(), tol, tol)
        if why:
            return f"{call.id} (block_n={call.args[3]}, S={k.shape[2]}): {why}"
    return None


def _judge_kernel(test):
    def judge(t, outputs, errors):
        for cid, (B, H, T, D, causal, bm, bn, which) in KERNEL_CASES.items():
            if which != test:
                continue
            call = f"flash/{cid}"
            if _err(errors, call):
                return _err(errors, call)
            ref, lse = _attention(t[f"{cid}.q"], t[f"{cid}.k"], t[f"{cid}.v"], causal)
            got = outputs.get(call)
            if not isinstance(got, torch.Tensor) or got.numel() != ref.numel() + lse.numel():
                return f"{call}: the launch returned nothing usable"
            out, got_lse = got.split([ref.numel(), lse.numel()])
            shown = f"(B, H, T, D) = {(B, H, T, D)}, causal={causal}, {bm} x {bn} tiles"
            for what, a, b in (("output", out, ref), ("log-sum-exp", got_lse, lse)):
                why = _close(a.reshape(b.shape), b.float(), KERNEL_TOL, KERNEL_TOL)
                if why:
                    return f"{call} {shown}: {what}: {why}"
        return None
    return judge


SPEC = Spec(
    hide=[], calls=calls,
    forbid=("kit:flash.py", "kit:flash_backward.py", "kit:attention.py", "kit:kernels/flash_attention.py",
            "kit:kernels/flash_steps.py"),
    judge={"test_merge": _judge_merge, "test_online_attention": _judge_online,
           "test_flash_forward": _judge_kernel("test_flash_forward"),
           "test_flash_causal": _judge_kernel("test_flash_causal"),
           "test_flash_ragged": _judge_kernel("test_flash_ragged")})
