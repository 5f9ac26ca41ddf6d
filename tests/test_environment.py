"""One lock for the term: requirements.lock, pyproject.toml, environment.yml, the set-up and the GPU wheelhouse agree.

The lock is written by `make lock` (scripts/lock.py, uv's universal resolver with hashes). These tests
need no network: they check that what every install path reads is the lock, and that the lock
satisfies pyproject.toml on every platform of the README's table.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


lock_script = _load("lock_script", ROOT / "scripts/lock.py")
setup_env = _load("setup_env_for_lock", ROOT / "scripts/setup_env.py")


def pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def project_requirements() -> list[Requirement]:
    project = pyproject()["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def lock_entries() -> list[tuple[str, Version, Marker | None, int]]:
    """(name, version, marker, number of hashes) for every package in the lock."""
    entries, current = [], None
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            req = line.rstrip(" \\")
            name_ver, _, marker = req.partition(";")
            name, _, version = name_ver.strip().partition("==")
            assert version, f"not an exact pin in the lock: {line!r}"
            current = [name.lower(), Version(version), Marker(marker) if marker.strip() else None, 0]
            entries.append(current)
        elif line.strip().startswith("--hash=sha256:") and current is not None:
            current[3] += 1
    return [tuple(e) for e in entries]


# The README's "Which machine?" table, as marker environments (Python versions the lock was resolved for)
def environments():
    plats = {"linux-x86_64": ("linux", "x86_64", "Linux"), "linux-aarch64": ("linux", "aarch64", "Linux"),
             "macos-arm64": ("darwin", "arm64", "Darwin"), "windows": ("win32", "AMD64", "Windows")}
    for label, (plat, machine, system) in plats.items():
        for py in ("3.10.14", "3.11.9", "3.12.7", "3.13.1"):
            yield f"{label}-py{py}", {
                "sys_platform": plat, "platform_machine": machine, "platform_system": system,
                "python_version": ".".join(py.split(".")[:2]), "python_full_version": py,
                "implementation_name": "cpython", "platform_python_implementation": "CPython",
                "os_name": "nt" if plat == "win32" else "posix", "extra": "dev"}


def test_lock_is_uv_output_with_a_hash_on_every_line():
    text = LOCK.read_text()
    assert text.startswith(lock_script.HEADER + "\n#    make lock\n"), text[:200]
    entries = lock_entries()
    assert len(entries) > 100, len(entries)
    assert all(n > 0 for *_, n in entries), [e[0] for e in entries if e[3] == 0]


def test_lock_pins_every_project_requirement_on_every_platform():
    """For each platform and Python: each requirement that applies has exactly one locked line that
    applies, and its version satisfies pyproject.toml's range."""
    entries = lock_entries()
    problems = []
    for label, env in environments():
        for req in project_requirements():
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            lines = [(v, m) for n, v, m, _ in entries
                     if n == req.name.lower().replace("_", "-") and (m is None or m.evaluate(env))]
            if len(lines) != 1:
                problems.append(f"{label}: {req.name} has {len(lines)} applicable lines")
            elif not req.specifier.contains(lines[0][0], prereleases=True):
                problems.append(f"{label}: {req.name}=={lines[0][0]} is outside {req.specifier}")
    assert not problems, problems


def test_triton_is_locked_only_where_a_wheel_exists():
    """PyPI has Triton wheels for Linux only: requiring it on macOS or Windows would make `make lab` fail there."""
    triton = [m for n, _, m, _ in lock_entries() if n == "triton"]
    assert triton, "triton is missing from the lock"
    for label, env in environments():
        applies = any(m is None or m.evaluate(env) for m in triton)
        assert applies == label.startswith("linux"), label


def test_no_cuda_runtime_packages_in_the_lock():
    """The CPU build of torch needs none; only PyPI's Linux CUDA build does, and it names them itself."""
    names = [n for n, *_ in lock_entries()]
    assert not [n for n in names if n.startswith(("nvidia-", "cuda-"))]
    assert "torch" in names


def test_torch_pin_is_one_release_everywhere_and_the_setups():
    torch = [(v, m) for n, v, m, _ in lock_entries() if n == "torch"]
    assert len(torch) == 1 and torch[0][1] is None, torch
    constraint = [l for l in (ROOT / "scripts/lock-constraints.txt").read_text().splitlines()
                  if l.strip() and not l.startswith("#")]
    assert constraint == [f"torch=={torch[0][0]}"], constraint
    assert setup_env.locked_torch() == str(torch[0][0])
    torch_req = next(r for r in project_requirements() if r.name == "torch")
    assert torch_req == Requirement(setup_env.TORCH_RANGE)


def test_lowest_python_is_pyprojects():
    want = SpecifierSet(pyproject()["project"]["requires-python"])
    assert str(want) == f">={lock_script.LOWEST_PYTHON}"
    resolved = {v for _, _, vs in lock_script.PLATFORMS for v in vs}
    assert lock_script.LOWEST_PYTHON in resolved


