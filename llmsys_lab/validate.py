"""Input checks that fail with a message naming what is wrong.

Every public function of the kit validates its tensors with these helpers, so a student
who passes a (T, D) tensor where (B, H, T, D) was expected reads "q must have 4 dims
(B, H, T, D), got shape (5, 8)" instead of a broadcast error ten frames deep.
"""
from __future__ import annotations

import torch

from .errors import LabError


class ShapeError(LabError, ValueError):
    """A tensor has the wrong number of dimensions or a wrong size."""


class ConfigError(LabError, ValueError):
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


# ---- scalar arguments: one home for "must be an int >= 1", "must be a finite number > 0" ----------
def is_int(x) -> bool:
    """A Python or NumPy integer (not a bool, not a float that happens to be whole)."""
    import numbers

    import numpy as np

    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def check_int(value, name: str, minimum: int | None = None, maximum: int | None = None,
              error: type = ConfigError) -> int:
    """`value` is an int (not a bool or float) within [minimum, maximum]; returns it as an int.

    A wrong type raises TypeError; a value out of range raises `error` (ConfigError unless the
    caller's module has its own ValueError subclass). Messages name the argument.
    """
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise error(f"{name} must be an int >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise error(f"{name} must be an int <= {maximum}, got {value}")
    return value


def check_number(value, name: str, minimum: float | None = None, positive: bool = False,
                 maximum: float | None = None, error: type = ConfigError) -> float:
    """`value` is a finite real number (int or float, not a bool or str), > 0 if `positive`,
    >= minimum and <= maximum where given; returns it as a float."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise error(f"{name} must be a finite number, got {value}")
    if positive and not value > 0:
        raise error(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise error(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise error(f"{name} must be <= {maximum}, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    """`value` is True or False (a string such as 'no' is truthy, so it is refused)."""
    import numpy as np

    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_token_id(value, name: str, vocab_size: int, allow_none: bool = True):
    """An optional token id (e.g. eos_token_id): None, or an int in 0 .. vocab_size - 1."""
    if value is None and allow_none:
        return None
    if not is_int(value):
        raise TypeError(f"{name} must be a token id (an int){' or None' if allow_none else ''}, got {value!r}")
    if not 0 <= int(value) < vocab_size:
        raise ConfigError(f"{name} = {int(value)} is outside the vocabulary 0 .. {vocab_size - 1}")
    return int(value)


def check_finite_logits(logits: torch.Tensor, where: str) -> None:
    """Raise FloatingPointError if `logits` holds a NaN or an infinity (a model that diverged, a bad
    weight load, an fp16 overflow): sampling from them would give silent garbage."""
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        rows = bad.reshape(-1, logits.shape[-1]).any(-1).nonzero()[:, 0].tolist()
        raise FloatingPointError(f"{where}: the logits hold NaN or inf (rows {rows[:8]}"
                                 f"{' ...' if len(rows) > 8 else ''}): the model's output is not usable")
