"""Where the kit runs: CPU or GPU, compiled Triton or the Triton interpreter.

Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` decorator runs, so the choice has
to be made before any kernel module is imported. ``configure_triton()`` is called by
``import llmsys_lab``, by ``llmsys_lab.kernels`` (the package every kernel lives in) and by
the test suite's ``conftest.py``, so notebooks and tests make the same choice.
"""
from __future__ import annotations

import importlib.util
import os

_INTERPRET = "TRITON_INTERPRET"

# Where to get Triton when it is missing (macOS and native Windows have no Triton wheel).
TRITON_HOWTO = ("run this on Linux (a laptop, WSL2 on Windows, or Google Colab) "
                "where `pip install triton` works")


class TritonUnavailable(RuntimeError):
    """Raised by code that needs Triton on a machine without it (macOS, native Windows).

    The grader reports a test that raises it as "not gradable on this machine" (neither
    passed nor failed); lessons catch it and run the PyTorch reference instead.
    """


def triton_available() -> bool:
    """True when the `triton` package can be imported here (it is not looked at otherwise)."""
    return importlib.util.find_spec("triton") is not None


def triton_note(what: str) -> None:
    """Print the one line a lesson shows instead of a Triton result on a machine without Triton.

    `what` says what the cell would have shown, e.g. "the Triton paged decode kernel's output and
    timing"; the line starts with "Triton unavailable:" (tests look for it).
    """
    print(f"Triton unavailable: this cell would show {what}; {TRITON_HOWTO}.")


def require_triton(what: str) -> None:
    """Raise TritonUnavailable naming `what` (e.g. "the paged decode kernel") if Triton is missing."""
    if not triton_available():
        raise TritonUnavailable(f"{what} needs Triton, which is not installed on this machine: {TRITON_HOWTO}.")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class TritonImportedTooEarly(RuntimeError):
    """`triton.language` was imported in compiled mode on a machine without a GPU."""


def configure_triton() -> str:
    """Use the Triton interpreter when no GPU is present; return the mode in use.

    A value the user set (``TRITON_INTERPRET=1`` on a GPU, to debug a kernel) is kept. Triton reads
    the variable when ``triton.language`` is first imported: if that already happened in compiled
    mode on a machine without a GPU, switching now would leave kernels half-interpreted (they fail
    with "Cannot call @triton.jit'd outside of the scope of a kernel"), so refuse with what to do.
    """
    import sys

    if _INTERPRET not in os.environ and not cuda_available():
        if "triton.language" in sys.modules:
            raise TritonImportedTooEarly(
                "triton was imported before llmsys_lab on a machine without a GPU, so Triton is in compiled "
                "mode and its kernels cannot run here. Restart the kernel and run `import llmsys_lab` before "
                "`import triton` (or set TRITON_INTERPRET=1 in the environment before starting Python).")
        os.environ[_INTERPRET] = "1"
    return triton_mode()


def triton_mode() -> str:
    """'interpreter' when kernels run through TRITON_INTERPRET=1, else 'compiled'."""
    return "interpreter" if os.environ.get(_INTERPRET, "0") not in ("", "0") else "compiled"


def default_device():
    """The device lessons use for their large examples: 'cuda' when there is one."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_gpu_if_asked() -> None:
    """`make test-gpu` sets LLMSYS_REQUIRE_GPU=1: a GPU run that quietly fell back
    to the CPU would verify nothing, so fail loudly instead."""
    if os.environ.get("LLMSYS_REQUIRE_GPU") == "1" and not cuda_available():
        raise RuntimeError(
            "LLMSYS_REQUIRE_GPU=1 but torch sees no CUDA device "
            "(is this a GPU node, and is the torch here a CUDA build?)"
        )
