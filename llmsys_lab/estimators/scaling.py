"""Chinchilla scaling law (Hoffmann et al., 2022; lecture 003) and compute-optimal models.

    L(N, D) = E + A / N^alpha + B / D^beta,   E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28

with N parameters and D training tokens. Training costs C ~ 6 N D FLOPs. Minimising L on
the curve 6 N D = C gives, in closed form,

    N_opt = G (C / 6)^(beta / (alpha + beta)),  D_opt = (C / 6) / N_opt,
    G = (alpha A / (beta B))^(1 / (alpha + beta)).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..validate import ConfigError

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def chinchilla_loss(n_params: float, n_tokens: float) -> float:
    if n_params <= 0 or n_tokens <= 0:
        raise ConfigError(f"N and D must be positive, got N={n_params}, D={n_tokens}")
    return E + A / n_params**ALPHA + B / n_tokens**BETA


@dataclass(frozen=True)
class Optimum:
    flops: float
    params: float
    tokens: float
    loss: float

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


def compute_optimal(flops: float) -> Optimum:
    """The N, D that minimise L(N, D) subject to 6 N D = flops."""
    if flops <= 0:
        raise ConfigError(f"the compute budget must be positive, got {flops}")
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    n = g * (flops / 6) ** (BETA / (ALPHA + BETA))
    d = flops / 6 / n
    return Optimum(flops, n, d, chinchilla_loss(n, d))
