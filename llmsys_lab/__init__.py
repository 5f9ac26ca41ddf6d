"""llmsys-lab: an LLM inference stack built step by step, one lesson at a time.

Importing the package decides, once, whether Triton kernels run compiled (a CUDA GPU is
present) or through the Triton interpreter (CPU only); see ``llmsys_lab._runtime``. Where Triton
is not installed at all (macOS, native Windows) the package still imports and
``triton_mode()`` says 'unavailable'.
"""
from ._runtime import configure_triton, default_device, triton_available, triton_mode

configure_triton()

from .doctor import doctor  # noqa: E402

__version__ = "0.1.0"   # = pyproject.toml's version (tests/test_environment.py); the Colab cells pin it
__all__ = ["doctor", "default_device", "triton_mode", "triton_available", "configure_triton", "__version__"]
