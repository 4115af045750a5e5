"""Package mapping of the engine distribution `spell` (the spell_core package and its subpackages).

The kernel library is a distribution of its own, built from kernels/ (kernels/pyproject.toml,
the package in kernels/spell_kernels/); the repository root holds no importable `kernels`.
Nothing here compiles: native ops (csrc/, none needed so far) are built on first use with
torch.utils.cpp_extension.load, so `pip install -e .` stays fast and never needs a compiler.
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["spell_core", "spell_core.*"]))
