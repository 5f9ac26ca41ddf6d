"""The trusted harness: graded verdicts decided outside the student's process.

For an assignment listed in ``SPECS`` the grader, in its own process,

1. draws fresh inputs (a seed made up per submission, so no answer can be prepared for them) and
   writes them to the job folder as safetensors, with the list of calls as JSON;
2. lets the sandbox run the notebook and then ``probe.run`` in the same kernel, which calls the
   student's functions on those inputs and writes what they returned (safetensors) or raised (JSON)
   -- data only, nothing that can execute code when read;
3. computes the references itself (PyTorch, outside the sandbox) and decides each graded test.

A test scores only when both its in-kernel cell passed (the feedback students see, the own-code
tracer) and the harness accepts the returned outputs; the harness's verdict cannot be forged from
inside the kernel. The kit modules an assignment forbids are hidden from the sandbox (``hide``), so
no alias, ``functools.partial``, ``importlib`` or ``__code__`` copy can call them.
"""
from __future__ import annotations

import json
import math
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Call:
    id: str
    fn: str
    args: list                          # tensors (by name in the inputs file) or JSON values
    kwargs: dict = field(default_factory=dict)
    via: str | None = None              # call the named object through one of the probe's launchers (probe.VIA)
    forbid: list[str] = field(default_factory=list)   # files whose code the call may not run (probe.Tracer)


@dataclass
class Spec:
    hide: list[str]                                     # kit files (relative to the package) absent in the sandbox
    calls: Callable[[torch.Generator], tuple[list[Call], dict[str, torch.Tensor]]]
    judge: dict[str, Callable[[dict, dict, dict], str | None]]   # test id -> (inputs, outputs, errors) -> why not
    strip: dict[str, tuple[str, ...]] = field(default_factory=dict)   # kit file -> functions removed in the sandbox
    # "kit:<file>" or "<package>:<file>": code the student's functions may not run while the probe calls them
    # (kit references the locked tests still need, and real implementations such as transformers' MoE blocks)
    forbid: tuple[str, ...] = ()


