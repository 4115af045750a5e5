"""Package mapping: the folder kernels/ installs as the import package spell_kernels.

Native ops under csrc/ are built on first use (torch.utils.cpp_extension.load); set
SPELL_BUILD_NATIVE=1 to build them ahead of time during installation instead.
"""
import os

from setuptools import setup

packages = ["spell_kernels", "spell_kernels.integrations", "spell_core", "spell_core.roles"]
package_dir = {
    "spell_kernels": "kernels",
    "spell_kernels.integrations": "kernels/integrations",
    "spell_core": "spell_core",
    "spell_core.roles": "spell_core/roles",
}

ext_modules, cmdclass = [], {}
if os.environ.get("SPELL_BUILD_NATIVE") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "spell_kernels._native_cpu",
            sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"spell_kernels": ["../csrc/*.cpp", "../csrc/*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
