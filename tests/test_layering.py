"""spell_core imports one way (docs/ARCHITECTURE.md, FLOORS in tests/layering.py), with no circles."""
from pathlib import Path

from tests.layering import FLOOR, layering_errors, module_files

REPO = Path(__file__).resolve().parents[1]


def test_spell_core_imports_only_downward_and_without_circles():
    assert layering_errors(REPO) == []


def test_every_subpackage_is_on_a_floor_and_documented():
    packages = {p.name for p in (REPO / "spell_core").iterdir() if (p / "__init__.py").exists()}
    assert packages <= set(FLOOR), packages - set(FLOOR)
    architecture = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    assert all(f"{package}/" in architecture for package in packages)


def test_training_and_rollout_spreading_import_one_way():
    """The trainer never reaches the rollouts (loop, data_parallel) or the command line; the
    distributed floor (process groups, FSDP2, context parallel) reaches neither."""
    from tests.layering import imported_modules
    files = module_files(REPO)
    trainer = imported_modules("spell_core.training.trainer", files["spell_core.training.trainer"], set(files))
    assert not {m for m in trainer if m.startswith(("spell_core.selfplay.loop", "spell_core.selfplay.data_parallel",
                                                        "spell_core.run"))}, trainer
    parallel = imported_modules("spell_core.selfplay.data_parallel", files["spell_core.selfplay.data_parallel"],
                                set(files))
    assert not {m for m in parallel if m.startswith("spell_core.training")}, parallel


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "spell_core" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {
    "__init__.py": "",
    "run.py": "from spell_core.training.trainer import Trainer\n",
    "common/__init__.py": "",
    "common/durable.py": "import os\n",
    "models/__init__.py": "",
    "models/model.py": "from spell_core.common import durable\n",
    "training/__init__.py": "",
    "training/trainer.py": "from spell_core.models.model import CausalLM\n",
}


def test_a_clean_tree_passes(tmp_path):
    assert layering_errors(_plant(tmp_path, CLEAN)) == []


def test_an_upward_import_inside_a_function_fails(tmp_path):
    tree = dict(CLEAN)
    tree["models/model.py"] += "\n\ndef load():\n    from spell_core.training import trainer\n    return trainer\n"
    errors = layering_errors(_plant(tmp_path, tree))
    assert len(errors) == 2, errors  # the upward arrow, and the circle it closes with trainer -> model
    assert errors[0].startswith("spell_core.models.model imports spell_core.training.trainer: 'models' (floor 1) "
                                "may not import 'training'")
    assert errors[1] == "import circle: spell_core.models.model -> spell_core.training.trainer"


def test_a_common_helper_importing_the_command_line_fails(tmp_path):
    tree = dict(CLEAN)
    tree["common/durable.py"] = "from spell_core import run\n"
    errors = layering_errors(_plant(tmp_path, tree))
    assert any(e.startswith("spell_core.common.durable imports spell_core.run:") for e in errors), errors


def test_a_circle_inside_one_package_fails(tmp_path):
    tree = dict(CLEAN)
    tree["models/rope.py"] = "from spell_core.models import model\n"
    tree["models/model.py"] += "from . import rope\n"  # a relative import counts too
    assert layering_errors(_plant(tmp_path, tree)) == ["import circle: spell_core.models.model -> spell_core.models.rope"]


def test_a_package_on_no_floor_fails(tmp_path):
    tree = dict(CLEAN)
    tree["moe/__init__.py"] = ""
    tree["moe/router.py"] = "import torch\n"
    errors = layering_errors(_plant(tmp_path, tree))
    assert errors and all("package 'moe' is on no floor" in e for e in errors), errors
