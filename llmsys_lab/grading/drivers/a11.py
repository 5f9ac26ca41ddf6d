"""Assignment 11 (scaling laws), probe side: the student's functions return a dict and a (choice, loss, loss)
tuple; these drivers turn them into flat float64 tensors for the harness. No reference answers here."""
from __future__ import annotations

LAW_KEYS = ("E", "A", "B", "alpha", "beta")
CHOICES = ("longer", "bigger")


def drive_fit(fn, name, ns):
    """fit_law(n, d, l) -> its law as [E, A, B, alpha, beta] (float64)."""
    import torch

    def run(n_params, n_tokens, losses):
        law = fn(list(n_params), list(n_tokens), list(losses))
        if not isinstance(law, dict) or set(law) != set(LAW_KEYS):
            raise TypeError(f"{name} must return a dict with the keys {LAW_KEYS}, got {type(law).__name__}")
        return torch.tensor([float(law[k]) for k in LAW_KEYS], dtype=torch.float64)
    return run


def drive_optimal(fn, name, ns):
    """compute_optimal(law, c) -> [N, D] (float64; numbers or 0-d tensors alike)."""
    import torch

    def run(law, flops):
        got = fn(dict(law), flops)
        if not isinstance(got, tuple) or len(got) != 2:
            raise TypeError(f"{name} must return (N, D), got {type(got).__name__}")
        return torch.tensor([float(v) for v in got], dtype=torch.float64)
    return run


def drive_choice(fn, name, ns):
    """longer_or_bigger(law, n, d, c) -> [0 for "longer" / 1 for "bigger", loss_longer, loss_bigger] (float64)."""
    import torch

    def run(law, n_params, n_tokens, flops):
        got = fn(dict(law), n_params, n_tokens, flops)
        if not isinstance(got, tuple) or len(got) != 3:
            raise TypeError(f"{name} must return (choice, loss_longer, loss_bigger), got {type(got).__name__}")
        choice, longer, bigger = got
        if choice not in CHOICES:
            raise ValueError(f"{name}'s choice must be 'longer' or 'bigger', got {choice!r}")
        return torch.tensor([CHOICES.index(choice), float(longer), float(bigger)], dtype=torch.float64)
    return run
