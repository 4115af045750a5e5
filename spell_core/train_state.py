"""Training checkpoints: save, find the latest complete one, resume.

    out/checkpoints/step-000123/
        config.json, model.safetensors, tokenizer files   the model, HF format (transformers loads it)
        optimizer.pt                                      optimizer.state_dict()
        rng.pt                                            python, numpy, torch CPU (+ CUDA), named generators
        state.json                                        {"step": 123, "extra": {...}}
        COMPLETE                                          written last
    out/checkpoints/latest -> step-000123                 symlink, a convenience for people and --model

A checkpoint is written into a hidden temporary folder, fsync'ed, marked COMPLETE and only then
renamed to step-NNNNNN; older checkpoints are pruned after that (the newest `keep_last` stay).
`find_latest` trusts nothing but the marker: the highest step folder holding COMPLETE. So a
process killed at any moment leaves the previous checkpoint loadable as the latest, and at
worst a temporary folder that the next save removes.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from spell_core import checkpoint as ckpt
from spell_core.model import CausalLM, save_pretrained

__all__ = ["save", "load", "find_latest", "list_checkpoints", "checkpoint_dir", "CHECKPOINTS", "COMPLETE"]

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")
_LEFTOVER = re.compile(r"\.+step-\d+\..*(tmp|old)-")  # folders of interrupted saves


def checkpoint_dir(out_dir, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under out_dir, oldest first."""
    folder = Path(out_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and not path.is_symlink() and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest(out_dir) -> Path | None:
    """The complete checkpoint with the highest step under out_dir, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save(out_dir, step: int, model: CausalLM, tokenizer, optimizer: torch.optim.Optimizer | None,
         extra: dict | None = None, *, generators: dict[str, torch.Generator] | None = None,
         keep_last: int = 2) -> Path:
    """Write checkpoint `step` under out_dir/checkpoints (see the module docstring) and return its
    folder. extra: anything JSON can hold (history memory, run config, metrics so far);
    generators: torch.Generators whose states `load` restores by the same names."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the checkpoint just written), got {keep_last}")
    try:
        state_text = json.dumps({"format": FORMAT_VERSION, "step": step, "extra": extra or {}}, indent=1)
    except (TypeError, ValueError) as err:
        raise TypeError(f"extra must hold only JSON values (dict, list, str, number, bool, None): {err}; "
                        "convert objects first (e.g. to_dict())") from err
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(out_dir, step)
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_pretrained(model, tokenizer, tmp)  # creates tmp (itself atomically)
        if optimizer is not None:
            _save_torch(optimizer.state_dict(), tmp / OPTIMIZER)
        _save_torch(_rng_state(generators or {}), tmp / RNG)
        _write_text(tmp / STATE, state_text + "\n")
        _write_text(tmp / COMPLETE, f"step {step}\n")
        _fsync(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(root)
    _point_latest(root, final.name)
    _prune(out_dir, root, keep_last, final)
    return final


def load(path, model: CausalLM, optimizer: torch.optim.Optimizer | None = None, *,
         generators: dict[str, torch.Generator] | None = None, restore_rng: bool = True) -> tuple[int, dict]:
    """Restore weights (in place, into the model's own parameters: an optimizer built on them
    stays valid), optimizer state and random states from a checkpoint folder, or from the
    latest complete checkpoint when `path` is a run's out_dir. Returns (step, extra)."""
    folder = _resolve(Path(path))
    expected = {name: t.shape for name, t in model.state_dict().items()}
    tensors = ckpt.load_tensors(folder, expected)
    model.load_state_dict(tensors, strict=True)  # copies, casting to each parameter's dtype and device
    if optimizer is not None:
        if not (folder / OPTIMIZER).is_file():
            raise ckpt.CheckpointError(f"{folder} has no {OPTIMIZER}: it was saved without an optimizer")
        device = next(model.parameters()).device
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER, map_location=device, weights_only=True))
    if restore_rng:
        _set_rng_state(torch.load(folder / RNG, weights_only=True), generators or {}, folder)
    state = json.loads((folder / STATE).read_text())
    return int(state["step"]), state.get("extra", {})


def _resolve(path: Path) -> Path:
    if (path / CHECKPOINTS).is_dir():
        latest = find_latest(path)
        if latest is None:
            raise ckpt.CheckpointError(f"no complete checkpoint under {path / CHECKPOINTS}: nothing to resume "
                                       "(start without --resume, or point it at a step-NNNNNN folder)")
        return latest
    if not path.is_dir():
        raise ckpt.CheckpointError(f"checkpoint {path} does not exist: pass a run's --out folder or one of "
                                   f"its {CHECKPOINTS}/step-NNNNNN folders")
    if not (path / COMPLETE).is_file():
        latest = find_latest(path.parent.parent) if path.parent.name == CHECKPOINTS else None
        raise ckpt.CheckpointError(f"{path} is not a complete training checkpoint (no {COMPLETE} marker: its "
                                   "write was interrupted, or it is a model folder, not a training checkpoint); "
                                   f"use {latest or 'another checkpoint'}")
    return path


# --- random states ------------------------------------------------------------------------------

def _rng_state(generators: dict[str, torch.Generator]) -> dict:
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gauss)},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generators: dict[str, torch.Generator], folder: Path) -> None:
    missing = sorted(set(generators) - set(state["generators"]))
    if missing:
        raise ckpt.CheckpointError(f"{folder / RNG} holds no state for generator(s) {', '.join(missing)} "
                                   f"(it has: {', '.join(sorted(state['generators'])) or 'none'})")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- files --------------------------------------------------------------------------------------

def _save_torch(obj, path: Path) -> None:
    torch.save(obj, path)
    _fsync(path)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename tmp to final; a complete folder already there (the same step saved again) is
    replaced only once tmp is in place."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _point_latest(root: Path, name: str) -> None:
    link = root / LATEST
    tmp = root / f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.symlink(name, tmp)
        os.replace(tmp, link)
    except OSError:  # a filesystem without symlinks: find_latest does not need the link
        tmp.unlink(missing_ok=True)


def _prune(out_dir, root: Path, keep_last: int, just_written: Path) -> None:
    """Drop all but the newest keep_last complete checkpoints, and leftovers of interrupted saves."""
    complete = list_checkpoints(out_dir)
    for _, path in complete[:-keep_last]:
        if path != just_written:
            shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        if _LEFTOVER.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
