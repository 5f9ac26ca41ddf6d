"""scripts/setup_env.py: which torch it installs where (the lock's release: a local CPU wheel, the CPU index,
PyPI's CUDA build with a GPU; on macOS/Windows the lock's own line), and the canary's newest-in-range."""
import importlib.util
import sys

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("setup_env", ROOT / "scripts/setup_env.py")
setup_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_env)


def test_picks_newest_matching_cpu_wheel(tmp_path, monkeypatch):
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    names = [f"torch-2.6.0+cpu-{tag}-{tag}-manylinux_2_28_x86_64.whl",
             f"torch-2.13.0+cpu-{tag}-{tag}-manylinux_2_28_x86_64.whl",
             f"torch-2.14.0+cpu-cp39-cp39-manylinux_2_28_x86_64.whl",      # other Python
             f"torch-2.14.0-{tag}-{tag}-manylinux_2_28_x86_64.whl",        # CUDA build
             f"torch-2.4.0+cpu-{tag}-{tag}-manylinux_2_28_x86_64.whl"]     # too old
    for n in names:
        (tmp_path / n).touch()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setattr(setup_env.sysconfig, "get_platform", lambda: "linux-x86_64")
    wheel = setup_env.local_cpu_torch_wheel(Path(sys.executable))
    assert wheel is not None and wheel.name == names[1]
    # with the lock's release given, only that release will do
    assert setup_env.local_cpu_torch_wheel(Path(sys.executable), "2.6.0").name == names[0]
    assert setup_env.local_cpu_torch_wheel(Path(sys.executable), "2.12.0") is None


