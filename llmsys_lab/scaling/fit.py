"""Fitting scaling laws to training runs, the ways Chinchilla (Hoffmann et al. 2022) does.

Approach 3 (parametric fit): minimise over (a, b, e, alpha, beta)

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3,

(LSE = log-sum-exp, so A = exp(a), B = exp(b), E = exp(e)) with L-BFGS from a grid of initialisations,
keeping the best. The Huber loss on log-loss makes the fit robust to a few outlying runs. Bootstrap over runs
(resample the runs with replacement, refit) gives the spread of each fitted number.

Approach 2 (IsoFLOP profiles): for each compute budget, the runs of several sizes at that budget; a parabola in
log N through their losses has its minimum at N_opt(C); a straight line through log N_opt against log C gives
the exponent a in N_opt ~ C^a.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..validate import ConfigError
from .laws import ChinchillaLaw, _positive_array, fit_power_law

HUBER_DELTA = 1e-3
# Chinchilla's grid: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}; ours is
# coarser (the fits start where a good optimum is), and alpha/beta start at exponents seen in practice.
DEFAULT_GRID = {"a": (0.0, 5.0, 10.0), "b": (0.0, 5.0, 10.0), "e": (-1.0, 0.5), "alpha": (0.2, 0.5),
                "beta": (0.2, 0.5)}


def _runs(n_params, n_tokens, losses) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = _positive_array(n_params, "n_params")
    d = _positive_array(n_tokens, "n_tokens")
    y = _positive_array(losses, "losses")
    if not n.numel() == d.numel() == y.numel():
        raise ConfigError(f"n_params, n_tokens and losses must have one entry per run, got lengths "
                          f"{n.numel()}, {d.numel()} and {y.numel()}")
    if n.numel() < 5:
        raise ConfigError(f"a fit of 5 parameters (E, A, B, alpha, beta) needs at least 5 runs, got {n.numel()}")
    return n, d, y


def _objective(theta: torch.Tensor, log_n, log_d, log_y, delta: float) -> torch.Tensor:
    """Per row k: the sum over runs of the Huber losses of the log-loss residuals, theta[k] = (a, b, e, alpha, beta).
    theta (K, 5); log_n, log_d, log_y (K, runs) or (runs,)."""
    a, b, e, alpha, beta = (t[:, None] for t in theta.unbind(-1))                 # each (K, 1)
    pred = torch.logsumexp(torch.stack([a - alpha * log_n, b - beta * log_d, e.expand(-1, log_n.shape[-1])]), 0)
    return torch.nn.functional.huber_loss(pred, log_y.expand_as(pred), delta=delta, reduction="none").sum(-1)


def _lbfgs(theta0: torch.Tensor, log_n, log_d, log_y, delta: float, max_iter: int) -> tuple[torch.Tensor, float]:
    """One fit: L-BFGS (strong Wolfe line search) from theta0 (5,). Returns (theta (5,), objective)."""
    theta = theta0.clone()[None].requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-13,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = _objective(theta, log_n, log_d, log_y, delta).sum()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        value = float(_objective(theta, log_n, log_d, log_y, delta)[0])
    return theta.detach()[0], value


def _to_law(theta: torch.Tensor) -> ChinchillaLaw:
    a, b, e, alpha, beta = theta.tolist()
    if alpha <= 0 or beta <= 0:
        raise RuntimeError(f"the best fit has a non-positive exponent (alpha={alpha:.3g}, beta={beta:.3g}): the runs "
                           "do not show the loss falling with both N and D")
    return ChinchillaLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


@dataclass(frozen=True)
class Fit:
    law: ChinchillaLaw
    objective: float          # the Huber objective at the optimum (sum over runs)
    inits: int                # how many initialisations were optimised

    def __str__(self):
        w = self.law
        return (f"L(N, D) = {w.E:.3f} + {w.A:.4g} / N^{w.alpha:.3f} + {w.B:.4g} / D^{w.beta:.3f}  "
                f"(Huber objective {self.objective:.3g}, best of {self.inits} starts)")


def _grid(grid: dict) -> torch.Tensor:
    keys = ("a", "b", "e", "alpha", "beta")
    missing = [k for k in keys if k not in grid]
    if missing:
        raise ConfigError(f"grid needs the keys {keys}, missing {missing}")
    for k in keys:
        if not grid[k]:
            raise ConfigError(f"grid[{k!r}] is empty")
    return torch.tensor(list(itertools.product(*(grid[k] for k in keys))), dtype=torch.float64)


def _best_starts(grid: dict | None, top: int, log_n, log_d, log_y, delta) -> torch.Tensor:
    starts = _grid(grid or DEFAULT_GRID)
    with torch.no_grad():
        scores = _objective(starts, log_n, log_d, log_y, delta)
    return starts[torch.argsort(scores)[:top]]


def _check_fit_args(delta, top, max_iter) -> None:
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not delta > 0:
        raise ConfigError(f"delta (the Huber threshold) must be a positive number, got {delta!r}")
    for value, name in ((top, "top"), (max_iter, "max_iter")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def fit_chinchilla(n_params, n_tokens, losses, delta: float = HUBER_DELTA, grid: dict | None = None,
                   top: int = 3, max_iter: int = 100) -> Fit:
    """Chinchilla approach 3: the law L(N, D) = E + A/N^alpha + B/D^beta that best fits the runs (Huber loss on
    log-loss, L-BFGS from each of the `top` best points of the initialisation grid, keeping the best optimum)."""
    n, d, y = _runs(n_params, n_tokens, losses)
    _check_fit_args(delta, top, max_iter)
    log_n, log_d, log_y = n.log(), d.log(), y.log()
    best_theta, best_value = None, math.inf
    starts = _best_starts(grid, top, log_n, log_d, log_y, delta)
    for start in starts:
        theta, value = _lbfgs(start, log_n, log_d, log_y, delta, max_iter)
        if math.isfinite(value) and value < best_value and bool(torch.isfinite(theta).all()):
            best_theta, best_value = theta, value
    if best_theta is None:
        raise RuntimeError("every initialisation diverged: check that the losses decrease with N and D")
    return Fit(_to_law(best_theta), best_value, len(starts))


def bootstrap_fits(n_params, n_tokens, losses, samples: int = 100, seed: int = 0, delta: float = HUBER_DELTA,
                   max_iter: int = 100, start: ChinchillaLaw | None = None) -> list[ChinchillaLaw]:
    """Refit on `samples` resamplings of the runs (with replacement): the spread of the fitted numbers. Each
    resampling's L-BFGS starts from `start` (default: the fit to all runs). Resamplings whose fit diverges or has a
    non-positive exponent are dropped; at least half must remain."""
    n, d, y = _runs(n_params, n_tokens, losses)
    _check_fit_args(delta, 1, max_iter)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ConfigError(f"samples must be an integer >= 2, got {samples!r}")
    if start is None:
        start = fit_chinchilla(n, d, y, delta=delta, max_iter=max_iter).law
    elif not isinstance(start, ChinchillaLaw):
        raise TypeError(f"start must be a ChinchillaLaw, got {type(start).__name__}")
    theta0 = torch.tensor([math.log(start.A), math.log(start.B), math.log(start.E), start.alpha, start.beta],
                          dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    laws = []
    for _ in range(samples):
        idx = torch.randint(0, len(n), (len(n),), generator=gen)
        theta, value = _lbfgs(theta0, n.log()[idx], d.log()[idx], y.log()[idx], delta, max_iter)
        if math.isfinite(value) and bool(torch.isfinite(theta).all()) and theta[3] > 0 and theta[4] > 0:
            laws.append(_to_law(theta))
    if len(laws) < samples / 2:
        raise RuntimeError(f"only {len(laws)} of {samples} bootstrap fits converged with positive exponents")
    return laws


def spread(laws: list[ChinchillaLaw], field: str, q: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high) of one fitted number over bootstrap fits: the central q interval."""
    if not laws:
        raise ConfigError("laws is empty")
    if field not in ("E", "A", "B", "alpha", "beta", "exponent_n"):
        raise ConfigError(f"field must be one of E, A, B, alpha, beta, exponent_n, got {field!r}")
    if not 0 < q < 1:
        raise ConfigError(f"q must be in (0, 1), got {q}")
    v = torch.tensor([getattr(w, field) for w in laws], dtype=torch.float64)
    lo, mid, hi = torch.quantile(v, torch.tensor([(1 - q) / 2, 0.5, (1 + q) / 2], dtype=torch.float64)).tolist()
    return mid, lo, hi


