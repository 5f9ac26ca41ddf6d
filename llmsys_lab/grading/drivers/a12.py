"""Assignment 12 (DeepSeek-V3's MLA): the student's LatentCache, absorbed_attention and mla_step called on the
harness's inputs. Each call is traced: code from the kit's MLA module (its LatentKVCache, absorbed_attention,
MLA.forward / expand) and transformers' DeepSeek-V3 attention is refused, except the pieces of MLA the
assignment allows mla_step to use. No answer is computed here."""
from __future__ import annotations

KIT_MLA = ["kit:deepseek/mla.py", "transformers:models/deepseek_v3/modeling_deepseek_v3.py",
           "transformers:cache_utils.py"]
MLA_PIECES = ("MLA.queries", "MLA.latents", "MLA.up_weights", "rope_cos_sin", "apply_rope", "MLAConfig.")


def _traced(fn, allow=()):
    from llmsys_lab.grading.probe import Tracer

    return Tracer(KIT_MLA, allow=allow).wrap(fn)


def drive_cache(fn, name, ns):
    """LatentCache(num_layers); ops [layer, latent name index, k_rope name index]; per op: the returned latents
    and RoPE keys (flat) and seq_len; seq_len of the empty cache first."""
    def run(num_layers, ops, *chunks):
        import torch

        def body():
            cache = fn(num_layers)
            out = [torch.tensor([float(cache.seq_len)], dtype=torch.float64)]
            for layer, i in ops:
                latent, k_rope = cache.update(layer, chunks[2 * i].clone(), chunks[2 * i + 1].clone())
                out += [latent.detach().double().reshape(-1), k_rope.detach().double().reshape(-1),
                        torch.tensor([float(cache.seq_len)], dtype=torch.float64)]
            return torch.cat(out)
        return _traced(body)()
    return run


class _Largest:
    """The largest storage (in elements) of any tensor an operation makes while the answer runs."""

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        outer.largest = max(outer.largest, t.untyped_storage().nbytes() // max(1, t.element_size()))
                return out

        self.largest, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def drive_absorbed(fn, name, ns):
    """absorbed_attention(...) flat, then the largest tensor storage any of its operations made."""
    def run(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale):
        import torch

        def body():
            with _Largest() as seen:
                out = fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"absorbed_attention returned {type(out).__name__}, not a tensor")
            return torch.cat([out.detach().double().reshape(-1), torch.tensor([float(seen.largest)],
                                                                                  dtype=torch.float64)])
        return _traced(body)()
    return run


def drive_step(fn, name, ns):
    """The kit's MLA layer with the harness's weights; the notebook's LatentCache; mla_step on the first
    `prompt` tokens, then chunks of `steps` tokens each. Returns every step's output concatenated along the
    tokens (flat) and the cache's seq_len at the end."""
    def run(config, prompt, steps, x, *weights):
        import torch

        from llmsys_lab.deepseek.mla import MLA, MLAConfig

        cfg = MLAConfig(**config)
        mla = MLA(cfg).eval()
        names = sorted(mla.state_dict())
        if len(names) != len(weights):
            raise ValueError("the harness's weights do not fit this MLA layer")
        mla.load_state_dict(dict(zip(names, weights)), strict=True)
        cache_cls = ns.get("LatentCache")
        if cache_cls is None:
            raise NameError("name 'LatentCache' is not defined")

        def body():
            cache = cache_cls(1)
            outs, t = [], 0
            with torch.no_grad():
                for n in [prompt] + list(steps):
                    outs.append(fn(mla, x[:, t:t + n], cache))
                    t += n
            return torch.cat([torch.cat(outs, 1).double().reshape(-1),
                              torch.tensor([float(cache.seq_len)], dtype=torch.float64)])
        return _traced(body, allow=MLA_PIECES)()
    return run
