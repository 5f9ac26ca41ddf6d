"""scripts/setup_env.py picks a local CPU torch wheel on a machine without a GPU."""
import importlib.util
import sys
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


def test_no_wheel_found(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setattr(setup_env, "find_links_dirs", lambda py: [tmp_path])
    assert setup_env.local_cpu_torch_wheel(Path(sys.executable)) is None
