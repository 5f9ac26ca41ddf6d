"""Where the kit runs: CPU or GPU, compiled Triton or the Triton interpreter.

Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` decorator runs, so the choice has
to be made before any kernel module is imported. ``configure_triton()`` is called by
``import llmsys_lab``, by ``llmsys_lab.kernels`` (the package every kernel lives in) and by
the test suite's ``conftest.py``, so notebooks and tests make the same choice.
"""
from __future__ import annotations

import importlib.util
import os

from .errors import LabError

_INTERPRET = "TRITON_INTERPRET"

# Where to get Triton when it is missing (macOS and native Windows have no Triton wheel).
TRITON_HOWTO = ("run this on Linux (a laptop, WSL2 on Windows, or Google Colab) "
                "where `pip install triton` works")


class TritonUnavailable(LabError, RuntimeError):
    """Raised by code that needs Triton on a machine without it (macOS, native Windows).

    The grader reports a test that raises it as "not gradable on this machine" (neither
    passed nor failed); lessons catch it and run the PyTorch reference instead.
    """


def triton_available() -> bool:
    """True when the `triton` package can be imported here (it is not looked at otherwise)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except ImportError:  # an import hook that refuses triton: as good as not installed
        return False


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


class TritonImportedTooEarly(LabError, RuntimeError):
    """`triton.language` was imported in compiled mode on a machine without a GPU."""


def configure_triton() -> str:
    """Use the Triton interpreter when no GPU is present; return the mode in use.

    A value the user set (``TRITON_INTERPRET=1`` on a GPU, to debug a kernel) is kept. Triton reads
    the variable when ``triton.language`` is first imported: if that already happened in compiled
    mode on a machine without a GPU, switching now would leave kernels half-interpreted (they fail
    with "Cannot call @triton.jit'd outside of the scope of a kernel"), so refuse with what to do.
    Without Triton (macOS, native Windows) the mode is 'unavailable' whatever the variable says.
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
    """'unavailable' without Triton; 'interpreter' when kernels run through TRITON_INTERPRET=1;
    else 'compiled'."""
    if not triton_available():
        return "unavailable"
    return "interpreter" if os.environ.get(_INTERPRET, "0") not in ("", "0") else "compiled"


# Compute capabilities LLMSYS_FORCE_ARCH accepts, by name (the GPUs students meet).
_ARCHS = {"sm75": (7, 5), "sm80": (8, 0), "sm86": (8, 6), "sm89": (8, 9), "sm90": (9, 0)}


def forced_arch() -> tuple[int, int] | None:
    """The compute capability named by LLMSYS_FORCE_ARCH (e.g. 'sm75', a T4), or None.

    Kernels that choose a code path by GPU generation (TMA on Hopper, bf16 tensor cores from
    Ampere) ask `gpu_capability()`, so setting LLMSYS_FORCE_ARCH=sm75 on a large GPU runs
    the paths a Colab T4 takes. It can only lower the capability: features are not invented.
    """
    name = os.environ.get("LLMSYS_FORCE_ARCH", "").strip().lower()
    if not name:
        return None
    if name not in _ARCHS:
        raise ValueError(f"LLMSYS_FORCE_ARCH={name!r} is not one of {', '.join(_ARCHS)}")
    return _ARCHS[name]


def gpu_capability(device=None) -> tuple[int, int]:
    """(major, minor) compute capability kernels should plan for: the GPU's own, or the lower
    one forced by LLMSYS_FORCE_ARCH."""
    import torch

    real = tuple(torch.cuda.get_device_capability(device))
    forced = forced_arch()
    return min(real, forced) if forced else real


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


def half_dtype(device=None):
    """The 16-bit dtype for kernels on this device: bfloat16 from Ampere (compute capability 8.0)
    on, and on the CPU; float16 on older GPUs such as Colab's T4 (7.5), which has no bf16 hardware."""
    import torch

    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and gpu_capability(dev) < (8, 0):
        return torch.float16
    return torch.bfloat16


def check_kernel_dtype(t, what: str) -> None:
    """Refuse bfloat16 for a Triton kernel on a GPU below compute capability 8.0 (a T4).

    Such GPUs have no bf16 units, and Triton (3.3 on) lists compute capability 8.0 as its minimum:
    below it tl.dot is lowered without tensor cores, and bf16 there is untested. A clear error
    beats a crash or a silent slow path; `half_dtype()` gives the dtype to use instead.
    """
    import torch

    if t.dtype == torch.bfloat16 and t.is_cuda:
        cap = gpu_capability(t.device)
        if cap < (8, 0):
            raise TypeError(f"{what}: bfloat16 needs a GPU of compute capability >= 8.0, this one is "
                            f"{cap[0]}.{cap[1]} (e.g. a T4): use float16 (llmsys_lab._runtime.half_dtype())")
