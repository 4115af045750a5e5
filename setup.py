"""Package mapping: the folder kernels/ installs as the import package spell_kernels.

Nothing here compiles: native ops (csrc/, none needed so far) are built on first use with
torch.utils.cpp_extension.load, so `pip install -e .` stays fast and never needs a compiler.
"""
from setuptools import setup

setup(
    packages=["spell_kernels", "spell_kernels.integrations", "spell_core", "spell_core.roles"],
    package_dir={
        "spell_kernels": "kernels",
        "spell_kernels.integrations": "kernels/integrations",
        "spell_core": "spell_core",
        "spell_core.roles": "spell_core/roles",
    },
)
