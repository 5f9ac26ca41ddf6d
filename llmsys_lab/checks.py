"""Self-check helpers: compare a result with a reference and explain what differs.

Students call these in lessons and assignments. A failure names the first thing that is
wrong (type, shape, dtype, which element differs and by how much), not just
``AssertionError``. A pass prints one line that is identical on every machine (it states
the tolerance, not the device-dependent error), so notebooks can store it as output.
"""
from __future__ import annotations

import torch


class CheckFailed(AssertionError):
    """A self-check found a difference; the message says which."""


def compare(actual, expected, name: str = "result", atol: float = 1e-5, rtol: float = 1e-5) -> str | None:
    """None when `actual` matches `expected` (shape, dtype, values); else what differs."""
    if not isinstance(actual, torch.Tensor):
        return f"{name} should be a torch.Tensor, got {type(actual).__name__}"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"{name} has dtype {actual.dtype}, expected {expected.dtype}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if (nan_a != nan_e).any():
        idx = tuple(int(i) for i in torch.nonzero(nan_a != nan_e)[0])
        return f"{name}[{idx}] is {a[idx].item()}, expected {e[idx].item()} (NaN mismatch)"
    a, e = a.masked_fill(nan_a, 0), e.masked_fill(nan_e, 0)
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        return (f"{name}[{idx}] is {a[idx].item():.6g}, expected {e[idx].item():.6g} "
                f"({int(bad.sum())} of {bad.numel()} elements differ; max |err| = {err.max().item():.3g}, "
                f"tolerance atol={atol:g}, rtol={rtol:g})")
    return None


def check_close(actual, expected, name: str = "result", atol: float = 1e-5, rtol: float = 1e-5,
                quiet: bool = False) -> None:
    """Raise CheckFailed explaining the first difference; print a one-line pass message."""
    problem = compare(actual, expected, name, atol, rtol)
    if problem:
        raise CheckFailed(problem)
    if not quiet:
        print(f"{name}: OK (matches within atol={atol:g}, rtol={rtol:g})")


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def agree(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> str:
    """'max |err| < tol: True' -- a line that reads the same on CPU and GPU."""
    return f"max |err| < {tol:g}: {max_abs_err(actual, expected) < tol}"
