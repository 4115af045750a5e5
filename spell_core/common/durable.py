"""Crash-safe writes: files are fsync'ed before a rename makes them visible, and a folder is
built under a hidden temporary name next to its destination, then renamed into place.

Used by the model checkpoints (checkpoint.py) and the training checkpoints (train_state.py).
"""
import os
import shutil
import uuid
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (renames, new files), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    path.write_text(text)
    fsync(path)


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name next to `path`: .NAME.KIND-XXXXXXXX (KIND tmp: being built, old: being removed)."""
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


def replace_folder(new: Path, folder: Path) -> None:
    """Rename the complete folder `new` to `folder`. An existing `folder` is moved aside first and
    deleted once `new` is in place: `folder` is never a mix of the two."""
    if not folder.exists():
        os.replace(new, folder)
        return
    if not folder.is_dir():
        raise FileExistsError(f"cannot replace {folder} with a folder: a file with that name exists")
    old = temporary_sibling(folder, "old")
    os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)