# ---- assignment 01: attention -------------------------------------------------------------------------
def _sdpa(q, k, v, mask=None, causal=False):
    """The reference, computed here in float64 (outside the sandbox)."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        mask = _mask(q.shape[-2], k.shape[-2])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _mask(t_q: int, t_k: int) -> torch.Tensor:
    return torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)


def _calls_01(g: torch.Generator):
    t: dict[str, torch.Tensor] = {}
    calls: list[Call] = []

    def r(name, *shape, dtype=torch.float32, scale=1.0):
        t[name] = torch.randn(*shape, generator=g, dtype=dtype) * scale
        return name

    calls.append(Call("attention/fp32", "attention", [r("a.q", 2, 3, 5, 16), r("a.k", 2, 3, 7, 16), r("a.v", 2, 3, 7, 16)]))
    calls.append(Call("attention/fp64", "attention", [r(f"b.{x}", 1, 1, 3, 4, dtype=torch.float64) for x in "qkv"]))
    calls.append(Call("attention/large", "attention", [r("c.q", 1, 2, 6, 8, scale=30), r("c.k", 1, 2, 6, 8, scale=30),
                                                       r("c.v", 1, 2, 6, 8)]))
    for t_q, t_k in ((5, 5), (3, 5), (1, 6), (4, 9)):
        calls.append(Call(f"causal_mask/{t_q}x{t_k}", "causal_mask", [t_q, t_k]))
    calls.append(Call("causal_attention/square", "causal_attention", [r(f"d.{x}", 2, 4, 9, 16) for x in "qkv"]))
    calls.append(Call("causal_attention/rect", "causal_attention", [r("e.q", 1, 2, 3, 8), r("e.k", 1, 2, 7, 8),
                                                                    r("e.v", 1, 2, 7, 8)]))
    r("f.q", 2, 8, 6, 16)
    for h_kv in (2, 1, 8):
        r(f"f.k{h_kv}", 2, h_kv, 6, 16), r(f"f.v{h_kv}", 2, h_kv, 6, 16)
        for causal in (False, True):
            calls.append(Call(f"gqa/{h_kv}/{causal}", "gqa_attention", ["f.q", f"f.k{h_kv}", f"f.v{h_kv}"],
                              {"causal": causal}))
    calls.append(Call("gqa/12/4", "gqa_attention", [r("h.q", 1, 12, 3, 8), r("h.k", 1, 4, 3, 8), r("h.v", 1, 4, 3, 8)]))
    calls.append(Call("gqa/bad", "gqa_attention", [r("i.q", 1, 6, 2, 8), r("i.k", 1, 4, 2, 8), r("i.v", 1, 4, 2, 8)]))
    return calls, t


def _close(out, ref, atol, rtol) -> str | None:
    if not isinstance(out, torch.Tensor):
        return "did not return a tensor"
    if tuple(out.shape) != tuple(ref.shape):
        return f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if out.dtype != ref.dtype:
        return f"dtype {out.dtype}, expected {ref.dtype}"
    if out.dtype == torch.bool:
        return None if torch.equal(out, ref) else "wrong values"
    a, b = out.double(), ref.double()
    if not torch.isfinite(a).all():
        return "not finite (inf or nan)"
    bad = (a - b).abs() > atol + rtol * b.abs()
    return None if not bad.any() else f"max abs error {(a - b).abs().max().item():.3g} (atol={atol:g}, rtol={rtol:g})"


def _judge(prefixes, reference, atol=1e-5, rtol=1e-5):
    def judge(inputs, outputs, errors) -> str | None:
        for cid, ref_fn in reference(inputs).items():
            if not any(cid.startswith(p) for p in prefixes):
                continue
            if cid in errors:
                return f"{cid}: raised {errors[cid][0]}: {errors[cid][1]}"[:300]
            why = _close(outputs.get(cid), ref_fn, *((1e-4, 1e-4) if cid.endswith("large") else (atol, rtol)))
            if why:
                return f"{cid}: {why}"
        return None
    return judge


def _refs_01(t):
    refs = {"attention/fp32": _sdpa(t["a.q"], t["a.k"], t["a.v"]).float(),
            "attention/fp64": _sdpa(t["b.q"], t["b.k"], t["b.v"]),
            "attention/large": _sdpa(t["c.q"], t["c.k"], t["c.v"]).float(),
            "causal_attention/square": _sdpa(t["d.q"], t["d.k"], t["d.v"], causal=True).float(),
            "causal_attention/rect": _sdpa(t["e.q"], t["e.k"], t["e.v"], causal=True).float(),
            "gqa/12/4": _sdpa(t["h.q"], t["h.k"], t["h.v"]).float()}
    for t_q, t_k in ((5, 5), (3, 5), (1, 6), (4, 9)):
        refs[f"causal_mask/{t_q}x{t_k}"] = _mask(t_q, t_k)
    for h_kv in (2, 1, 8):
        for causal in (False, True):
            refs[f"gqa/{h_kv}/{causal}"] = _sdpa(t["f.q"], t[f"f.k{h_kv}"], t[f"f.v{h_kv}"], causal=causal).float()
    return refs


def _judge_gqa(inputs, outputs, errors):
    why = _judge(("gqa/1", "gqa/2", "gqa/8"), _refs_01)(inputs, outputs, errors)
    if why:
        return why
    err = errors.get("gqa/bad")
    if err is None or err[0] != "ValueError" or not ("6" in err[1] and "4" in err[1]):
        return "gqa/bad: 6 query heads with 4 K/V heads must raise ValueError naming 6 and 4, got " + (
            "no error" if err is None else f"{err[0]}: {err[1]}"[:200])
    return None


# ---- assignment 02: estimators, on configurations drawn per submission --------------------------------------
_ESTIMATOR_FILES = tuple(f"kit:estimators/{f}" for f in ("__init__.py", "params.py", "flops.py", "memory.py",
                                                         "scaling.py", "flop_counter.py", "measure.py", "report.py",
                                                         "roofline.py", "attention_path.py", "moe.py"))


def _random_config(g: torch.Generator, i: int) -> dict:
    def pick(*options):
        return options[int(torch.randint(len(options), (), generator=g))]
    kv = pick(1, 2, 4)
    return {"hidden_size": pick(64, 96, 256, 4096), "num_layers": pick(1, 3, 32), "num_heads": kv * pick(1, 2, 8),
            "num_kv_heads": kv, "head_dim": pick(16, 24, 128), "intermediate_size": pick(200, 1000, 11008),
            "vocab_size": pick(1000, 32000, 128256), "tie_word_embeddings": bool(i % 2), "name": f"drawn {i}"}


def _config(spec: dict):
    from ..configs import ModelConfig
    return ModelConfig(**spec)


def _calls_02(g: torch.Generator):
    configs = [_random_config(g, i) for i in range(4)]
    calls = []
    for i, cfg in enumerate(configs):
        calls.append(Call(f"params/{i}", "param_count", [{"config": cfg}]))
        batch, seq = int(torch.randint(1, 5, (), generator=g)), int(torch.randint(1, 700, (), generator=g))
        calls.append(Call(f"flops/{i}", "forward_flops", [{"config": cfg}, batch, seq]))
        for width in (2, 4):
            calls.append(Call(f"kv/{i}/{width}", "kv_bytes_per_token", [{"config": cfg}, width]))
    for i in range(4):
        flops = float(10 ** (18 + 7 * torch.rand((), generator=g, dtype=torch.float64).item()))
        calls.append(Call(f"optimal/{i}", "compute_optimal", [flops]))
    return calls, {"drawn": torch.zeros(1)}


def _calls_by_prefix(spec_calls, prefix):
    return [c for c in spec_calls if c.id.startswith(prefix)]


def _judge_02(prefix):
    def judge(t, outputs, errors):
        from .. import estimators as kit

        for call in _calls_by_prefix(t["__calls__"], prefix):
            if _err(errors, call.id):
                return _err(errors, call.id)
            got = outputs.get(call.id)
            if not isinstance(got, torch.Tensor) or got.numel() != (2 if prefix == "optimal" else 1):
                return f"{call.id}: {call.fn} must return " + ("(N, D)" if prefix == "optimal" else "a number")
            if prefix == "optimal":
                flops = call.args[0]
                n, d = got.double().tolist()
                want = kit.compute_optimal(flops).params
                if not (abs(n - want) <= 1e-3 * want and abs(6 * n * d - flops) <= 1e-6 * flops):
                    return f"compute_optimal({flops:.3g}): N = {n:.4g}, D = {d:.4g}; the optimum has N = {want:.4g}, 6 N D = C"
                continue
            cfg = _config(call.args[0]["config"])
            if prefix == "params":
                want = kit.param_count(cfg)
            elif prefix == "flops":
                want = kit.total_flops(kit.forward_flops_table(cfg, call.args[1], call.args[2]), cfg, matmul_only=True)
            else:
                want = kit.kv_bytes_per_token(cfg, {2: "fp16", 4: "fp32"}[call.args[1]])
            value = got.double().item()
            if value != want:
                shown = {k: v for k, v in call.args[0]["config"].items() if k != "name"}
                return f"{call.fn}({shown}{''.join(f', {a}' for a in call.args[1:])}) = {value:,.0f}, expected {want:,}"
        return None
    return judge


# ---- assignment 07: the fused add + RMSNorm kernel and the split-KV merge --------------------------------
def _norm_ref(x, r, w, eps):
    """add_rmsnorm_reference, computed here: the new residual in the inputs' dtype, statistics in fp32."""
    h = x + r
    h32 = h.float()
    return w * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype), h


