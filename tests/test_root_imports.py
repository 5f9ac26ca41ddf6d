"""Nothing at the repository root may hide an installed package.

`python -m ...`, `python -c ...` and `python -m pytest` put the current folder first on `sys.path`, so
a module or regular package at the root is imported in place of an installed one of the same name.
That happened once: a `kernels/` package at the root hid Hugging Face's `kernels`, which transformers
5.2x imports from every modeling module, and the whole suite failed at collection (kernels/README.md).
"""
from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWN = "llmsys-lab"   # this project's distribution: its top-level `llmsys_lab` *is* the root's folder


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed_top_levels() -> dict[str, str]:
    """{top-level module name: distribution} for every distribution installed in this environment."""
    tops: dict[str, str] = {}
    for dist in md.distributions():
        dname = dist.metadata["Name"] or ""
        if _norm(dname) == OWN:
            continue
        names = set((dist.read_text("top_level.txt") or "").split())
        for f in dist.files or ():
            parts = f.parts
            if not parts or parts[0].endswith((".dist-info", ".egg-info", ".data")) or parts[0] in ("..", "__pycache__"):
                continue
            if len(parts) > 1:
                names.add(parts[0])
            elif parts[0].endswith(".py"):
                names.add(parts[0][:-3])
            elif ".cpython-" in parts[0] or parts[0].endswith((".so", ".pyd")):
                names.add(parts[0].split(".")[0])
        for n in names:
            if n.isidentifier():
                tops.setdefault(n, dname)
    return tops


def root_names() -> tuple[set[str], set[str]]:
    """(modules and regular packages, namespace-package portions) importable from the root."""
    regular, namespace = set(), set()
    for p in ROOT.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix == ".py" and p.stem.isidentifier():
            regular.add(p.stem)
        elif p.is_file() and (p.suffix in (".so", ".pyd")):
            regular.add(p.name.split(".")[0])
        elif p.is_dir() and p.name.isidentifier():
            (regular if (p / "__init__.py").exists() else namespace).add(p.name)
    return regular, namespace


def run_at_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_module_or_regular_package_at_the_root_has_an_installed_name():
    tops = installed_top_levels()
    assert "torch" in tops and "transformers" in tops, "the distribution scan found nothing: the test would pass vacuously"
    regular, _ = root_names()
    assert "llmsys_lab" in regular and "setup" in regular, regular
    clashes = {name: tops[name] for name in regular if name in tops}
    assert not clashes, (f"these names at the repository root hide installed packages when Python starts here: "
                         f"{clashes}; make the folder a non-package (no __init__.py) or move it into llmsys_lab/")


def test_namespace_folders_at_the_root_lose_to_installed_packages():
    """A folder without __init__.py whose name an installed package uses must import as the installed one."""
    tops = installed_top_levels()
    _, namespace = root_names()
    assert "kernels" in namespace, "kernels/ must stay a plain folder (see kernels/README.md)"
    for name in sorted(n for n in namespace if n in tops):
        out = run_at_root(f"import {name}, sys; print(getattr({name}, '__file__', None) or list({name}.__path__))")
        assert out.returncode == 0, out.stderr[-2000:]
        assert str(ROOT / name) not in out.stdout, f"`import {name}` at the root found the repository's folder: {out.stdout}"


def test_kernels_at_the_root_is_hugging_faces_and_transformers_models_import():
    code = ("import importlib.util, importlib.metadata as md\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "try:\n    md.distribution('kernels'); hf = True\nexcept md.PackageNotFoundError:\n    hf = False\n"
            "if hf:\n"
            "    import kernels\n"
            "    assert kernels.__file__ and 'site-packages' in kernels.__file__, kernels\n"
            "else:\n"
            "    assert spec is None or spec.origin is None, spec   # at most an empty namespace portion\n"
            "from transformers.models.llama import modeling_llama\n"
            "from transformers.models.mixtral import modeling_mixtral\n"
            "from transformers import LlamaForCausalLM, MixtralForCausalLM\n"
            "print('ok', hf)\n")
    out = run_at_root(code)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr[-3000:]


def test_the_kit_imports_its_kernels_from_the_package_at_the_root():
    out = run_at_root("import llmsys_lab.kernels.softmax as s, llmsys_lab.kernels as k; print(s.__file__)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).parent == ROOT / "llmsys_lab" / "kernels", out.stdout
