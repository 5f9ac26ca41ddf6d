"""The kit works from a wheel, not only from an editable checkout (Colab and `pip install` users).

One module-scoped environment: the wheel is built offline from this tree (no build isolation),
installed normally (not editable) into a fresh virtual environment whose only view of the other
dependencies is a .pth file naming this environment's site-packages folders, and everything is
run from a temporary working directory, so the source tree is never on sys.path.
"""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _site_dirs() -> list[str]:
    """This environment's site-packages folders (including ones it reaches through .pth files),
    never the repository itself nor a folder holding a copy of the kit."""
    dirs = [p for p in sys.path if p.rstrip("/").endswith("site-packages") and Path(p).is_dir()]
    dirs += [p for p in site.getsitepackages() if p not in dirs and Path(p).is_dir()]
    # a site-packages folder inside the checkout (the kit's own .venv) is fine: it holds the
    # dependencies, and the editable install's path hook there is not activated from a .pth line
    return [d for d in dirs if Path(d).resolve() != ROOT and not Path(d, "llmsys_lab").exists()]


def fresh_venv(tmp: Path) -> Path:
    """A new venv in tmp/venv that sees this environment's packages (the dependencies) through a .pth
    file, but not the kit; returns its interpreter."""
    venv = tmp / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
                   check=True)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_deps_from_test_env.pth").write_text("\n".join(_site_dirs()) + "\n")
    return py


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of the fresh venv, the wheel, a working directory outside the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp / "dist"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("llmsys_lab-*.whl")
    py = fresh_venv(tmp)
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                           str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]
    work = tmp / "elsewhere"
    work.mkdir()
    return py, wheel, work


def run(installed, *args) -> subprocess.CompletedProcess:
    py, _, work = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run([str(py), *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_wheel_holds_every_package_the_model_and_the_results(installed):
    _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    source_pkgs = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "llmsys_lab").rglob("__init__.py")}
    for pkg in source_pkgs:
        assert f"{pkg}/__init__.py" in names, f"{pkg} is missing from the wheel"
    assert "llmsys_lab/kernels" in source_pkgs
    for path in (ROOT / "llmsys_lab/kernels").glob("*.py"):
        assert f"llmsys_lab/kernels/{path.name}" in names
    for folder in ("llmsys-tiny", "shakespeare-tokens"):          # the bundled model and lesson 11's tokens
        for path in (ROOT / "llmsys_lab/models" / folder).iterdir():
            assert f"llmsys_lab/models/{folder}/{path.name}" in names
    for path in (ROOT / "benchmarks/results").glob("*.json"):
        assert f"llmsys_lab/results/{path.name}" in names
    assert not any(n.startswith(("kernels/", "tests/", "notebooks/")) for n in names)


IMPORT_ALL = """
import pkgutil, sys, importlib
from pathlib import Path
import llmsys_lab
root = Path(llmsys_lab.__file__).parent
assert "site-packages" in str(root), root
assert not any(Path(p or ".").resolve() == Path(sys.argv[1]) for p in sys.path), sys.path
names = [m.name for m in pkgutil.walk_packages(llmsys_lab.__path__, "llmsys_lab.")]
for name in names:
    importlib.import_module(name)
from llmsys_lab.model import load_tiny
from llmsys_lab.benchmarking import load_results, results_dir
model, tok = load_tiny()
assert results_dir() == root / "results", results_dir()
print(len(names), "modules", "estimators" in " ".join(names), "kernels.flash_attention" in " ".join(names),
      sorted(load_results("serving")) == ["hardware", "results"] or sorted(load_results("serving")))
"""


@pytest.mark.slow
def test_every_module_imports_from_the_installed_wheel(installed):
    out = run(installed, "-c", IMPORT_ALL, str(ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    count, _, estimators, kernels, results = out.stdout.split()
    assert int(count) >= 40 and estimators == kernels == results == "True", out.stdout


@pytest.mark.slow
def test_doctor_and_estimate_run_from_the_wheel(installed):
    doctor = run(installed, "-m", "llmsys_lab", "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "everything the lessons need is here." in doctor.stdout and "matches torch.softmax" in doctor.stdout
    est = run(installed, "-m", "llmsys_lab", "estimate", "llama-2-7b", "--json")
    assert est.returncode == 0, est.stderr
    report = json.loads(est.stdout)
    assert report["model"] == "llama-2-7b" and report["seq"] == 4096
