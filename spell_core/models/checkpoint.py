"""HF-format checkpoint folders: config.json + single or sharded safetensors.

Knows nothing about model architectures: the caller passes the tensor names and shapes it
expects. Every error names the file or tensor at fault and says what to do. Writes are
atomic: a folder is written under a temporary name next to its destination and renamed
into place, so an interrupted save never leaves a half-written checkpoint behind.
"""
import json
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spell_core.common import durable, guards

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as expected."""


def read_config(folder) -> dict:
    """config.json of a checkpoint folder as a dict."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint directory {folder} does not exist (or is not a directory)")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a checkpoint folder needs the model's {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def weight_files(folder) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index when sharded)."""
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path} is not a safetensors index (needs a 'weight_map'): {err}") from err
        files = {name: folder / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise CheckpointError(f"{file} is missing: {index_path} lists it as a shard")
        return files
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder} (found: {', '.join(found) or 'nothing'}); "
                          "other weight formats (.bin, .pt, .gguf) must be converted to safetensors first")


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # safetensors raises its own error types (and OSError) for bad files
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}; "
                              "re-download or re-save it") from err


def load_tensors(folder, expected: dict[str, torch.Size], device="cpu", dtype: torch.dtype | None = None,
                 ignore: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Load exactly the `expected` tensors (name -> shape) from a checkpoint folder.

    Tensors whose names match one of the `ignore` regexes are skipped silently (e.g. a
    tied LM head stored anyway); any other missing, unexpected or mis-shaped tensor raises
    CheckpointError naming it and its file.
    """
    folder = Path(folder)
    files = weight_files(folder)
    patterns = [re.compile(p) for p in ignore]
    unexpected = sorted(n for n in files if n not in expected and not any(p.search(n) for p in patterns))
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensors the model has no place for: "
                              f"{_listing(unexpected, files)}; is config.json the one these weights belong to?")
    missing = sorted(n for n in expected if n not in files)
    if missing:
        stored_in = ", ".join(sorted({f.name for f in files.values()}))
        raise CheckpointError(f"{folder}: tensors missing from the checkpoint ({stored_in}): "
                              f"{', '.join(_first(missing))}; config.json expects them")
    tensors = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"tensor {name!r} is not in {file}, though the index says so")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(expected[name]):
                        raise CheckpointError(f"tensor {name!r} in {file} has shape {shape}, but config.json "
                                              f"implies {tuple(expected[name])}")
                    tensor = f.get_tensor(name)
                    tensors[name] = tensor if dtype is None else tensor.to(dtype)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}; "
                                  "re-download or re-save it") from err
    bad = guards.non_finite(tensors)
    if bad:
        raise CheckpointError(f"{folder}: tensor(s) {guards.describe(bad)} (in {files[bad[0]].name}) hold NaN/Inf "
                              "values: the weights are corrupt or come from a diverged run; use another checkpoint")
    return tensors


def _first(names: list[str], n: int = 8) -> list[str]:
    return names[:n] + ([f"... ({len(names) - n} more)"] if len(names) > n else [])


def _listing(names: list[str], files: dict[str, Path]) -> str:
    return ", ".join(f"{n} (in {files[n].name})" if n in files else n for n in _first(names))


def save_checkpoint(folder, config: dict, tensors: dict[str, torch.Tensor],
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write config.json + safetensors (sharded with an index above `max_shard_bytes`) and
    whatever `write_extra(tmp_folder)` adds (tokenizer files), atomically: an existing
    folder is replaced only once the new one is complete."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {folder}: a file with that name exists")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = durable.temporary_sibling(folder)
    tmp.mkdir()
    try:
        _write_weights(tmp, tensors, max_shard_bytes)
        if write_extra is not None:
            write_extra(tmp)
        durable.write_text(tmp / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        durable.replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:  # a tensor larger than the limit gets its own shard
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        path = folder / name
        save_file({k: v.detach().to("cpu").contiguous() for k, v in shard.items()}, path, metadata={"format": "pt"})
        durable.fsync(path)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        durable.write_text(folder / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
