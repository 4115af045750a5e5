"""The installed layout: kernels/ is importable as spell_kernels only, and the kernel library
never pulls in the engine (another trainer must be able to use it alone)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    # from a neutral directory, so the repository root is not on sys.path
    return subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)


def test_kernels_folder_installs_as_spell_kernels_not_bare_kernels():
    proc = _run(
        "import importlib.util, pathlib, spell_kernels\n"
        "print(pathlib.Path(spell_kernels.__file__).resolve().parent)\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(None if spec is None else spec.origin)\n")
    assert proc.returncode == 0, proc.stderr
    package_dir, bare = proc.stdout.split()
    assert Path(package_dir) == REPO / "kernels"
    assert bare == "None" or not Path(bare).resolve().is_relative_to(REPO), f"bare 'kernels' resolves to {bare}"


def test_spell_kernels_never_imports_the_engine():
    proc = _run(
        "import sys, torch, spell_kernels\n"
        "for name in spell_kernels.__all__: getattr(spell_kernels, name)\n"
        "import spell_kernels.integrations.transformers\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'spell_core'))\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _spell_core_imports(path: Path) -> set[str]:
    """spell_core modules a file imports, at module level or inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spell_core"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("spell_core")}
    return {name.split(".")[1] for name in found if name.count(".") >= 1}


def test_training_and_rollout_spreading_import_one_way():
    """trainer -> sharded_training -> distributed; data_parallel (rollouts) -> sharded_training;
    the training side never reaches back to the trainer or to the rollouts."""
    core = REPO / "spell_core"
    for module in ("sharded_training", "distributed", "context_parallel"):
        imported = _spell_core_imports(core / f"{module}.py")
        assert not imported & {"trainer", "data_parallel", "loop", "run"}, (module, imported)
    assert not _spell_core_imports(core / "trainer.py") & {"data_parallel", "loop", "run"}
    assert "trainer" not in _spell_core_imports(core / "data_parallel.py")