def test_environment_yml_lists_no_packages_of_its_own():
    """conda gives the interpreter; the packages come from the lock (`make setup VENV=$CONDA_PREFIX`)."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert all(isinstance(d, str) for d in deps), "environment.yml must not carry a pip list: the lock is the one list"
    names = {re.split(r"[=<>]", d)[0] for d in deps}
    assert names == {"python", "pip", "make"}, names
    py = next(d for d in deps if d.startswith("python"))
    version = py.split("=", 1)[1]
    assert Version(version) in SpecifierSet(pyproject()["project"]["requires-python"])
    resolved = {v for _, _, vs in lock_script.PLATFORMS for v in vs}
    assert version in resolved, f"environment.yml's Python {version} is not one the lock was checked for: {resolved}"
    assert 'VENV="$CONDA_PREFIX"' in (ROOT / "environment.yml").read_text()


def test_gpu_node_requirements_are_locked():
    names = {n for n, *_ in lock_entries()}
    lines = (ROOT / "scripts/gpu-node-requirements.txt").read_text().splitlines()
    reqs = [Requirement(l) for l in lines if l.strip() and not l.startswith("#")]
    assert reqs
    assert {r.name.lower() for r in reqs} <= names, sorted({r.name.lower() for r in reqs} - names)


def test_constraints_output_is_the_lock_without_hashes():
    pins = lock_script.pins(LOCK.read_text())
    assert len(pins) == len(lock_entries())
    assert all("==" in p and "--hash" not in p and not p.endswith("\\") for p in pins)
    for p in pins:
        Requirement(p)   # each line is a valid requirement with its marker


def test_every_install_path_reads_the_lock():
    make = (ROOT / "Makefile").read_text()
    stamp_rule = next(l for l in make.splitlines() if l.startswith("$(STAMP):"))
    assert "requirements.lock" in stamp_rule, "a lock update must re-run the set-up"
    assert re.search(r"^wheelhouse:\n(\t.*\n)*\t.*-c \$\(GPU_CONSTRAINTS\)", make, re.M), "the wheelhouse must use the lock"
    assert re.search(r"^gpu-env:\n(\t.*\n)*\t.*-c \$\(GPU_CONSTRAINTS\)", make, re.M), "the GPU node must use the lock"
    assert "scripts/lock.py --constraints > $(GPU_CONSTRAINTS)" in make
    assert re.search(r"^test-latest:.*\n\t.*setup_env.py .*--latest", make, re.M)
    assert re.search(r"^lock:.*\n(\t.*\n)*\t.*scripts/lock.py$", make, re.M)
    assert (ROOT / ".ci/run").read_text().rstrip().endswith("make test")


def test_set_up_installs_the_lock_with_hashes_and_nothing_else(monkeypatch):
    calls = []
    monkeypatch.setattr(setup_env, "run", lambda cmd, check=True: calls.append(cmd[1:]))
    setup_env.install_locked(Path("venv/bin/python"))
    assert calls[0] == ["-m", "pip", "install", "--require-hashes", "--no-deps", "-r", str(LOCK)]
    assert calls[1][:5] == ["-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    assert calls[2] == ["-m", "pip", "check"]


@pytest.mark.parametrize("text", ["torch==2.13.0 ; sys_platform == 'linux' \\\n", "numpy==1 \\\n"])
def test_a_lock_without_one_plain_torch_line_is_refused(tmp_path, text):
    bad = tmp_path / "requirements.lock"
    bad.write_text(text)
    with pytest.raises(SystemExit, match="must pin torch once"):
        setup_env.locked_torch(bad)


def test_make_lock_does_not_need_a_working_set_up():
    """After a dependency is added to pyproject.toml the set-up's `pip check` fails until the lock has it, so
    `make lock` must not depend on `setup`: it installs the locked uv (hash-checked) into its own environment."""
    import re

    makefile = (ROOT / "Makefile").read_text()
    [rule] = re.findall(r"^lock:(.*)$", makefile, flags=re.M)
    assert "setup" not in rule and "$(STAMP)" not in rule, rule
    body = makefile.split("\nlock:", 1)[1].split("\n\n", 1)[0]
    assert "scripts/lock.py --bootstrap-uv" in body and "LOCK_VENV" in body


def test_the_uv_block_pip_reads_from_the_lock():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import lock
    finally:
        sys.path.pop(0)
    block = lock.pinned_block((ROOT / "requirements.lock").read_text(), "uv")
    first, *hashes = block.strip().splitlines()
    assert re.fullmatch(r"uv==[0-9.]+ \\", first.strip()) or re.match(r"uv==[0-9.]+", first), first
    assert hashes and all(h.strip().startswith(("--hash=sha256:", "#")) for h in hashes), hashes[:3]
    with pytest.raises(SystemExit, match="pins no no-such-package"):
        lock.pinned_block("uv==1 \\\n    --hash=sha256:00\n", "no-such-package")
