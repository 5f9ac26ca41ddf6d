"""Triton for the kernel modules, or a stand-in on machines without it (macOS, native Windows).

Every kernel module takes ``triton`` and ``tl`` from here instead of importing Triton itself, so
``import llmsys_lab.kernels.<anything>`` works everywhere: the kernels' source can still be read
(``kernel.fn``, as lesson 06 does), the PyTorch references still run, and launching a kernel or
calling a Triton helper raises ``TritonUnavailable`` with the fix (via ``require_triton``).
The kernel entry points call ``require_triton`` first, so the error names the entry point.
"""
from __future__ import annotations

from llmsys_lab._runtime import require_triton, triton_available

TRITON = triton_available()


class UnavailableKernel:
    """What ``@triton.jit`` leaves behind without Triton: the function (``.fn``), not launchable."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)

    def __getitem__(self, grid):              # kernel[grid](...)
        require_triton(f"the Triton kernel {self.__name__}")

    def __call__(self, *args, **kwargs):      # a @triton.jit helper called directly
        require_triton(f"the Triton kernel {self.__name__}")


class _Missing:
    """A stand-in module: ``jit`` keeps the function; any other attribute raises when used."""

    def __init__(self, name: str):
        self._name = name

    def jit(self, fn=None, **options):
        return UnavailableKernel(fn) if fn is not None else UnavailableKernel

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        qualified = f"{self._name}.{attr}"

        def unavailable(*args, **kwargs):
            require_triton(qualified)

        unavailable.__name__ = attr
        return unavailable


if TRITON:
    import triton
    import triton.language as tl
else:
    triton = _Missing("triton")
    tl = _Missing("triton.language")

__all__ = ["triton", "tl", "TRITON", "UnavailableKernel"]
