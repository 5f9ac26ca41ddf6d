"""Input checks that fail with a message naming what is wrong.

Every public function of the kit validates its tensors with these helpers, so a student
who passes a (T, D) tensor where (B, H, T, D) was expected reads "q must have 4 dims
(B, H, T, D), got shape (5, 8)" instead of a broadcast error ten frames deep.
"""
from __future__ import annotations

import torch


class ShapeError(ValueError):
    """A tensor has the wrong number of dimensions or a wrong size."""


class ConfigError(ValueError):
    """A configuration field has an invalid value."""


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_tensor(t, name: str, dims: str | None = None, floating: bool = True) -> None:
    """Check that `t` is a tensor with len(dims.split()) dimensions and a float dtype.

    dims: space-separated axis names, e.g. "B H T D"; used in the message only.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None:
        axes = dims.split()
        if t.dim() != len(axes):
            raise ShapeError(
                f"{name} must have {len(axes)} dims ({', '.join(axes)}), got shape {_shape(t)}"
            )
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")


def check_same(tensors: dict[str, torch.Tensor], what: str = "dtype") -> None:
    """All tensors share one dtype (or device)."""
    values = {n: getattr(t, what) for n, t in tensors.items()}
    if len(set(values.values())) > 1:
        listing = ", ".join(f"{n}: {v}" for n, v in values.items())
        names = list(values)
        joined = ", ".join(names[:-1]) + " and " + names[-1]
        raise (TypeError if what == "dtype" else ValueError)(
            f"{joined} must have the same {what}, got {listing}"
        )


def check_size(t: torch.Tensor, name: str, axis: int, axis_name: str, expected: int) -> None:
    if t.shape[axis] != expected:
        raise ShapeError(
            f"{name} has {axis_name} = {t.shape[axis]} (shape {_shape(t)}), expected {expected}"
        )


def check_heads(num_heads: int, num_kv_heads: int, what: str = "num_heads") -> None:
    """GQA needs every K/V head to serve the same number of query heads."""
    if num_kv_heads <= 0 or num_heads <= 0:
        raise ConfigError(f"{what} and num_kv_heads must be positive, got {num_heads} and {num_kv_heads}")
    if num_heads % num_kv_heads:
        raise ConfigError(
            f"num_kv_heads = {num_kv_heads} must divide {what} = {num_heads} "
            f"(each K/V head is shared by {what} / num_kv_heads query heads)"
        )
