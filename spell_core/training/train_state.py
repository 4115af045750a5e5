"""Training checkpoints: save, find the latest complete one, resume.

    out/checkpoints/step-000123/
        config.json, model.safetensors, tokenizer files   the model, HF format (transformers loads it)
        optimizer.pt                                      optimizer.state_dict() (keyed by parameter
                                                          name when saved by several ranks)
        rng.pt                                            python, numpy, torch CPU (+ CUDA), named generators
        state.json                                        {"step": 123, "extra": {...}}
        COMPLETE                                          written last
    out/checkpoints/latest -> step-000123                 symlink, a convenience for people and --model

A checkpoint is written into a hidden temporary folder, fsync'ed, marked COMPLETE and only then
renamed to step-NNNNNN; older checkpoints are pruned after that (the newest `keep_last` stay).
`find_latest` trusts nothing but the marker: the highest step folder holding COMPLETE. So a
process killed at any moment leaves the previous checkpoint loadable as the latest, and at
worst a temporary folder that the next save, or `tidy` at the next start, removes. A checkpoint is
never written from NaN/Inf weights; `load` reads and checks every file before applying any, naming
a corrupt one, and `load_usable` then falls back to the next older complete checkpoint.

Any world size. A model sharded with FSDP2 (spell_core/distributed/sharded_training.py) is saved by every
rank calling `save`: the full weights and the full, unsharded optimizer state are gathered to
rank 0 (torch.distributed.checkpoint.state_dict, full_state_dict + cpu_offload), which writes
the same files as a single process; the random states are rank 0's. `load` on a sharded model
reads on rank 0 and broadcasts. The optimizer state is keyed by parameter index (one process)
or by parameter name (several); `load` takes either, so a run saved on N ranks resumes on M.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from spell_core.models import checkpoint as ckpt
from spell_core.common import durable
from spell_core.models.model import CausalLM, hf_tensors, read_weights, save_pretrained

__all__ = ["save", "load", "load_usable", "tidy", "find_latest", "list_checkpoints", "checkpoint_dir", "CHECKPOINTS", "COMPLETE"]

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
    if _is_sharded(model):
        return _save_from_ranks(out_dir, step, model, tokenizer, optimizer, state_text, generators, keep_last)
    _refuse_non_finite(model.state_dict(), step)
    return _write(out_dir, step, lambda folder: save_pretrained(model, tokenizer, folder),
                  None if optimizer is None else optimizer.state_dict(), state_text, generators, keep_last,
                  tensor_bytes(model.state_dict()))


def _write(out_dir, step: int, write_model, optimizer_state: dict | None, state_text: str,
           generators: dict[str, torch.Generator] | None, keep_last: int, size_hint: int = 0) -> Path:
    """size_hint: bytes of the model's tensors (with the optimizer state, added here), for the message
    when the disk fills up."""
    size_hint += tensor_bytes(optimizer_state)
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(out_dir, step)
    tmp = durable.temporary_sibling(final)
    try:
        write_model(tmp)  # creates tmp (itself atomically)
        if optimizer_state is not None:
            _save_torch(optimizer_state, tmp / OPTIMIZER)
        _save_torch(_rng_state(generators or {}), tmp / RNG)
        durable.write_text(tmp / STATE, state_text + "\n")
        durable.write_text(tmp / COMPLETE, f"step {step}\n")
        durable.fsync(tmp)
        durable.replace_folder(tmp, final)  # the same step saved again: the old folder goes once tmp is in place
    except BaseException as err:
        written = _folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and _is_disk_full(err):
            raise ckpt.CheckpointError(_disk_full_message(out_dir, step, written, size_hint)) from err
        raise
    durable.fsync(root)
    _point_latest(root, final.name)
    _prune(out_dir, root, keep_last, final)
    return final


def load(path, model: CausalLM, optimizer: torch.optim.Optimizer | None = None, *,
         generators: dict[str, torch.Generator] | None = None, restore_rng: bool = True) -> tuple[int, dict]:
    """Restore weights (in place, into the model's own parameters: an optimizer built on them
    stays valid), optimizer state and random states from a checkpoint folder, or from the
    latest complete checkpoint when `path` is a run's out_dir. Returns (step, extra)."""
    if _is_sharded(model):
        return _load_into_ranks(path, model, optimizer, generators, restore_rng)
    folder = _resolve(Path(path))
    # every file is read (and checked) before anything is applied: a corrupt file leaves the model as it was
    expected = {name: t.shape for name, t in model.state_dict().items()}
    tensors = read_weights(folder, expected)
    optimizer_state = None
    if optimizer is not None:
        optimizer_state = _read_optimizer(folder, next(model.parameters()).device)
        if _keyed_by_name(optimizer_state):  # saved by several ranks
            optimizer_state = _by_index(optimizer_state, _trainable_names(model), optimizer)
    rng = _read(folder / RNG, lambda f: torch.load(f, weights_only=True)) if restore_rng else None
    state = _read_state(folder)
    model.load_state_dict(tensors, strict=True)  # copies, casting to each parameter's dtype and device
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    if restore_rng:
        _set_rng_state(rng, generators or {}, folder)
    return int(state["step"]), state.get("extra", {})


