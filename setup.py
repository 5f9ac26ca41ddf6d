"""Package discovery (the rest of the metadata is in pyproject.toml).

Every package under llmsys_lab/ is found, so a new subpackage cannot be left out of a wheel.
Two folders live at the top of the repository but are installed inside the package:
kernels/ (one file per Triton kernel) as llmsys_lab.kernels, and benchmarks/results/ (the
stored GPU measurements lessons show on machines without a large GPU) as llmsys_lab.results.
"""
from setuptools import find_packages, setup

MAPPED = {"llmsys_lab.kernels": "kernels", "llmsys_lab.results": "benchmarks/results"}

setup(packages=find_packages(include=["llmsys_lab", "llmsys_lab.*"]) + list(MAPPED), package_dir=MAPPED)