def test_no_wheel_found(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setattr(setup_env, "find_links_dirs", lambda py: [tmp_path])
    assert setup_env.local_cpu_torch_wheel(Path(sys.executable)) is None


# ---- macOS and Windows: the script's decisions, with the platform faked ---------------------------
def record_installs(monkeypatch, platform: str, gpu: bool = False, latest: bool = False,
                    have: str | None = None) -> list[list[str]]:
    calls = []
    monkeypatch.setattr(setup_env.sys, "platform", platform)
    monkeypatch.setattr(setup_env, "torch_version_in", lambda py: have)
    monkeypatch.setattr(setup_env, "has_nvidia_gpu", lambda: gpu)
    monkeypatch.setattr(setup_env, "local_cpu_torch_wheel", lambda py, version=None: None)
    monkeypatch.delenv("LLMSYS_TORCH_SPEC", raising=False)
    monkeypatch.delenv("LLMSYS_TORCH_INDEX", raising=False)

    def fake_run(cmd, check=True):
        calls.append(cmd[3:])                                   # after "<python> -m pip"
        return setup_env.subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(setup_env, "run", fake_run)
    setup_env.install_torch(Path("venv/bin/python"), latest=latest)
    return calls


LOCKED = f"torch=={setup_env.locked_torch()}"


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_macos_and_windows_take_torch_from_the_lock_and_skip_triton(monkeypatch, platform):
    # the lock's own torch line (PyPI's build for that platform, hash-checked) is installed with the rest;
    # an NVIDIA GPU on Windows changes nothing: PyPI has no CUDA torch for Windows (WSL2 is the way)
    assert record_installs(monkeypatch, platform, gpu=True) == []
    assert record_installs(monkeypatch, platform, latest=True) == [["install", setup_env.TORCH_RANGE]]
    assert "triton" not in setup_env.smoke_imports(platform)
    assert not setup_env.has_triton_wheel(platform)


def test_linux_without_gpu_uses_the_cpu_index_for_the_locked_release(monkeypatch):
    calls = record_installs(monkeypatch, "linux", gpu=False)
    # no dependencies from the index: filelock, sympy, ... come from the lock at its versions
    assert calls[0] == ["install", "--no-deps", LOCKED, "--index-url", setup_env.CPU_INDEX]
    assert setup_env.smoke_imports("linux").startswith("import llmsys_lab, torch, triton,")
    latest = record_installs(monkeypatch, "linux", gpu=False, latest=True)
    assert latest[0] == ["install", setup_env.TORCH_RANGE, "--index-url", setup_env.CPU_INDEX]


def test_linux_with_gpu_takes_the_cuda_build_of_the_locked_release(monkeypatch):
    assert record_installs(monkeypatch, "linux", gpu=True) == [["install", LOCKED]]


def test_a_torch_of_another_release_is_replaced_by_the_locked_one(monkeypatch):
    want = setup_env.locked_torch()
    assert record_installs(monkeypatch, "linux", gpu=True, have=f"{want}+cpu") == []    # any build of it stays
    assert record_installs(monkeypatch, "linux", gpu=True, have="2.5.1") == [["install", LOCKED]]
    assert record_installs(monkeypatch, "linux", gpu=True, have="2.5.1", latest=True) == []


def test_an_index_alone_is_honoured(monkeypatch):
    monkeypatch.setattr(setup_env, "torch_version_in", lambda py: None)
    monkeypatch.setenv("LLMSYS_TORCH_INDEX", "https://download.pytorch.org/whl/cu126")
    monkeypatch.delenv("LLMSYS_TORCH_SPEC", raising=False)
    calls = []
    monkeypatch.setattr(setup_env, "run", lambda cmd, check=True: calls.append(cmd[3:]))
    setup_env.install_torch(Path("python"))
    assert calls == [["install", LOCKED, "--index-url", "https://download.pytorch.org/whl/cu126"]]


def test_venv_paths_and_platforms():
    assert setup_env.venv_python(Path("v"), windows=True) == Path("v/Scripts/python.exe")
    assert setup_env.venv_python(Path("v"), windows=False) == Path("v/bin/python")
    assert [setup_env.platform_kind(p) for p in ("linux", "darwin", "win32")] == ["linux", "macos", "windows"]
    with pytest.raises(SystemExit, match="unsupported platform 'sunos5'"):
        setup_env.platform_kind("sunos5")


def test_intel_mac_stops_with_the_way_out():
    """torch>=2.5 has no macOS x86_64 wheel (checked with `uv pip compile --python-platform
    x86_64-apple-darwin`): say so before creating anything."""
    with pytest.raises(SystemExit, match="Intel Mac.*Google Colab"):
        setup_env.check_supported("darwin", "x86_64")
    setup_env.check_supported("darwin", "arm64")
    setup_env.check_supported("linux", "aarch64")
    setup_env.check_supported("win32", "AMD64")


# ---- the lessons' kernel: registered by set-up, per environment -------------------------------------
def test_setup_registers_the_lessons_kernel_inside_the_environment(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(setup_env, "check_supported", lambda *a: None)
    monkeypatch.setattr(setup_env, "install_torch", lambda py, latest=False: None)
    monkeypatch.setattr(setup_env, "run", lambda cmd, check=True: calls.append(cmd))
    monkeypatch.setattr(sys, "argv", ["setup_env.py", "--venv", str(tmp_path / "venv")])
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    assert setup_env.main() == 0
    kernel = [c for c in calls if "ipykernel" in c]
    assert kernel == [setup_env.kernel_command(setup_env.venv_python(tmp_path / "venv"))]
    assert "--sys-prefix" in kernel[0] and "--user" not in kernel[0]        # never the shared user folder
    assert kernel[0][kernel[0].index("--name") + 1] == "llmsys-lab"


def test_the_registered_kernel_is_found_and_runs_this_python(tmp_path):
    """Really register it (into a temporary prefix, not the user's folder) and look it up as Jupyter does."""
    import json
    import subprocess

    from jupyter_client.kernelspec import KernelSpecManager

    subprocess.run(setup_env.kernel_command(Path(sys.executable), prefix=tmp_path), check=True,
                   capture_output=True)
    manager = KernelSpecManager(kernel_dirs=[str(tmp_path / "share" / "jupyter" / "kernels")])
    spec = manager.get_kernel_spec("llmsys-lab")
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve()
    # every lesson names this kernel (assignments name python3, which ipykernel always provides)
    from llmsys_lab import course

    for nb in course.lesson_notebooks():
        assert json.loads(nb.read_text())["metadata"]["kernelspec"]["name"] == setup_env.KERNEL_NAME, nb.name
