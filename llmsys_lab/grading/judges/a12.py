"""Assignment 12 (DeepSeek-V3's latent cache and absorbed decode): LatentCache driven through updates of fresh
chunks in a drawn layer order, absorbed_attention on fresh shapes (decode calls also measured: no operation may
make a tensor as large as the per-head keys or values of all cached tokens), mla_step on fresh MLA layers and
prompts; all compared here with float64 computations. The kit's absorbed_attention is stripped in the sandbox and
the drivers (llmsys_lab.grading.drivers.a12) refuse the rest of the kit's MLA reference code."""
from __future__ import annotations

import torch

from ..harness import Call, Spec, _close, _err

ASSIGNMENT = "12_deepseek_v3"
DRIVERS = "llmsys_lab.grading.drivers.a12"


def _pick(g, *options):
    return options[int(torch.randint(len(options), (), generator=g))]


def _calls(g: torch.Generator):
    t: dict[str, torch.Tensor] = {}
    calls = []
    for c in range(2):                                          # the cache
        b, dc, dr, layers = _pick(g, 1, 2, 3), _pick(g, 5, 16, 24), _pick(g, 2, 4, 8), _pick(g, 1, 3)
        ops, chunks = [], 0
        for _ in range(3):                                      # three steps, every layer once, in a drawn order
            n = int(torch.randint(1, 6, (), generator=g))
            for layer in torch.randperm(layers, generator=g).tolist():
                t[f"c{c}.{chunks}.l"] = torch.randn(b, n, dc, generator=g)
                t[f"c{c}.{chunks}.r"] = torch.randn(b, n, dr, generator=g)
                ops.append([layer, chunks])
                chunks += 1
        calls.append(Call(f"cache/{c}", "LatentCache", [layers, ops] + [f"c{c}.{i}.{x}" for i in range(chunks)
                                                                         for x in "lr"],
                          via=f"{DRIVERS}:drive_cache"))
    cases = [  # (b, h, s, t, d_h, d_r, d_c, d_v, measured): decode cases with d_c < d_h, d_v so that per-head K or V
        (2, 5, 1, 23, 10, 4, 6, 12, True), (1, 3, 2, 17, 8, 4, 5, 9, True),    # would be the largest tensors
        (1, 3, 5, 5, 8, 4, 16, 6, False), (2, 2, 3, 9, 8, 4, 16, 6, False), (3, 8, 2, 33, 16, 8, 32, 12, False),
        (_pick(g, 1, 2), _pick(g, 2, 4), 1, int(torch.randint(32, 48, (), generator=g)), 16, 8, 12, 14, True)]
    for i, (b, h, s, tt, dh, dr, dc, dv, measured) in enumerate(cases):
        for name, shape, scale in (("qn", (b, h, s, dh), 1), ("qr", (b, h, s, dr), 1), ("lat", (b, tt, dc), 1),
                                   ("kr", (b, tt, dr), 1), ("wuk", (h, dh, dc), 0.3), ("wuv", (h, dv, dc), 0.3)):
            t[f"a{i}.{name}"] = torch.randn(*shape, generator=g) * scale
        scale = round(0.1 + 0.4 * torch.rand((), generator=g).item(), 4)
        calls.append(Call(f"absorbed/{i}", "absorbed_attention", [f"a{i}.{x}" for x in ("qn", "qr", "lat", "kr", "wuk",
                                                                                       "wuv")] + [scale],
                          via=f"{DRIVERS}:drive_absorbed"))
    steps_cases = [
        dict(hidden_size=64, num_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=6),
        dict(hidden_size=48, num_heads=3, q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=8,
             v_head_dim=4),
        dict(hidden_size=_pick(g, 32, 64), num_heads=_pick(g, 2, 3, 4), q_lora_rank=_pick(g, None, 20),
             kv_lora_rank=_pick(g, 8, 16), qk_nope_head_dim=_pick(g, 4, 8), qk_rope_head_dim=_pick(g, 2, 4, 8),
             v_head_dim=_pick(g, 4, 6), rope_theta=_pick(g, 10000.0, 500.0))]
    for i, config in enumerate(steps_cases):
        from ...deepseek.mla import MLA, MLAConfig

        state = MLA(MLAConfig(**config)).state_dict()
        names = []
        for j, key in enumerate(sorted(state)):
            p = state[key]
            t[f"m{i}.w{j}"] = torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0)
            names.append(f"m{i}.w{j}")
        prompt = int(torch.randint(1, 7, (), generator=g))
        steps = [1, 1, 2, 1] if i != 1 else [1, 1, 1, 1]
        t[f"m{i}.x"] = torch.randn(2, prompt + sum(steps), config["hidden_size"], generator=g)
        calls.append(Call(f"step/{i}", "mla_step", [config, prompt, steps, f"m{i}.x"] + names,
                          via=f"{DRIVERS}:drive_step"))
    return calls, t


def _calls_of(t, prefix):
    return [c for c in t["__calls__"] if c.id.startswith(prefix)]


def _flat(outputs, cid, n):
    got = outputs.get(cid)
    if not isinstance(got, torch.Tensor) or got.numel() != n:
        return None
    return got.double()