def _split_ref(q, k, v, num_splits):
    """split_attention of the assignment, in float64: (part, lse) of each range of keys."""
    B, H, T, D = k.shape
    n = -(-T // num_splits)
    part = torch.zeros(B, H, num_splits, D, dtype=torch.float64)
    lse = torch.full((B, H, num_splits), float("-inf"), dtype=torch.float64)
    for s in range(num_splits):
        lo, hi = s * n, min((s + 1) * n, T)
        if lo < hi:
            scores = torch.einsum("bhd,bhtd->bht", q.double(), k[:, :, lo:hi].double()) / math.sqrt(D)
            lse[:, :, s] = torch.logsumexp(scores, dim=-1)
            part[:, :, s] = torch.einsum("bht,bhtd->bhd", torch.softmax(scores, dim=-1), v[:, :, lo:hi].double())
    return part.float(), lse.float()


def _merge_ref(part, lse):
    m = lse.double().amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    w = torch.exp(lse.double() - m)
    return ((w[..., None] * part.double()).sum(-2) / w.sum(-1, keepdim=True).clamp_min(1e-300)).float()


_NORM_CASES = {   # id -> (rows, hidden, dtype, eps, test)
    "a": (8, 64, torch.float32, 1e-6, "test_fused_norm"), "b": (8, 64, torch.float16, 1e-6, "test_fused_norm"),
    "c": (3, 128, torch.float32, 1e-5, "test_fused_norm"),
    "d": (5, 100, torch.float32, 1e-6, "test_fused_norm_ragged"), "e": (3, 1, torch.float32, 1e-6, "test_fused_norm_ragged"),
    "f": (2, 1000, torch.float32, 1e-6, "test_fused_norm_ragged"), "g": (1, 777, torch.float32, 1e-6, "test_fused_norm_ragged"),
    "h": (6, 3, torch.float32, 1e-6, "test_fused_norm_ragged"), "z1": (4, 48, torch.float32, 1e-6, "test_fused_norm_ragged"),
    "z2": (4, 48, torch.float32, 0.5, "test_fused_norm_ragged")}
_NORM_TOL = {torch.float32: 1e-4, torch.float16: 2e-3}   # a GPU's rsqrt and sum order differ in the last bits


def _calls_07(g: torch.Generator):
    t: dict[str, torch.Tensor] = {}
    calls = []
    for cid, (rows, hidden, dtype, eps, _) in _NORM_CASES.items():
        x, r = torch.randn(rows, hidden, generator=g) * 2, torch.randn(rows, hidden, generator=g)
        w = 1 + 0.5 * torch.randn(hidden, generator=g)
        if cid.startswith("z"):                            # small values and a row of zeros: 0, not NaN
            x, r = x * 0.05, r * 0.1
            x[1], r[1] = 0.0, 0.0
        t[f"n{cid}.x"], t[f"n{cid}.r"], t[f"n{cid}.w"] = x.to(dtype), r.to(dtype), w.to(dtype)
        calls.append(Call(f"norm/{cid}", "add_rmsnorm_kernel", [f"n{cid}.x", f"n{cid}.r", f"n{cid}.w", eps],
                          via="add_rmsnorm"))
    merges = {}
    for i, (B, H, T, D, S, scale) in enumerate(((2, 4, 50, 32, 1, 1), (2, 4, 50, 32, 2, 1), (2, 4, 50, 32, 4, 1),
                                                (2, 4, 50, 32, 7, 1), (3, 2, 333, 64, 3, 4), (3, 2, 333, 64, 16, 4))):
        q, k, v = (torch.randn(B, H, D, generator=g) * scale, torch.randn(B, H, T, D, generator=g) * scale,
                   torch.randn(B, H, T, D, generator=g))
        merges[f"split/{i}"] = _split_ref(q, k, v, S)
    q, k, v = torch.randn(2, 2, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g)
    merges["edge/empty_ranges"] = _split_ref(q, k, v, 5)                  # 3 keys in 5 ranges: two are empty
    merges["edge/no_context"] = (torch.zeros(1, 2, 4, 8), torch.full((1, 2, 4), float("-inf")))
    big = 700 + 100 * torch.rand((), generator=g).item()                   # e^lse overflows fp32
    merges["edge/overflow"] = (torch.randn(1, 1, 3, 8, generator=g), torch.tensor([[[big, big - 1, float("-inf")]]]))
    merges["edge/far_apart"] = (torch.randn(2, 1, 2, 8, generator=g), torch.tensor([[[300.0, 299.0]], [[10.0, 9.0]]]))
    part, lse = torch.randn(4, 3, 6, 16, generator=g), torch.randn(4, 3, 6, generator=g) * 50
    lse[0, 0, :5] = float("-inf")
    lse[1, 2] = float("-inf")
    part[1, 2] = 0.0
    merges["edge/random"] = (part, lse)
    for cid, (part, lse) in merges.items():
        t[f"{cid}.part"], t[f"{cid}.lse"] = part.contiguous(), lse.contiguous()
        calls.append(Call(f"merge/{cid}", "merge_splits", [f"{cid}.part", f"{cid}.lse"]))
    return calls, t


def _judge_norm(test):
    def judge(t, outputs, errors):
        for cid, (rows, hidden, dtype, eps, which) in _NORM_CASES.items():
            if which != test:
                continue
            call = f"norm/{cid}"
            if _err(errors, call):
                return _err(errors, call)
            want_normed, want_h = _norm_ref(t[f"n{cid}.x"], t[f"n{cid}.r"], t[f"n{cid}.w"], eps)
            for name, got, want, tol in (("new_residual", outputs.get(f"{call}#1"), want_h, 0.0),
                                         ("normed", outputs.get(f"{call}#0"), want_normed, _NORM_TOL[dtype])):
                why = _close(got, want, tol, tol)
                if why:
                    return f"{call} ({rows}, {hidden}) {str(dtype)[6:]}, eps={eps:g}: {name}: {why}"
        return None
    return judge


def _judge_merge(prefix, tol):
    def judge(t, outputs, errors):
        for key in sorted(k for k in t if k.startswith(prefix) and k.endswith(".part")):
            cid = key[:-len(".part")]
            call = f"merge/{cid}"
            if _err(errors, call):
                return _err(errors, call)
            why = _close(outputs.get(call), _merge_ref(t[key], t[f"{cid}.lse"]), *tol(cid))
            if why:
                return f"{call}: {why}"
        return None
    return judge


# ---- assignment 08: shards judged here; the ring and the TP MLP run on gloo ranks inside the sandbox -------
_SHARD_CASES = {"cols": ("shard_columns", (12, 5), (2, 3, 4, 6)), "rows": ("shard_rows", (5, 12), (2, 3, 4, 6))}
_RING_CASES = {2: (6, 1200), 3: (6, 1200, 1, 7, 100)}
_TP_CASES = {2: (2, 8, 32), 4: (1, 12, 48)}   # world -> (batch, hidden, ffn); 5 positions per sequence


_DDP_CASES = {"2/each": (2, 1), "2/one": (2, 1 << 30), "3/two": (3, 900)}   # case -> (world, bucket bytes)
_DDP_SHAPES = {"emb": (16, 8), "up": (12, 8), "down": (8, 12), "gain": (8,)}  # float64: 1024, 768 frozen, 768, 64 bytes


def _ddp_buckets(bucket_bytes: int) -> int:
    """How many buckets the trainable parameters (gain, down, emb, in reverse order) make at this size."""
    buckets, size = 0, None
    for name in ("gain", "down", "emb"):
        n = math.prod(_DDP_SHAPES[name]) * 8
        if size is None or size + n > bucket_bytes:
            buckets, size = buckets + 1, n
        else:
            size += n
    return buckets


def _calls_08(g: torch.Generator):
    t: dict[str, torch.Tensor] = {}
    calls = []
    for name, shape in _DDP_SHAPES.items():
        t[f"ddp.{name}"] = torch.randn(*shape, generator=g, dtype=torch.float64) * (0.5 if name != "gain" else 0.1) + (
            1.0 if name == "gain" else 0.0)
    for case, (world, bucket_bytes) in _DDP_CASES.items():
        for b in ("ids", "ids2"):                       # two training steps' batches
            t[f"ddp{case}.{b}"] = torch.randint(0, _DDP_SHAPES["emb"][0], (2 * world, 7), generator=g)
        calls.append(Call(f"ddp/{case}", "register_ddp_hooks",
                          [world, bucket_bytes, f"ddp{case}.ids", f"ddp{case}.ids2"] + [f"ddp.{n}" for n in _DDP_SHAPES],
                          via="ddp_ranks"))
    for key, (fn, shape, worlds) in _SHARD_CASES.items():
        t[f"s.{key}"] = torch.randn(*shape, generator=g)
        for world in worlds:
            for rank in range(world):
                calls.append(Call(f"shard/{key}/{world}/{rank}", fn, [f"s.{key}", rank, world]))
        calls.append(Call(f"shard/{key}/bad", fn, [f"s.{key}", 0, 5]))
    for world, sizes in _RING_CASES.items():
        names = []
        for i, n in enumerate(sizes):
            for rank in range(world):
                t[f"ring{world}.{i}.{rank}"] = torch.randn(n, generator=g, dtype=torch.float64)
                names.append(f"ring{world}.{i}.{rank}")
        calls.append(Call(f"ring/{world}", "ring_all_reduce", [world, list(sizes), {"tuple": names}], via="ring_ranks"))
    for world, (batch, hidden, ffn) in _TP_CASES.items():
        t[f"tp{world}.x"], t[f"tp{world}.r"] = torch.randn(batch, 5, hidden, generator=g), torch.randn(batch, 5, hidden, generator=g)
        t[f"tp{world}.w1"] = torch.randn(ffn, hidden, generator=g) / hidden ** 0.5
        t[f"tp{world}.w2"] = torch.randn(hidden, ffn, generator=g) / ffn ** 0.5
        calls.append(Call(f"tp/{world}", "tp_mlp", [world] + [f"tp{world}.{x}" for x in ("x", "r", "w1", "w2")],
                          via="tp_ranks"))
    return calls, t


def _judge_shards(t, outputs, errors):
    for key, (fn, shape, worlds) in _SHARD_CASES.items():
        w, dim = t[f"s.{key}"], 0 if key == "cols" else 1
        for world in worlds:
            for rank, want in enumerate(w.tensor_split(world, dim=dim)):
                cid = f"shard/{key}/{world}/{rank}"
                if _err(errors, cid):
                    return _err(errors, cid) if shape[dim] % world == 0 else None
                if shape[dim] % world:
                    return f"{fn}(w of shape {shape}, {rank}, {world}): {shape[dim]} does not split into {world}: ValueError expected"
                why = _close(outputs.get(cid), want, 0.0, 0.0)
                if why:
                    return f"{fn}(w of shape {shape}, rank={rank}, world={world}): {why}"
        err = errors.get(f"shard/{key}/bad")
        if err is None or err[0] != "ValueError" or "5" not in err[1]:
            return f"{fn}(w of shape {shape}, 0, 5) must raise ValueError naming 5, got " + (
                "no error" if err is None else f"{err[0]}: {err[1]}"[:200])
    return None


def _judge_ring(t, outputs, errors):
    for world, sizes in _RING_CASES.items():
        cid = f"ring/{world}"
        if _err(errors, cid):
            return _err(errors, cid)
        flat, pos = outputs.get(cid), 0
        if not isinstance(flat, torch.Tensor) or flat.numel() != world * sum(2 * n + 2 for n in sizes):
            return f"{cid}: the ranks returned no result or one of the wrong size"
        flat = flat.double()
        for rank in range(world):
            for i, n in enumerate(sizes):
                y, x, (sent, collectives) = flat[pos:pos + n], flat[pos + n:pos + 2 * n], flat[pos + 2 * n:pos + 2 * n + 2].tolist()
                pos += 2 * n + 2
                want = sum(t[f"ring{world}.{i}.{r}"] for r in range(world))
                where = f"{world} ranks, rank {rank}, {n} values"
                if collectives:
                    return f"{where}: called {int(collectives)} collective(s); the ring uses point-to-point messages only"
                if (y - want).abs().max().item() > 1e-12:
                    return f"{where}: the result differs from the sum over ranks by {(y - want).abs().max().item():.3g}"
                if (x - want).abs().max().item() > 1e-12:
                    return f"{where}: the returned tensor is right but t itself was not summed in place"
                ring = 2 * (world - 1) / world * n * 8
                if abs(sent - ring) > (0 if n % world == 0 else 4 * 8):
                    return f"{where}: sent {int(sent)} bytes, a ring sends 2(N-1)/N x {n * 8} = {ring:.0f}"
    return None


def _tp_ref(x, r, w1, w2):
    x, w1, w2 = (a.double().requires_grad_() for a in (x, w1, w2))
    y = torch.nn.functional.gelu(x @ w1.T) @ w2.T
    (y * r.double()).sum().backward()
    return y.detach(), x.grad, w1.grad, w2.grad


def _judge_tp(t, outputs, errors):
    for world, (batch, hidden, ffn) in _TP_CASES.items():
        cid = f"tp/{world}"
        if _err(errors, cid):
            return _err(errors, cid)
        y, gx, g1, g2 = _tp_ref(*(t[f"tp{world}.{k}"] for k in ("x", "r", "w1", "w2")))
        n = ffn // world
        wants = []
        for rank in range(world):
            wants += [("output", y), ("input gradient", gx), ("W1 shard gradient", g1[rank * n:(rank + 1) * n]),
                      ("W2 shard gradient", g2[:, rank * n:(rank + 1) * n])]
        flat = outputs.get(cid)
        if not isinstance(flat, torch.Tensor) or flat.numel() != sum(w.numel() for _, w in wants):
            return f"{cid}: the ranks returned no result or one of the wrong size"
        pos = 0
        for i, (what, want) in enumerate(wants):
            got = flat[pos:pos + want.numel()].reshape(want.shape)
            pos += want.numel()
            why = _close(got.double(), want, 1e-5, 1e-4)
            if why:
                return f"{world} ranks, rank {i // 4}: {what} of tp_mlp vs the unsharded MLP: {why}"
    return None


def _ddp_reference(t, case):
    """Per pass, the one-process gradients of the whole batch: [(name, gradient), ...] for emb, down, gain."""
    from .probe import DDPNet

    wants = []
    for b in ("ids", "ids2"):
        ref = DDPNet(*(t[f"ddp.{n}"] for n in _DDP_SHAPES))
        ref.loss(t[f"ddp{case}.{b}"]).backward()
        wants.append([("emb (tied to the LM head)", ref.emb.grad), ("down", ref.down.grad), ("gain", ref.gain.grad)])
    return wants


def _judge_ddp(t, outputs, errors):
    for case, (world, bucket_bytes) in _DDP_CASES.items():
        cid = f"ddp/{case}"
        if _err(errors, cid):
            return _err(errors, cid)
        wants = _ddp_reference(t, case)
        size = sum(w.numel() for _, w in wants[0])
        per_rank = 2 * size + 3
        flat = outputs.get(cid)
        if not isinstance(flat, torch.Tensor) or flat.numel() != world * per_rank:
            return f"{cid}: the ranks returned no result or one of the wrong size"
        buckets = _ddp_buckets(bucket_bytes)
        where = f"{world} ranks, bucket_bytes={bucket_bytes}"
        for rank in range(world):
            part = flat[rank * per_rank:(rank + 1) * per_rank].double()
            frozen, *collectives = part[2 * size:].tolist()
            if frozen:
                return f"{where}: the frozen weight (requires_grad=False) got a gradient"
            for i, step in enumerate(("first", "second")):
                pos = i * size
                for name, want in wants[i]:
                    got = part[pos:pos + want.numel()].reshape(want.shape)
                    pos += want.numel()
                    why = _close(got, want.double(), 1e-9, 1e-7)
                    if why:
                        if _close(got, world * want.double(), 1e-9, 1e-7) is None:
                            hint = "the sum over ranks arrived, not divided by the world size"
                        elif i == 1:
                            hint = "after a right first pass: is each bucket's ready count reset for the next pass?"
                        else:
                            hint = "all-reduce each bucket once its gradients are ready and copy it back into p.grad"
                        return (f"{where}, rank {rank}, {step} backward pass: the gradient of {name} is not the "
                                f"one-process gradient of the whole batch ({why}): {hint}")
                if collectives[i] != buckets:
                    return (f"{where}, rank {rank}, {step} backward pass: {int(collectives[i])} collective call(s); "
                            f"{buckets} bucket(s) of trainable parameters need exactly {buckets} all-reduce(s)")
    return None


# ---- assignment 10: speculative decoding (verify_step) --------------------------------------------------
_GREEDY = [([1, 2, 3], [1, 2, 3, 4]), ([1, 2, 3], [1, 0, 3, 4]), ([4], [2, 2]), ([0, 0, 0, 0], [0, 0, 0, 0, 1]),
           ([2, 2, 1], [2, 3, 1, 0]), ([3], [3, 1])]
_SAMPLES = 3000


def _calls_10(g: torch.Generator):
    t: dict[str, torch.Tensor] = {}
    calls = []
    eye = torch.eye(5)
    for j, (draft, target) in enumerate(_GREEDY):
        t[f"g{j}.q"], t[f"g{j}.p"] = eye[draft], eye[target]
        calls.append(Call(f"greedy/{j}", "verify_step", [draft, f"g{j}.q", f"g{j}.p"]))
    gamma, V = 3, 5
    p = torch.softmax(torch.randn(gamma + 1, V, generator=g, dtype=torch.float64) * 2, -1).float()
    q = torch.softmax(torch.randn(gamma, V, generator=g, dtype=torch.float64) * 2, -1).float()
    p2, q2 = p.clone(), q.clone()
    p2[:, 0], q2[:, 1] = 0, 0
    p2, q2 = p2 / p2.sum(-1, keepdim=True), q2 / q2.sum(-1, keepdim=True)
    for name, (pp, qq) in {"plain": (p, q), "topk": (p2, q2)}.items():
        t[f"{name}.p"], t[f"{name}.q"] = pp, qq
        t[f"{name}.drafts"] = torch.stack([torch.multinomial(qq[i], _SAMPLES, replacement=True, generator=g)
                                           for i in range(gamma)], 1)
        calls.append(Call(f"dist/{name}", "verify_step", [{"repeat": f"{name}.drafts"}, f"{name}.q", f"{name}.p",
                                                          {"generator": int(torch.randint(0, 2**62, (), generator=g))}]))
    for j, (length, keep) in enumerate(((9, 5), (9, 9), (6, 0), (12, 7))):
        k = torch.zeros(2, 1, 2, 16, 8)
        v = torch.zeros(2, 1, 2, 16, 8)
        k[:, :, :, :length] = torch.randn(2, 1, 2, length, 8, generator=g)
        v[:, :, :, :length] = torch.randn(2, 1, 2, length, 8, generator=g)
        t[f"rb{j}.k"], t[f"rb{j}.v"] = k, v
        calls.append(Call(f"rollback/{j}", "rollback", [{"kvcache": {"k": f"rb{j}.k", "v": f"rb{j}.v",
                                                                     "lengths": [length, length]}}, keep]))
    calls.append(Call("rollback/bad", "rollback", [{"kvcache": {"k": "rb0.k", "v": "rb0.v", "lengths": [9, 9]}}, 10]))
    for j, (ids, gamma) in enumerate(_loop_prompts()):
        calls.append(Call(f"loop/{j}", "speculative_greedy", [{"counted": "model"}, {"ns": "drafter"}, ids, 20, gamma]))
    return calls, t


_PROMPTS = (("KING.\nMy lords,", 1), ("ROMEO.\n", 3), ("HAMLET.\nWhat is", 5), ("JULIET.\nO", 4))
_TINY: dict = {}
_TINY_LOCK = threading.Lock()           # `grade` runs several submissions in threads; load (and import) once


def _tiny():
    with _TINY_LOCK:
        if not _TINY:
            from ..model import load_tiny

            _TINY["model"], _TINY["tok"] = load_tiny()
    return _TINY["model"], _TINY["tok"]


def _loop_prompts():
    _, tok = _tiny()
    return [(tok(text).input_ids, gamma) for text, gamma in _PROMPTS]


def _judge_rollback(t, outputs, errors):
    for j, (length, keep) in enumerate(((9, 5), (9, 9), (6, 0), (12, 7))):
        cid = f"rollback/{j}"
        if _err(errors, cid):
            return _err(errors, cid)
        for part in ("k", "v"):
            want = t[f"rb{j}.{part}"].clone()
            want[:, :, :, keep:] = 0
            got = outputs.get(f"{cid}#{part}")
            if got is None or not torch.equal(got, want):
                return (f"{cid}: after rolling a cache of {length} tokens back to {keep}, its {part} must equal a cache "
                        f"that holds the first {keep} tokens only (the rest zero)")
        lengths = outputs.get(f"{cid}#lengths")
        if lengths is None or lengths.tolist() != [keep, keep]:
            return f"{cid}: the cache's lengths must be [{keep}, {keep}], got {None if lengths is None else lengths.tolist()}"
    return _expect_value_error(errors, "rollback/bad", "rolling back to more tokens than the cache holds")


def _judge_loop(inputs, outputs, errors):
    from ..generate import generate

    model, _ = _tiny()
    for j, (ids, gamma) in enumerate(_loop_prompts()):
        cid = f"loop/{j}"
        if _err(errors, cid):
            return _err(errors, cid)
        with torch.no_grad():
            want = generate(model, [ids], max_new_tokens=20, eos_token_id=None).new_tokens[0]
        got = outputs.get(cid)
        if got is None or got.tolist() != list(want):
            return f"{cid} (gamma {gamma}): got {None if got is None else got.tolist()}, expected the target's greedy " \
                   f"tokens {list(want)}"
        calls = outputs.get(f"{cid}@calls")
        if gamma >= 3 and (calls is None or int(calls) >= 20):
            return (f"{cid} (gamma {gamma}): the target model ran {None if calls is None else int(calls)} forward "
                    "passes for 20 tokens: speculative decoding verifies several drafted tokens per target pass")
    return None


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts, probs = counts.double(), probs.double()
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    return float(torch.special.gammaincc(torch.tensor((int(keep.sum()) - 1) / 2, dtype=torch.double), stat / 2))


def _pair(value) -> tuple[int, int] | None:
    if isinstance(value, torch.Tensor) and value.dtype == torch.int64 and tuple(value.shape) == (2,):
        return int(value[0]), int(value[1])
    return None


def _judge_greedy(inputs, outputs, errors):
    for j, (draft, target) in enumerate(_GREEDY):
        cid = f"greedy/{j}"
        if cid in errors:
            return f"{cid}: raised {errors[cid][0]}: {errors[cid][1]}"[:300]
        n = next((i for i, (a, b) in enumerate(zip(draft, target)) if a != b), len(draft))
        got = _pair(outputs.get(cid))
        if got != (n, target[n]):
            return f"draft {draft}, target argmax {target}: expected (accepted, next) = {(n, target[n])}, got {got}"
    return None


def _judge_distribution(inputs, outputs, errors):
    for name in ("plain", "topk"):
        cid = f"dist/{name}"
        if cid in errors:
            return f"{cid}: raised {errors[cid][0]}: {errors[cid][1]}"[:300]
        out = outputs.get(cid)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (_SAMPLES, 2) or out.dtype != torch.int64:
            return f"{cid}: no (accepted, next) pair per draft came back"
        p = inputs[f"{name}.p"]
        drafts = inputs[f"{name}.drafts"]
        first = torch.where(out[:, 0] > 0, drafts[:, 0], out[:, 1])
        counts = torch.bincount(first.clamp(0, p.shape[1] - 1), minlength=p.shape[1])
        if ((first < 0) | (first >= p.shape[1])).any():
            return f"{cid}: a token outside the vocabulary"
        pv = _chi_square_p(counts, p[0])
        if pv < 1e-6 or (name == "topk" and counts[0] > 0):     # fresh inputs per submission: a strict level
            return f"{cid}: the first emitted token does not follow p (chi-square p-value {pv:.2e}, counts {counts.tolist()})"
    return None


# ---- assignment 09: mixture of experts -----------------------------------------------------------------
_ROUTER_CASES = ((8, 2, True), (8, 2, False), (6, 3, True), (16, 4, False), (5, 1, True), (5, 5, False))


def _swiglu_ref(x, gate_w, up_w, down_w, e):
    x = x.double()
    h = torch.nn.functional.silu(x @ gate_w[e].double().T) * (x @ up_w[e].double().T)
    return h @ down_w[e].double().T


def _route_ref(x, w, k, norm):
    logits = x.double() @ w.double().T
    probs = torch.softmax(logits, dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)
    if norm:
        weights = weights / weights.sum(-1, keepdim=True)
    return logits, probs, weights, experts


def _moe_ref(x, router_w, gate_w, up_w, down_w, k, norm=True):
    flat = x.reshape(-1, x.shape[-1])
    _, _, weights, experts = _route_ref(flat, router_w, k, norm)
    return _combine_ref(flat, weights, experts, gate_w, up_w, down_w).reshape(x.shape)


def _combine_ref(x, weights, experts, gate_w, up_w, down_w):
    y = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(experts.shape[1]):
            y[n] += weights[n, j].double() * _swiglu_ref(x[n:n + 1], gate_w, up_w, down_w, int(experts[n, j]))[0]
    return y


def _lb_ref(logits_list, k):
    logits = torch.cat([t.reshape(-1, t.shape[-1]) for t in logits_list]).double()
    probs = torch.softmax(logits, -1)
    chosen = torch.topk(probs, k, -1).indices
    f = torch.nn.functional.one_hot(chosen, logits.shape[-1]).sum(1).double().mean(0)
    return logits.shape[-1] * (f * probs.mean(0)).sum()


def _calls_09(g: torch.Generator):
    t: dict[str, torch.Tensor] = {}
    calls = []
    for i, (E, k, norm) in enumerate(_ROUTER_CASES):
        t[f"r{i}.x"], t[f"r{i}.w"] = torch.randn(37, 16, generator=g), torch.randn(E, 16, generator=g) * 0.5
        calls.append(Call(f"router/{i}", "router", [f"r{i}.x", f"r{i}.w", k, norm]))
    calls.append(Call("router/bad", "router", ["r0.x", "r0.w", 9, True]))
    for i, (N, E, k) in enumerate(((30, 8, 2), (7, 4, 4), (50, 16, 1))):
        experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
        experts[experts == 1] = 0 if k == 1 else experts[experts == 1]
        t[f"s{i}.experts"] = experts
        calls.append(Call(f"sort/{i}", "sort_assignments", [f"s{i}.experts", E]))
    t["s.bad"] = torch.tensor([[0, 9]])
    calls.append(Call("sort/bad", "sort_assignments", ["s.bad", 4]))
    E, h, inter = 8, 16, 24
    for name, shape in (("gate", (E, inter, h)), ("up", (E, inter, h)), ("down", (E, h, inter))):
        t[f"m.{name}"] = torch.randn(*shape, generator=g) * 0.2
    t["m.router"] = torch.randn(E, h, generator=g) * 0.5
    t["d.x"] = torch.randn(40, h, generator=g)
    _, _, w, ex = _route_ref(t["d.x"], t["m.router"], 2, True)
    ex[ex == 5] = 6
    t["d.weights"], t["d.experts"] = w.float(), ex
    calls.append(Call("dispatch/0", "dispatch_combine", ["d.x", "d.weights", "d.experts", "m.gate", "m.up", "m.down"]))
    for i, (shape, k) in enumerate((((3, 7, h), 2), ((2, 5, h), 1), ((1, 9, h), 3))):
        t[f"l{i}.x"] = torch.randn(*shape, generator=g)
        calls.append(Call(f"moe/{i}", "moe_layer", [f"l{i}.x", "m.router", "m.gate", "m.up", "m.down", k]))
    for i, (E, k, layers) in enumerate(((8, 2, 1), (8, 2, 3), (16, 4, 2))):
        names = []
        for j in range(layers):
            t[f"lb{i}.{j}"] = torch.randn(24, E, generator=g) * 2
            names.append(f"lb{i}.{j}")
        calls.append(Call(f"lb/{i}", "load_balancing_loss", [{"tuple": names}, k]))
    return calls, t


def _err(errors, cid):
    return f"{cid}: raised {errors[cid][0]}: {errors[cid][1]}"[:300] if cid in errors else None


def _expect_value_error(errors, cid, what):
    if errors.get(cid, [""])[0] != "ValueError":
        got = errors.get(cid)
        return f"{what} must raise ValueError, got " + ("no error" if got is None else f"{got[0]}: {got[1]}"[:200])
    return None


def _judge_router(cases):
    def judge(t, outputs, errors):
        for i in cases:
            cid = f"router/{i}"
            if _err(errors, cid):
                return _err(errors, cid)
            E, k, norm = _ROUTER_CASES[i]
            logits, probs, weights, experts = _route_ref(t[f"r{i}.x"], t[f"r{i}.w"], k, norm)
            got = [outputs.get(f"{cid}#{j}") for j in range(4)]
            if any(x is None for x in got):
                return f"{cid}: router must return (logits, probs, weights, experts)"
            if got[3].dtype != torch.int64 or not torch.equal(got[3], experts):
                return f"{cid} (E={E}, k={k}): chosen experts differ (largest probability first)"
            for name, a, b in (("logits", got[0], logits.float()), ("probs", got[1], probs.float()),
                               ("weights", got[2], weights.float())):
                why = _close(a, b, 1e-5, 1e-5)
                if why:
                    return f"{cid} (E={E}, k={k}, norm_topk_prob={norm}): {name}: {why}"
        return None
    return judge


def _judge_router_edge(t, outputs, errors):
    return _judge_router((4, 5))(t, outputs, errors) or _expect_value_error(errors, "router/bad", "top_k > E")


def _judge_sort(t, outputs, errors):
    for i in range(3):
        cid = f"sort/{i}"
        if _err(errors, cid):
            return _err(errors, cid)
        experts = t[f"s{i}.experts"]
        flat = experts.reshape(-1)
        slot = torch.argsort(flat, stable=True)
        want = (slot // experts.shape[1], slot, torch.bincount(flat, minlength=(8, 4, 16)[i]))
        got = [outputs.get(f"{cid}#{j}") for j in range(3)]
        for name, a, b in zip(("token", "slot", "counts"), got, want):
            if a is None or not torch.equal(a.long(), b):
                return f"{cid}: {name} differs from a stable sort by expert"
    return _expect_value_error(errors, "sort/bad", "an expert id >= num_experts")


def _judge_dispatch(t, outputs, errors):
    if _err(errors, "dispatch/0"):
        return _err(errors, "dispatch/0")
    ref = _combine_ref(t["d.x"], t["d.weights"], t["d.experts"], t["m.gate"], t["m.up"], t["m.down"]).float()
    why = _close(outputs.get("dispatch/0"), ref, 1e-5, 1e-4)
    return f"dispatch/0: {why}" if why else None


def _judge_moe(t, outputs, errors):
    for i, k in enumerate((2, 1, 3)):
        cid = f"moe/{i}"
        if _err(errors, cid):
            return _err(errors, cid)
        ref = _moe_ref(t[f"l{i}.x"], t["m.router"], t["m.gate"], t["m.up"], t["m.down"], k).float()
        why = _close(outputs.get(cid), ref, 1e-5, 1e-4)
        if why:
            return f"{cid} (k={k}): {why}"
    return None


def _judge_lb(t, outputs, errors):
    for i, (E, k, layers) in enumerate(((8, 2, 1), (8, 2, 3), (16, 4, 2))):
        cid = f"lb/{i}"
        if _err(errors, cid):
            return _err(errors, cid)
        ref = _lb_ref([t[f"lb{i}.{j}"] for j in range(layers)], k).float()
        out = outputs.get(cid)
        why = _close(out.reshape(()) if isinstance(out, torch.Tensor) and out.numel() == 1 else out, ref, 1e-5, 1e-5)
        if why:
            return f"{cid} (E={E}, k={k}, {layers} layers): {why}"
    return None


SPECS: dict[str, Spec] = {
    "02_estimators": Spec(
        hide=[], calls=_calls_02,
        forbid=_ESTIMATOR_FILES + ("torch:utils/flop_counter.py", "transformers:modeling_utils.py"),
        judge={"test_param_count": _judge_02("params"), "test_forward_flops": _judge_02("flops"),
               "test_kv_bytes": _judge_02("kv"), "test_compute_optimal": _judge_02("optimal")}),
    "01_attention": Spec(
        hide=["attention.py"],
        calls=_calls_01,
        judge={"test_attention": _judge(("attention/",), _refs_01),
               "test_causal_mask": _judge(("causal_mask/",), _refs_01),
               "test_causal_attention": _judge(("causal_attention/",), _refs_01),
               "test_gqa": _judge_gqa}),
    "07_performance": Spec(
        hide=[], calls=_calls_07,
        strip={"kernels/fused_norm.py": ("_fused_add_rmsnorm_kernel", "fused_add_rmsnorm", "fused_add_rmsnorm_reference"),
               "kernels/paged_attention.py": ("_merge_splits_kernel", "merge_splits_reference"),
               "flash.py": ("merge_stats",)},
        judge={"test_fused_norm": _judge_norm("test_fused_norm"),
               "test_fused_norm_ragged": _judge_norm("test_fused_norm_ragged"),
               # fp32 spacing at lse ~ 800 is 6e-5: every sound merge is exact to ~1e-4 there, not 1e-5
               "test_merge_splits": _judge_merge("split/", lambda cid: (1e-5, 1e-4 if cid >= "split/4" else 1e-5)),
               "test_merge_splits_edge": _judge_merge("edge/", lambda cid: (1e-4, 1e-4))}),
    "08_parallelism": Spec(
        hide=[], calls=_calls_08,
        strip={"parallel/ring.py": ("ring_all_reduce", "ring_reduce_scatter", "ring_all_gather")},
        judge={"test_ring_all_reduce": _judge_ring, "test_shards": _judge_shards, "test_tp_mlp": _judge_tp,
               "test_ddp_buckets": _judge_ddp}),
    "09_moe": Spec(
        hide=[], calls=_calls_09,
        forbid=("kit:moe.py", "kit:kernels/moe_grouped_gemm.py", "kit:deepseek/balancing.py",
                "transformers:models/mixtral/modeling_mixtral.py", "transformers:models/qwen2_moe/modeling_qwen2_moe.py",
                "transformers:integrations/moe.py", "transformers:integrations/sonicmoe.py"),
        judge={"test_router": _judge_router((0, 1, 2, 3)), "test_router_edge_cases": _judge_router_edge,
               "test_sort": _judge_sort, "test_dispatch": _judge_dispatch, "test_mixtral_block": _judge_moe,
               "test_load_balancing_loss": _judge_lb}),
    "10_speculative_decoding": Spec(
        hide=[], strip={"speculative.py": ("verify", "speculative_generate")},
        calls=_calls_10,
        judge={"test_verify_greedy": _judge_greedy, "test_verify_distribution": _judge_distribution,
               "test_rollback": _judge_rollback, "test_loop_greedy": _judge_loop}),
}


def _register_judges() -> None:
    """More assignments' specs: each module of ``grading/judges/`` defines ``ASSIGNMENT`` (the folder name) and
    ``SPEC``. Like this file they hold references, so the sandbox hides them; what must run inside the sandbox
    (a driver the probe calls, ``Call.via = "llmsys_lab.grading.drivers.<module>:<function>"``) lives in
    ``grading/drivers/``."""
    import importlib
    import pkgutil

    from . import judges

    for info in pkgutil.iter_modules(judges.__path__):
        module = importlib.import_module(f"{judges.__name__}.{info.name}")
        if module.ASSIGNMENT in SPECS:
            raise RuntimeError(f"two harness specs for {module.ASSIGNMENT}")
        SPECS[module.ASSIGNMENT] = module.SPEC


_register_judges()


def stripped_modules(spec: Spec, folder: Path) -> dict[str, str]:
    """{kit file: a copy written into folder in which the spec's functions only raise}: what the sandbox sees."""
    import ast

    package = Path(__file__).resolve().parents[1]
    out = {}
    for rel, names in spec.strip.items():
        source = (package / rel).read_text()
        dotted = rel[:-3].replace("/", ".")
        tree = ast.parse(source)
        lines = source.split("\n")
        found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
        missing = set(names) - {n.name for n in found}
        if missing:   # a renamed kit function would otherwise stay callable in the sandbox
            raise RuntimeError(f"the harness strips {sorted(missing)} from llmsys_lab/{rel}, which defines no such "
                               "top-level function: update harness.SPECS")
        for node in sorted(found, key=lambda n: -n.lineno):
            first = node.body[0].lineno - 1
            if isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None), ast.Constant):
                first = node.body[0].end_lineno           # keep the docstring
            indent = " " * node.body[0].col_offset
            lines[first:node.end_lineno] = [f"{indent}raise RuntimeError('llmsys_lab.{dotted}.{node.name} is "
                                            "not available while this assignment is graded: write your own')"]
        copy = folder / f"stripped_{Path(rel).stem}.py"
        copy.write_text("\n".join(lines))
        out[str(package / rel)] = str(copy)
    return out


