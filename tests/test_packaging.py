"""The installed layout: kernels/ is the spell-kernels distribution, importable as spell_kernels
only; no folder of ours shadows a distribution's import name (transformers >= 5.25 imports the PyPI
package `kernels`); and the kernel library never pulls in the engine (another trainer must be able
to use it alone)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path | str = "/", env: dict | None = None) -> subprocess.CompletedProcess:
    # by default from a neutral directory, so the repository root is not on sys.path
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_kernels_folder_installs_as_spell_kernels_not_bare_kernels():
    proc = _run(
        "import importlib.util, pathlib, spell_kernels\n"
        "print(pathlib.Path(spell_kernels.__file__).resolve().parent)\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(None if spec is None else spec.origin)\n")
    assert proc.returncode == 0, proc.stderr
    package_dir, bare = proc.stdout.split()
    assert Path(package_dir) == REPO / "kernels" / "spell_kernels"
    assert bare == "None" or not Path(bare).resolve().is_relative_to(REPO / "kernels"), f"bare 'kernels' resolves to {bare}"


def test_from_the_repository_root_bare_kernels_is_the_installed_distribution(tmp_path):
    """`python -m spell_core.run` and pytest run with the repository root first on sys.path: a
    distribution named `kernels` (here a stand-in on PYTHONPATH, behind the root) must still win."""
    stand_in = tmp_path / "kernels"
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text("class CUDAProperties: pass\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = _run("import kernels; from kernels import CUDAProperties; print(kernels.__file__)", cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == stand_in / "__init__.py"


def test_from_the_repository_root_a_transformers_model_class_imports():
    """transformers >= 5.25 imports the PyPI `kernels` as soon as a model class is touched."""
    proc = _run(
        "import importlib.metadata as md, importlib.util, pathlib\n"
        "from transformers import Qwen2ForCausalLM, LlamaForCausalLM\n"
        "try:\n"
        "    md.distribution('kernels')\n"
        "except md.PackageNotFoundError:\n"
        "    print('not-installed')\n"
        "else:\n"
        "    import kernels\n"
        "    print(pathlib.Path(kernels.__file__).resolve())\n", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    where = proc.stdout.strip().splitlines()[-1]
    if where != "not-installed":
        assert "site-packages" in Path(where).parts, where
        assert not Path(where).is_relative_to(REPO / "kernels"), where  # the venv may live in the repository (.venv)


def test_no_top_level_folder_is_a_package_named_like_an_installed_distribution():
    """A regular package (a folder with __init__.py) at the repository root is importable from the
    root, ahead of site-packages: its name must not be any installed distribution's import name."""
    import importlib.metadata

    ours = {"spell", "spell-kernels"}
    taken = {name: dists for name, dists in importlib.metadata.packages_distributions().items()
             if not set(dists) <= ours}
    folders = [p for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert folders, "the scan found no package at the root (spell_core should be there)"
    clashes = {p.name: taken[p.name] for p in folders if p.name in taken}
    assert not clashes, f"top-level folders shadow installed distributions: {clashes}"


def test_the_engine_depends_on_the_kernel_distribution_and_kernels_need_no_engine_dependency():
    import tomllib

    engine = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    kernels = tomllib.loads((REPO / "kernels" / "pyproject.toml").read_text())["project"]
    assert kernels["name"] == "spell-kernels"
    assert "spell-kernels" in engine["dependencies"]
    kernel_deps = {d.split(";")[0].split(">")[0].split("=")[0].strip() for d in kernels["dependencies"]}
    assert kernel_deps == {"torch", "triton", "numpy"}


def test_spell_kernels_never_imports_the_engine():
    proc = _run(
        "import sys, torch, spell_kernels\n"
        "for name in spell_kernels.__all__: getattr(spell_kernels, name)\n"
        "import spell_kernels.integrations.transformers\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'spell_core'))\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
