"""environment.yml (conda) and pyproject.toml (pip) list the same dependencies."""
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def norm(req: str) -> str:
    return req.replace(" ", "").lower()


def test_environment_yml_matches_pyproject():
    project = pyproject()["project"]
    want = {norm(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    have = {norm(r) for r in pip_block if not r.startswith("-e")}
    assert have == want, f"only in environment.yml: {sorted(have - want)}; only in pyproject: {sorted(want - have)}"
    assert "-e ." in pip_block


def test_gpu_node_requirements_are_in_pyproject():
    project = pyproject()["project"]
    all_reqs = {norm(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    lines = (ROOT / "scripts/gpu-node-requirements.txt").read_text().splitlines()
    reqs = {norm(l) for l in lines if l.strip() and not l.startswith("#")}
    assert reqs <= all_reqs, sorted(reqs - all_reqs)


def _requirements():
    from packaging.requirements import Requirement

    project = pyproject()["project"]
    return {Requirement(r).name: Requirement(r) for r in project["dependencies"]}


# sys_platform / platform_machine of the machines students have
PLATFORMS = {"linux-x86_64": ("linux", "x86_64"), "linux-aarch64": ("linux", "aarch64"),
             "macos-arm64": ("darwin", "arm64"), "macos-x86_64": ("darwin", "x86_64"),
             "windows": ("win32", "AMD64")}


def test_triton_is_required_only_where_a_wheel_exists():
    """PyPI has Triton wheels for Linux x86_64 and aarch64 only: requiring it on macOS or Windows
    makes `pip install` (and so `make lab`) fail there before any lesson opens."""
    reqs = _requirements()
    wanted = {name: reqs["triton"].marker.evaluate({"sys_platform": plat, "platform_machine": machine})
              for name, (plat, machine) in PLATFORMS.items()}
    assert wanted == {"linux-x86_64": True, "linux-aarch64": True, "macos-arm64": False,
                      "macos-x86_64": False, "windows": False}
    # everything else is required everywhere
    assert all(r.marker is None for name, r in reqs.items() if name != "triton")


def test_repository_url_is_declared_once():
    assert pyproject()["project"]["urls"]["Repository"].startswith("https://")


def test_package_version_is_the_project_version():
    import llmsys_lab

    assert llmsys_lab.__version__ == pyproject()["project"]["version"]