# ---- approach 2: IsoFLOP profiles ----------------------------------------------------------------
@dataclass(frozen=True)
class IsoFLOP:
    flops: float
    n_params: list             # the runs at this budget
    losses: list
    n_opt: float               # the parabola's minimum
    loss_opt: float
    coeffs: tuple              # loss = c2 (log N)^2 + c1 log N + c0

    @property
    def d_opt(self) -> float:
        return self.flops / (6 * self.n_opt)


def isoflop_profiles(n_params, n_tokens, losses, flops=None, rtol: float = 0.05) -> list[IsoFLOP]:
    """Group runs by their compute 6 N D (runs within rtol of a budget share it; or pass each run's budget as
    `flops`) and fit a parabola in log N to each group's losses (at least 3 sizes per budget)."""
    n, d, y = _runs(n_params, n_tokens, losses)
    c = 6 * n * d if flops is None else _positive_array(flops, "flops")
    if c.numel() != n.numel():
        raise ConfigError(f"flops must have one entry per run, got {c.numel()} for {n.numel()} runs")
    order = torch.argsort(c)
    groups: list[list[int]] = []
    for i in order.tolist():
        if groups and abs(float(c[i]) / float(c[groups[-1][0]]) - 1) <= rtol:
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for g in groups:
        if len({float(n[i]) for i in g}) < 3:
            continue
        x, yy = n[g].log(), y[g]
        design = torch.stack([x**2, x, torch.ones_like(x)], 1)
        c2, c1, c0 = torch.linalg.lstsq(design, yy[:, None]).solution[:, 0].tolist()
        if c2 > 0:
            x_opt = -c1 / (2 * c2)
            x_opt = min(max(x_opt, float(x.min()) - 1.0), float(x.max()) + 1.0)   # stay near the measured sizes
        else:                                                                      # no minimum: the best run
            x_opt = float(x[torch.argmin(yy)])
        out.append(IsoFLOP(float(c[g].mean()), n[g].tolist(), yy.tolist(), math.exp(x_opt),
                           c2 * x_opt**2 + c1 * x_opt + c0, (c2, c1, c0)))
    if len(out) < 2:
        raise ConfigError("IsoFLOP profiles need at least two budgets with three or more model sizes each")
    return out


def isoflop_exponents(profiles: list[IsoFLOP]) -> tuple[float, float]:
    """(a, b) in N_opt ~ C^a and D_opt ~ C^b from the profiles' minima (a + b = 1 under C = 6 N D)."""
    if len(profiles) < 2:
        raise ConfigError("need at least two IsoFLOP profiles")
    cs = [p.flops for p in profiles]
    a, _ = fit_power_law(cs, [p.n_opt for p in profiles])
    b, _ = fit_power_law(cs, [p.d_opt for p in profiles])
    return a, b