def load_usable(out_dir, model: CausalLM, optimizer: torch.optim.Optimizer | None = None,
                report=print, **kwargs) -> tuple[Path, int, dict]:
    """`load` from the newest complete checkpoint of a run that reads back whole; a newer one with a
    corrupt or truncated file is reported (file named) and the next older one tried.
    Returns (folder, step, extra)."""
    found = list_checkpoints(out_dir)
    if not found:
        raise ckpt.CheckpointError(f"no complete checkpoint under {Path(out_dir) / CHECKPOINTS}")
    problems = []
    for _, folder in reversed(found):
        try:
            step, extra = load(folder, model, optimizer, **kwargs)
        except ckpt.CheckpointError as err:
            problems.append(str(err))
            report(f"spell: checkpoint {folder.name} is unusable: {err}")
            continue
        if problems:
            report(f"spell: falling back to the older complete checkpoint {folder}")
        return folder, step, extra
    raise ckpt.CheckpointError(f"no usable checkpoint under {Path(out_dir) / CHECKPOINTS}: every one has a corrupt "
                               f"file ({'; '.join(problems)})")


def _read(path: Path, reader):
    """reader(path), any failure a CheckpointError naming the file."""
    if not path.is_file():
        raise ckpt.CheckpointError(f"{path} is missing: the checkpoint is incomplete; use an older one")
    try:
        return reader(path)
    except Exception as err:  # torch.load / pickle / json / OS errors of a truncated or corrupt file
        raise ckpt.CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); "
                                   "use an older checkpoint") from err


def _read_state(folder: Path) -> dict:
    state = _read(folder / STATE, lambda f: json.loads(f.read_text()))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ckpt.CheckpointError(f"{folder / STATE} is corrupt: no integer 'step'; use an older checkpoint")
    return state


# --- several ranks (FSDP2) ---------------------------------------------------------------------

def _is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _save_from_ranks(out_dir, step, model, tokenizer, optimizer, state_text, generators, keep_last) -> Path:
    """Collective: every rank gathers, rank 0 writes, every rank returns the folder or raises."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0's CPU only
    tensors = get_model_state_dict(model, options=options)
    optimizer_state = None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            _refuse_non_finite(tensors, step)
            config = model.config.to_hf(dtype=next(iter(tensors.values())).dtype)
            write_tokenizer = (lambda folder: tokenizer.save_pretrained(folder)) if tokenizer is not None else None
            folder = _write(out_dir, step, lambda f: ckpt.save_checkpoint(f, config, hf_tensors(tensors),
                                                                          write_extra=write_tokenizer),
                            optimizer_state, state_text, generators, keep_last, tensor_bytes(tensors))
            outcome = [("saved", str(folder))]
        except Exception as err:
            dist.broadcast_object_list([("failed", f"{type(err).__name__}: {err}")], src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    status, detail = outcome[0]
    if status != "saved":
        raise ckpt.CheckpointError(f"rank 0 could not write checkpoint step {step}: {detail}")
    return Path(detail)


def _load_into_ranks(path, model, optimizer, generators, restore_rng) -> tuple[int, dict]:
    """Collective: rank 0 reads the files, every rank gets the weights and its optimizer shards."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    tensors, optimizer_state, header = {}, {}, [None]
    if dist.get_rank() == 0:
        try:
            folder = _resolve(Path(path))
            expected = {name: t.shape for name, t in model.state_dict().items()}  # global shapes
            tensors = read_weights(folder, expected)
            if optimizer is not None:
                optimizer_state = _read_optimizer(folder, "cpu")
                if not _keyed_by_name(optimizer_state):  # saved by one process
                    optimizer_state = _by_name(optimizer_state, _trainable_names(model))
            rng = _read(folder / RNG, lambda f: torch.load(f, weights_only=True)) if restore_rng else None
            header = [("read", str(folder), _read_state(folder), rng)]
        except Exception as err:
            dist.broadcast_object_list([("failed", f"{type(err).__name__}: {err}")], src=0)
            raise
    dist.broadcast_object_list(header, src=0)
    if header[0][0] != "read":
        raise ckpt.CheckpointError(f"rank 0 could not read checkpoint {path}: {header[0][1]}")
    _, folder, state, rng = header[0]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, tensors, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    if restore_rng:
        _set_rng_state(rng, generators or {}, Path(folder))
    return int(state["step"]), state.get("extra", {})


# --- optimizer state, by parameter index or by name ----------------------------------------------

