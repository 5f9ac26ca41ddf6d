"""Package discovery (the rest of the metadata is in pyproject.toml).

Every package under llmsys_lab/ is found (the Triton kernels among them, in llmsys_lab/kernels/), so a
new subpackage cannot be left out of a wheel. One folder lives at the top of the repository but is
installed inside the package: benchmarks/results/ (the stored GPU measurements lessons show on
machines without a large GPU) as llmsys_lab.results. Nothing at the repository root is a regular
Python package: see kernels/README.md for why.
"""
from setuptools import find_packages, setup

MAPPED = {"llmsys_lab.results": "benchmarks/results"}

setup(packages=find_packages(include=["llmsys_lab", "llmsys_lab.*"]) + list(MAPPED), package_dir=MAPPED)
