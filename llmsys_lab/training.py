"""The kit's one training loop: next-token prediction on a long 1-D stream of token ids.

Used by the scripts that train the bundled models (scripts/train_tiny_model.py) and by the scaling-law
family of lesson 11 (llmsys_lab.scaling.family). Random windows of ``seq`` tokens are drawn from the
stream with a seeded generator; AdamW (betas 0.9/0.95, weight decay 0.1), a linear warm-up over 5% of
the steps then a cosine decay to zero, gradient clipping at 1.0, bf16 autocast on CUDA.

``loss_fn(model, x)`` returns the scalar loss of a (batch, seq) block of ids: a transformers model is
``lambda m, x: m(input_ids=x, labels=x).loss``; the kit's models return logits and use ``next_token_loss``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .validate import ConfigError


def next_token_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting x[:, 1:] from x[:, :-1] with a model that returns logits (B, T, V)."""
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


def _check_ids(ids, name: str, need: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be a 1-D tensor of integer token ids, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)} of shape {tuple(getattr(ids, 'shape', ()))}")
    if len(ids) < need:
        raise ConfigError(f"{name} has {len(ids)} tokens, fewer than one window of {need}")


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class TrainResult:
    final_loss: float                    # last logged training loss
    val_loss: float | None               # validation loss after the last step (None without val_ids)
    best_val_loss: float | None          # best validation loss seen at an evaluation
    seconds: float
    log: list = field(default_factory=list)


@torch.no_grad()
def evaluate(model, loss_fn, ids: torch.Tensor, seq: int, device, max_windows: int = 512, batch: int = 32) -> float:
    """Mean of the per-batch losses over consecutive, non-overlapping windows of ``seq`` tokens of ``ids``
    (at most max_windows windows, in batches of ``batch``)."""
    _check_ids(ids, "ids", seq)
    was_training = model.training
    model.eval()
    windows = min(len(ids) // seq, max_windows)
    losses = []
    device = torch.device(device)
    for i in range(0, windows, batch):
        n = min(batch, windows - i)
        x = ids[i * seq:(i + n) * seq].view(n, seq).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses.append(loss_fn(model, x).float().item())
    model.train(was_training)
    return sum(losses) / len(losses)


def train_loop(model, loss_fn: Callable, train_ids: torch.Tensor, *, steps: int, batch: int, seq: int, lr: float,
               device="cpu", seed: int = 0, val_ids: torch.Tensor | None = None, eval_every: int | None = None,
               keep_best: bool = False, weight_decay: float = 0.1, max_val_windows: int = 512,
               log: Callable | None = print) -> TrainResult:
    """Train ``model`` in place for ``steps`` steps of ``batch`` windows of ``seq`` tokens from ``train_ids``.

    eval_every: evaluate on val_ids every that many steps (and after the last); keep_best: load the weights
    of the best evaluation at the end (the bundled models keep their best checkpoint).
    """
    for value, name in ((steps, "steps"), (batch, "batch"), (seq, "seq")):
        _positive_int(value, name)
    if seq < 2:
        raise ConfigError(f"seq must be at least 2 (a window predicts its tokens 2..seq from 1..seq-1), got {seq}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    _check_ids(train_ids, "train_ids", seq + 2)
    if val_ids is not None:
        _check_ids(val_ids, "val_ids", seq)
    if eval_every is not None:
        _positive_int(eval_every, "eval_every")
        if val_ids is None:
            raise ConfigError("eval_every needs val_ids")
    if keep_best and eval_every is None:
        raise ConfigError("keep_best needs eval_every (and val_ids)")
    device = torch.device(device)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    history, best, start, loss = [], (float("inf"), None), time.perf_counter(), None
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(train_ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([train_ids[s:s + seq] for s in starts.tolist()]).to(device)     # (B, seq)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if eval_every is not None and (step % eval_every == 0 or step == steps):
            v = evaluate(model, loss_fn, val_ids, seq, device, max_val_windows)
            history.append({"step": step, "train_loss": loss.item(), "val_loss": v,
                            "seconds": time.perf_counter() - start})
            if log is not None:
                log(f"step {step:5d}  train {loss.item():.3f}  val {v:.3f}  {time.perf_counter() - start:6.1f}s")
            if keep_best and v < best[0]:
                best = (v, {k: t.detach().clone() for k, t in model.state_dict().items()})
    val = history[-1]["val_loss"] if history else (
        evaluate(model, loss_fn, val_ids, seq, device, max_val_windows) if val_ids is not None else None)
    if keep_best and best[1] is not None:
        model.load_state_dict(best[1])
    best_val = min((h["val_loss"] for h in history), default=val)
    return TrainResult(final_loss=loss.item(), val_loss=val, best_val_loss=best_val,
                       seconds=time.perf_counter() - start, log=history)