def _judge_cache(t, outputs, errors):
    for call in _calls_of(t, "cache/"):
        if _err(errors, call.id):
            return _err(errors, call.id)
        layers, ops = call.args[0], call.args[1]
        chunk = lambda i, x: t[f"{call.id.replace('cache/', 'c')}.{i}.{x}"].double()  # noqa: E731
        held = {layer: ([], []) for layer in range(layers)}
        wants = [("seq_len of an empty cache", torch.zeros(1, dtype=torch.float64))]
        for k, (layer, i) in enumerate(ops):
            held[layer][0].append(chunk(i, "l"))
            held[layer][1].append(chunk(i, "r"))
            where = f"update {k} (layer {layer} of {layers}, {chunk(i, 'l').shape[1]} new tokens)"
            wants += [(f"{where}: the returned latents", torch.cat(held[layer][0], 1)),
                      (f"{where}: the returned RoPE keys", torch.cat(held[layer][1], 1)),
                      (f"{where}: seq_len (tokens in the last layer)",
                       torch.tensor([float(sum(c.shape[1] for c in held[layers - 1][0]))], dtype=torch.float64))]
        got = _flat(outputs, call.id, sum(w.numel() for _, w in wants))
        if got is None:
            return f"{call.id}: the returned tensors or seq_len have the wrong sizes (after some update)"
        pos = 0
        for what, want in wants:
            part = got[pos:pos + want.numel()].reshape(want.shape)
            pos += want.numel()
            why = _close(part, want, 0.0, 0.0)
            if why:
                return f"LatentCache({layers}), batch {want.shape[0]}: {what}: {why}"
    return None


def _materialised(qn, qr, lat, kr, wuk, wuv, scale):
    qn, qr, lat, kr, wuk, wuv = (x.double() for x in (qn, qr, lat, kr, wuk, wuv))
    k = torch.cat([torch.einsum("hdc,btc->bhtd", wuk, lat), kr[:, None].expand(-1, wuk.shape[0], -1, -1)], -1)
    v = torch.einsum("hvc,btc->bhtv", wuv, lat)
    q = torch.cat([qn, qr], -1)
    s, n = q.shape[2], k.shape[2]
    visible = torch.arange(n)[None, :] <= torch.arange(s)[:, None] + (n - s)
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ v


def _judge_absorbed(t, outputs, errors):
    for call in _calls_of(t, "absorbed/"):
        if _err(errors, call.id):
            return _err(errors, call.id)
        args = [t[a] for a in call.args[:6]]
        want = _materialised(*args, call.args[6])
        b, h, s, _ = args[0].shape
        n, dh, dv = args[2].shape[1], args[0].shape[3], args[5].shape[1]
        where = f"absorbed_attention with B={b}, H={h}, {s} new of {n} tokens, d_c={args[2].shape[2]}"
        got = _flat(outputs, call.id, want.numel() + 1)
        if got is None:
            return f"{where}: expected an output of shape {tuple(want.shape)}"
        why = _close(got[:-1].reshape(want.shape), want, 1e-5, 1e-5)
        if why:
            return f"{where}: {why}"
        limit = b * h * n * min(dh, dv)
        dc = args[2].shape[2]
        # judged only where every head's K or V is more than twice any broadcast copy of a weight (B x H x d_c x d),
        # which a sound absorbed decode may make (a broadcasting @ expands w_uv per batch row)
        if (s <= 2 and dc < min(dh, dv) and n * min(dh, dv) > 2 * dc * max(dh, dv)
                and got[-1].item() >= limit):
            return (f"{where}: an operation made a tensor of {int(got[-1].item())} numbers, as large as every head's "
                    f"keys or values of all {n} tokens (B x H x T x {min(dh, dv)} = {limit}); the absorbed decode works "
                    "in the latent space and never builds them")
    return None


def _judge_step(t, outputs, errors):
    from ...deepseek.mla import MLA, MLAConfig

    for call in _calls_of(t, "step/"):
        if _err(errors, call.id):
            return _err(errors, call.id)
        config, prompt, steps, x = call.args[:4]
        mla = MLA(MLAConfig(**config)).double().eval()
        state = mla.state_dict()
        mla.load_state_dict({k: t[w].double() for k, w in zip(sorted(state), call.args[4:])}, strict=True)
        with torch.no_grad():
            want = mla(t[x].double())                  # every token at once, causal: what the steps must add up to
        got = _flat(outputs, call.id, want.numel() + 1)
        where = f"mla_step, {config}, prefill {prompt} then steps of {steps} tokens"
        if got is None:
            return f"{where}: the steps' outputs do not add up to shape {tuple(want.shape)}"
        why = _close(got[:-1].reshape(want.shape), want, 1e-4, 1e-4)
        if why:
            return f"{where}: {why}"
        if got[-1].item() != prompt + sum(steps):
            return f"{where}: the cache's seq_len is {int(got[-1].item())} at the end, expected {prompt + sum(steps)}"
    return None


SPEC = Spec(
    hide=[], calls=_calls,
    strip={"deepseek/mla.py": ("absorbed_attention",)},
    judge={"test_cache": _judge_cache, "test_absorbed": _judge_absorbed, "test_mla_step": _judge_step})