def _read_optimizer(folder: Path, device) -> dict:
    from spell_core.common import guards

    if not (folder / OPTIMIZER).is_file():
        raise ckpt.CheckpointError(f"{folder} has no {OPTIMIZER}: it was saved without an optimizer")
    state = _read(folder / OPTIMIZER, lambda f: torch.load(f, map_location=device, weights_only=True))
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise ckpt.CheckpointError(f"{folder / OPTIMIZER} is not an optimizer state (corrupt?); use an older checkpoint")
    bad = guards.non_finite([(f"{k}.{n}", v) for k, s in state["state"].items() for n, v in s.items()
                             if torch.is_tensor(v)])
    if bad:
        raise ckpt.CheckpointError(f"{folder / OPTIMIZER}: optimizer state {guards.describe(bad)} holds NaN/Inf "
                                   "values; use an older checkpoint")
    return state


def _trainable_names(model) -> list[str]:
    """Parameter names in the order the Trainer hands them to its optimizer."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _keyed_by_name(state: dict) -> bool:
    return any(isinstance(k, str) for group in state["param_groups"] for k in group["params"])


def _by_name(state: dict, names: list[str]) -> dict:
    """optimizer.state_dict() (keyed by index) -> the layout get_optimizer_state_dict writes."""
    def name(i):
        if not 0 <= i < len(names):
            raise ckpt.CheckpointError(f"{OPTIMIZER} holds state for parameter #{i} but the model has "
                                       f"{len(names)} trainable parameters: it belongs to another model")
        return names[i]
    return {"state": {name(i): v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [name(i) for i in g["params"]]} for g in state["param_groups"]]}


def _by_index(state: dict, names: list[str], optimizer) -> dict:
    """The name-keyed layout -> optimizer.state_dict()'s, in the model's parameter order (tuples,
    such as AdamW's betas, come back from the gathered layout as lists: made tuples again)."""
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({n for g in state["param_groups"] for n in g["params"]} - set(index))
    if unknown:
        raise ckpt.CheckpointError(f"{OPTIMIZER} holds state for parameters the model does not have "
                                   f"({', '.join(unknown[:3])}): it belongs to another model")
    groups = []
    for group, current in zip(state["param_groups"], optimizer.param_groups):
        group = {k: tuple(v) if isinstance(v, list) and isinstance(current.get(k), tuple) else v
                 for k, v in group.items()}
        groups.append({**group, "params": [index[n] for n in group["params"]]})
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


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
    durable.fsync(path)


def _point_latest(root: Path, name: str) -> None:
    link = root / LATEST
    tmp = durable.temporary_sibling(link)
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
            _discard(path)
    remove_leftovers(out_dir)


def _discard(path: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a half-deleted folder that still
    looks complete: renamed to a hidden leftover name first (one atomic step), then removed."""
    old = durable.temporary_sibling(path, "old")
    try:
        os.replace(path, old)
    except OSError:
        return
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(out_dir) -> list[str]:
    """Delete the hidden folders (and the `latest` link's temporary) that killed saves left in
    out_dir/checkpoints; returns their names."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        if _LEFTOVER.match(path.name) or path.name.startswith(f".{LATEST}.tmp-"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def tidy(out_dir, keep_last: int = 2, keep: Path | None = None) -> list[str]:
    """At the start of a resumed run: finish what a kill interrupted. Leftover temporary folders are
    removed, checkpoints beyond the newest keep_last pruned (never `keep`, the one resumed from) and
    `latest` pointed at the newest. Returns a line per thing done."""
    done = [f"removed {name} (left by an interrupted save)" for name in remove_leftovers(out_dir)]
    complete = list_checkpoints(out_dir)
    for _, path in complete[:-keep_last]:
        if keep is None or path.resolve() != Path(keep).resolve():
            _discard(path)
            done.append(f"pruned {path.name} (only the newest {keep_last} are kept)")
    if complete:
        root = Path(out_dir) / CHECKPOINTS
        link = root / LATEST
        if not link.is_symlink() or os.readlink(link) != complete[-1][1].name:
            _point_latest(root, complete[-1][1].name)
    return done


# --- guards: non-finite weights, a full disk --------------------------------------------------------

def _refuse_non_finite(tensors: dict, step: int) -> None:
    from spell_core.common import guards

    bad = guards.non_finite(tensors)
    if bad:
        raise ckpt.CheckpointError(f"checkpoint step {step} not written: tensor(s) {guards.describe(bad)} hold NaN/Inf "
                                   "values (the older checkpoints are kept as they are)")


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) dict / list / tuple."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _folder_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _is_disk_full(err: Exception) -> bool:
    """ENOSPC / EDQUOT, also as safetensors reports them (its own error type, the OS error in the text)."""
    import errno

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left" in text or "StorageFull" in text or "os error 28" in text or "Disk quota" in text


def _disk_full_message(out_dir, step: int, written: int, size_hint: int) -> str:
    free = shutil.disk_usage(Path(out_dir)).free
    previous = list_checkpoints(out_dir)
    kept = f"the previous checkpoint ({previous[-1][1].name}) is intact" if previous else "no earlier checkpoint exists"
    needed = max(size_hint, written)
    return (f"the disk of {out_dir} is full: checkpoint step {step} needs about {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free. The partial save was removed and {kept}; free some space, then "
            "continue with --resume")
