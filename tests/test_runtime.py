"""The Triton mode is chosen before any kernel module is imported, in every entry point."""
import os
import subprocess
import sys

import pytest
import torch

CHECK = ("import os, {mod}; from llmsys_lab.kernels import softmax as s; "
         "print(os.environ.get('TRITON_INTERPRET'), type(s._softmax_kernel).__name__)")


def run_clean(mod: str, extra_env=None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, "-c", CHECK.format(mod=mod)], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("mod", ["llmsys_lab", "torch"])
def test_first_import_decides_the_mode(mod):
    """Importing the kernels (directly, or through llmsys_lab) switches to the interpreter
    on a CPU-only machine before the @triton.jit decorators run."""
    out = run_clean(mod)
    if torch.cuda.is_available():
        assert out == "None JITFunction"
    else:
        assert out == "1 InterpretedFunction"


def test_user_choice_is_kept():
    assert run_clean("llmsys_lab", {"TRITON_INTERPRET": "1"}).startswith("1 ")


def test_require_gpu_fails_loudly_without_one(monkeypatch):
    from llmsys_lab._runtime import require_gpu_if_asked

    monkeypatch.setenv("LLMSYS_REQUIRE_GPU", "1")
    if torch.cuda.is_available():
        require_gpu_if_asked()
    else:
        with pytest.raises(RuntimeError, match="LLMSYS_REQUIRE_GPU=1 but torch sees no CUDA device"):
            require_gpu_if_asked()


# ---- LLMSYS_FORCE_ARCH, half_dtype, triton_mode without Triton ----------------------------------
def test_forced_arch_is_parsed_and_bad_values_are_named(monkeypatch):
    from llmsys_lab._runtime import forced_arch

    monkeypatch.delenv("LLMSYS_FORCE_ARCH", raising=False)
    assert forced_arch() is None
    monkeypatch.setenv("LLMSYS_FORCE_ARCH", "SM75")
    assert forced_arch() == (7, 5)
    monkeypatch.setenv("LLMSYS_FORCE_ARCH", "turing")
    with pytest.raises(ValueError, match="LLMSYS_FORCE_ARCH='turing' is not one of sm75, sm80"):
        forced_arch()


def test_half_dtype_and_bf16_check_on_cpu(monkeypatch):
    from llmsys_lab._runtime import check_kernel_dtype, half_dtype

    monkeypatch.setenv("LLMSYS_FORCE_ARCH", "sm75")          # only GPUs are affected
    assert half_dtype("cpu") == torch.bfloat16
    check_kernel_dtype(torch.zeros(2, dtype=torch.bfloat16), "x")    # a CPU tensor: no refusal


def test_triton_mode_is_unavailable_when_an_import_hook_refuses_triton(monkeypatch):
    import importlib.abc

    from llmsys_lab import _runtime

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton":
                raise ModuleNotFoundError(name)

    monkeypatch.setattr(sys, "meta_path", [Refuse(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    assert not _runtime.triton_available() and _runtime.triton_mode() == "unavailable"
    with pytest.raises(_runtime.TritonUnavailable, match="the paged decode kernel needs Triton"):
        _runtime.require_triton("the paged decode kernel")
