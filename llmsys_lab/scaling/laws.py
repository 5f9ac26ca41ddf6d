"""Scaling laws as formulas (lecture 003): the data scaling law of a mean, Chinchilla's L(N, D), Kaplan's and
Rosenfeld's joint forms, and the compute-optimal N*(C), D*(C) under C = 6 N D.

* The mean of n draws from N(mu, sigma^2) has E[(mu_hat - mu)^2] = sigma^2 / n, so
  log(error) = -log n + 2 log sigma: a straight line of slope -1 on log-log axes ("This is a scaling law!!").
* Chinchilla (Hoffmann et al. 2022, approach 3): L(N, D) = E + A / N^alpha + B / D^beta.
* Rosenfeld et al. 2020 (slide): error = n^-alpha + m^-beta + C, here with its scale factors a, b.
* Kaplan et al. 2020 (the slide says "Kaplan+ 2021" and "[m^-alpha + n^-1]^beta"; the paper's form is)
  L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D, with alpha_N = 0.076, alpha_D = 0.095,
  N_c = 8.8e13, D_c = 5.4e13 (non-embedding parameters, tokens, loss in nats).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..validate import ConfigError


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _positive_array(values, name: str) -> torch.Tensor:
    """A 1-D float64 tensor of positive finite numbers (a list, tuple, array or tensor)."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    try:
        t = torch.as_tensor(values, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be numbers (a list, array or tensor), got {type(values).__name__}: {err}")
    if t.numel() == 0:
        raise ConfigError(f"{name} is empty")
    if not torch.isfinite(t).all() or (t <= 0).any():
        bad = t[~torch.isfinite(t) | (t <= 0)][:3].tolist()
        raise ConfigError(f"{name} must hold positive finite numbers, got {bad}")
    return t


# ---- the data scaling law of a mean ------------------------------------------------------------
def mean_estimator_error(ns, sigma: float = 1.0, trials: int = 2000, seed: int = 0) -> list[float]:
    """Measured E[(mu_hat - mu)^2] of the mean of n draws from N(mu, sigma^2), for each n in ns, over `trials`
    repetitions (the theory: sigma^2 / n)."""
    sigma = _positive(sigma, "sigma")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 2:
        raise ConfigError(f"trials must be an integer >= 2, got {trials!r}")
    ns_t = _positive_array(ns, "ns")
    if (ns_t != ns_t.round()).any():
        raise ConfigError(f"ns must be whole numbers of samples, got {ns_t.tolist()}")
    gen = torch.Generator().manual_seed(seed)
    mu = 3.0
    out = []
    for n in ns_t.long().tolist():
        x = mu + sigma * torch.randn(trials, n, generator=gen, dtype=torch.float64)
        out.append(float(((x.mean(1) - mu) ** 2).mean()))
    return out


def fit_power_law(x, y) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line log y = slope * log x + intercept (natural logs)."""
    xs, ys = _positive_array(x, "x"), _positive_array(y, "y")
    if xs.numel() != ys.numel():
        raise ConfigError(f"x and y must have the same length, got {xs.numel()} and {ys.numel()}")
    if xs.numel() < 2 or torch.unique(xs).numel() < 2:
        raise ConfigError("fit_power_law needs at least two distinct x values")
    design = torch.stack([xs.log(), torch.ones_like(xs)], 1)
    sol = torch.linalg.lstsq(design, ys.log()[:, None]).solution[:, 0]
    return float(sol[0]), float(sol[1])


# ---- Chinchilla's form ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __post_init__(self):
        for name in ("E", "A", "B", "alpha", "beta"):
            _positive(getattr(self, name), name)

    def loss(self, n_params, n_tokens):
        """The predicted loss: a float for numbers, a float64 tensor for arrays (broadcast)."""
        scalar = all(isinstance(v, (int, float)) for v in (n_params, n_tokens))
        n, d = _positive_array(n_params, "n_params"), _positive_array(n_tokens, "n_tokens")
        if n.numel() != d.numel() and 1 not in (n.numel(), d.numel()):
            raise ConfigError(f"n_params and n_tokens must have the same length (or one value), "
                              f"got {n.numel()} and {d.numel()}")
        out = self.E + self.A / n**self.alpha + self.B / d**self.beta
        return float(out[0]) if scalar else out

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N*, D*) minimising loss(N, D) subject to 6 N D = flops, in closed form:
        N* = G (C / 6)^(beta / (alpha + beta)), G = (alpha A / (beta B))^(1 / (alpha + beta)), D* = C / (6 N*)."""
        c = _positive(flops, "flops")
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (c / 6) ** (self.beta / (self.alpha + self.beta))
        return n, c / (6 * n)

    @property
    def exponent_n(self) -> float:
        """a in N* ~ C^a: beta / (alpha + beta) (D* ~ C^(1 - a))."""
        return self.beta / (self.alpha + self.beta)

    def tokens_per_param(self, flops: float) -> float:
        n, d = self.compute_optimal(flops)
        return d / n

    def as_dict(self) -> dict:
        return asdict(self)


CHINCHILLA = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)    # Hoffmann et al. 2022, eq. 10
SLIDE_LAW = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.29)     # lecture 003's "SoTA law" (beta 0.29)


def compute_optimal_grid(law: ChinchillaLaw, flops: float, points: int = 4001) -> tuple[float, float]:
    """(N*, D*) by scanning log N on a grid (no formula): the check of the closed form."""
    c = _positive(flops, "flops")
    if isinstance(points, bool) or not isinstance(points, int) or points < 3:
        raise ConfigError(f"points must be an integer >= 3, got {points!r}")
    n = torch.logspace(0, math.log10(c / 6), points, dtype=torch.float64)
    i = int(torch.argmin(law.loss(n, c / (6 * n))))
    return float(n[i]), c / (6 * float(n[i]))


# ---- the other joint forms on the slide ---------------------------------------------------------
KAPLAN_2020 = {"N_c": 8.8e13, "D_c": 5.4e13, "alpha_N": 0.076, "alpha_D": 0.095}


def kaplan_loss(n_params, n_tokens, N_c: float = 8.8e13, D_c: float = 5.4e13, alpha_N: float = 0.076,
                alpha_D: float = 0.095):
    """Kaplan et al. 2020, eq. 1.5: L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D."""
    for v, name in ((N_c, "N_c"), (D_c, "D_c"), (alpha_N, "alpha_N"), (alpha_D, "alpha_D")):
        _positive(v, name)
    scalar = all(isinstance(v, (int, float)) for v in (n_params, n_tokens))
    n, d = _positive_array(n_params, "n_params"), _positive_array(n_tokens, "n_tokens")
    out = ((N_c / n) ** (alpha_N / alpha_D) + D_c / d) ** alpha_D
    return float(out[0]) if scalar else out


def rosenfeld_error(n_tokens, n_params, alpha: float, beta: float, c: float, a: float = 1.0, b: float = 1.0):
    """Rosenfeld et al. 2020 as on the slide, error = a n^-alpha + b m^-beta + c (n data, m parameters):
    Chinchilla's form with other letters (c = E, a = B, b = A)."""
    for v, name in ((alpha, "alpha"), (beta, "beta"), (a, "a"), (b, "b")):
        _positive(v, name)
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise ConfigError(f"c (the irreducible error) must be a finite number >= 0, got {c!r}")
    scalar = all(isinstance(v, (int, float)) for v in (n_tokens, n_params))
    n, m = _positive_array(n_tokens, "n_tokens"), _positive_array(n_params, "n_params")
    out = a * n ** -alpha + b * m ** -beta + c
    return float(out[0]) if scalar else out