def spec_for(source_path: str | None) -> Spec | None:
    """The harness of the assignment whose source notebook is source_path (its folder's name)."""
    return None if source_path is None else SPECS.get(Path(source_path).parent.name)


def hidden_files(spec: Spec | None) -> list[str]:
    """What the sandbox hides: the kit files the spec forbids, and always this harness itself (its references
    are complete answers: ``_sdpa`` is assignment 01's attention)."""
    package = Path(__file__).resolve().parents[1]
    own = [str(Path(__file__).resolve()), str(Path(__file__).resolve().parent / "judges")]
    return own + ([str(package / rel) for rel in spec.hide] if spec is not None else [])


# ---- the job folder ---------------------------------------------------------------------------------
def write_inputs(spec: Spec, work: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(secrets.randbits(63))
    calls, tensors = spec.calls(g)
    for call in calls:
        call.forbid = list(spec.forbid)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / "probe_in.safetensors"))
    (work / "probe_calls.json").write_text(json.dumps([c.__dict__ for c in calls]))
    return {**tensors, "__calls__": calls}          # the judges see the calls too (their JSON arguments)


def read_outputs(work: Path, limit: int = 256 << 20) -> tuple[dict, dict] | None:
    """What the probe returned: tensors (safetensors) and errors (JSON); None if absent or malformed."""
    import os

    from safetensors.torch import load

    try:
        parts = []
        for name in ("probe_out.safetensors", "probe_errors.json"):
            fd = os.open(work / name, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                return None
            parts.append(data)
        outputs = load(parts[0])
        errors = json.loads(parts[1])
        if not isinstance(errors, dict) or not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str)
                                                                                                for x in v)
                                                   for v in errors.values()):
            return None
        return outputs, errors
    except Exception:  # noqa: BLE001  (absent or malformed: the harness scores 0)
        return None


def decide(spec: Spec, inputs: dict, returned: tuple[dict, dict] | None) -> dict[str, str | None]:
    """test id -> None (accepted) or why not."""
    if returned is None:
        return {tid: "the harness got no outputs back from the notebook (did it run to its end?)"
                for tid in spec.judge}
    outputs, errors = returned
    return {tid: judge(inputs, outputs, errors) for tid, judge in spec.judge.items()}
