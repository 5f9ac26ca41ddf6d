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
