"""`python -m llmsys_lab doctor`: is this machine ready for the course?

Reports package versions against the ranges in pyproject.toml, the device, whether
Triton kernels run compiled (GPU) or in the interpreter (CPU), runs one tiny kernel,
and lists every problem with the command that fixes it.

On a machine without Triton (macOS, native Windows: PyPI has no Triton wheel there) that is
not a problem but a limitation: the doctor lists what each lesson and assignment shows instead.
"""
from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata

from ._runtime import TRITON_HOWTO, configure_triton, triton_available, triton_mode
from .course import without_triton   # what each lesson shows without Triton

# import name -> distribution name, for everything the lessons need
PACKAGES = {
    "torch": "torch", "triton": "triton", "transformers": "transformers", "numpy": "numpy",
    "matplotlib": "matplotlib", "ipywidgets": "ipywidgets", "ipykernel": "ipykernel",
    "jupyterlab": "jupyterlab", "nbval": "nbval", "nbclient": "nbclient", "nbformat": "nbformat",
    "tqdm": "tqdm",
}
# Used only if the package metadata cannot be read (a source checkout that is not installed).
FALLBACK_RANGES = {"torch": ">=2.5,<3", "triton": ">=3.3,<4", "transformers": ">=5.0,<6"}
FIX_ALL = "make setup  (or: pip install -e .)"
GPU_ONLY = {"jupyterlab"}  # optional on a GPU node that only runs tests
# Triton wheels exist for Linux only; elsewhere its absence is expected, not an installation fault.
TRITON_PLATFORMS = ("linux",)

# On GPUs older than Ampere (Colab's T4, compute capability 7.5).
PRE_AMPERE = ("compute capability below 8.0: kernels take their pre-Hopper paths without tensor-core "
              "bf16; use float16 (llmsys_lab._runtime.half_dtype()); GPU benchmarks in lessons show the "
              "stored H200 results")


@dataclass
class Report:
    versions: dict[str, str | None] = field(default_factory=dict)
    device: str = ""
    triton: str = ""
    kernel_check: str = ""
    problems: list[tuple[str, str]] = field(default_factory=list)   # (what is wrong, how to fix)
    limited: list[tuple[str, str]] = field(default_factory=list)    # (lesson, what it cannot show here)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = ["llmsys-lab doctor", f"  python        {platform.python_version()} ({sys.executable})"]
        lines += [f"  {name:<13} {v or 'MISSING'}" for name, v in self.versions.items()]
        lines += [f"device:         {self.device}", f"triton kernels: {self.triton}",
                  f"kernel check:   {self.kernel_check}"]
        if self.limited:
            lines.append("limited on this machine:")
            lines += [f"  - {where}: {what}" for where, what in self.limited]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {what}\n    fix: {fix}" for what, fix in self.problems]
        else:
            lines.append("everything the lessons need is here.")
        return "\n".join(lines)


def _required_ranges() -> dict[str, str]:
    try:
        from packaging.requirements import Requirement

        reqs = [Requirement(r) for r in metadata.requires("llmsys-lab") or [] if "extra ==" not in r]
        # a requirement whose marker excludes this platform (triton on macOS) is not required here
        return {r.name.lower(): str(r.specifier) for r in reqs if r.marker is None or r.marker.evaluate()}
    except Exception:  # not installed, or packaging missing
        return dict(FALLBACK_RANGES)


def _check_versions(report: Report) -> None:
    ranges = _required_ranges()
    for mod, dist in PACKAGES.items():
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = None
        if mod == "triton" and not triton_available():
            version = None                    # installed metadata, but it cannot be imported
        report.versions[mod] = version
        wanted = ranges.get(dist, "")
        if version is None:
            if mod == "triton":
                _no_triton(report, wanted)
            elif mod not in GPU_ONLY:
                report.problems.append((f"{dist} is not installed", f"pip install '{dist}{wanted}'  or  {FIX_ALL}"))
            continue
        if wanted:
            try:
                from packaging.specifiers import SpecifierSet

                if not SpecifierSet(wanted).contains(version, prereleases=True):
                    report.problems.append((f"{dist} {version} is outside the tested range {wanted}",
                                            f"pip install '{dist}{wanted}'"))
            except Exception:
                pass


def _no_triton(report: Report, wanted: str) -> None:
    """Without Triton: a fault on Linux (the install is incomplete), a known limit elsewhere."""
    report.limited += without_triton()     # lesson by lesson, from the course manifest
    if sys.platform.startswith(TRITON_PLATFORMS):
        report.problems.append(("triton is not installed (this is Linux: a Triton wheel exists)",
                                f"pip install 'triton{wanted or FALLBACK_RANGES['triton']}'  or  {FIX_ALL}"))


def _check_device(report: Report) -> None:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        report.device = (f"cuda: {p.name}, {p.total_memory / 2**30:.0f} GiB, "
                         f"compute capability {p.major}.{p.minor}, CUDA {torch.version.cuda}")
        from ._runtime import gpu_capability

        if gpu_capability(0) < (8, 0):
            report.limited.append(("GPU", PRE_AMPERE))
    else:
        report.device = "cpu (no CUDA GPU: lessons use small sizes)"
        if torch.version.cuda is None and _nvidia_gpu_present():
            report.problems.append(("an NVIDIA GPU is present but torch is a CPU-only build",
                                    "pip install --force-reinstall 'torch>=2.5,<3'  (a CUDA build from PyPI)"))


def _nvidia_gpu_present() -> bool:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _check_kernel(report: Report) -> None:
    mode = configure_triton()
    report.triton = ("compiled for the GPU" if mode == "compiled"
                     else "Triton interpreter (TRITON_INTERPRET=1): kernels run on the CPU, slowly")
    try:
        import torch

        from llmsys_lab.kernels.softmax import softmax, softmax_reference

        device = "cuda" if torch.cuda.is_available() and triton_mode() == "compiled" else "cpu"
        x = torch.randn(4, 37, device=device)
        ok = torch.allclose(softmax(x), softmax_reference(x), atol=1e-6)
        report.kernel_check = f"Triton softmax on {device} {'matches' if ok else 'DOES NOT match'} torch.softmax"
        if not ok:
            report.problems.append(("the Triton softmax kernel gives wrong results",
                                    "check the triton and torch versions above; report the doctor output"))
    except Exception as exc:  # noqa: BLE001 - the doctor reports, it does not crash
        report.kernel_check = f"failed: {type(exc).__name__}: {exc}"
        report.problems.append((f"a Triton kernel could not run ({type(exc).__name__})",
                                "pip install 'triton>=3.3,<4'  or  " + FIX_ALL))


def doctor(verbose: bool = True) -> Report:
    """Check the environment; print the report (verbose) and return it."""
    report = Report()
    _check_versions(report)
    _check_device(report)
    if report.versions.get("triton") and report.versions.get("torch"):
        _check_kernel(report)
    elif not report.versions.get("triton"):
        report.triton = f"unavailable: Triton is not installed ({TRITON_HOWTO})"
        report.kernel_check = "not run (no Triton): lessons show the PyTorch reference instead"
    else:
        report.triton = report.kernel_check = "not checked (torch missing)"
    if verbose:
        print(report)
    return report
