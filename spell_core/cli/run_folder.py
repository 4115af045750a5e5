"""A run folder belongs to one run.

    with claim(out, config_dict, resume=..., overwrite=..., allow_config_change=...):
        ...   # the whole run

`claim` checks `--out` before anything heavy loads (a file, under a file, not writable), takes an
exclusive lock for the run's lifetime (out/.spell-run.lock, holding the owner's pid: a second
process is refused, naming it), and then:
  - a new run (no --resume) in a folder that already holds a run is refused, unless --overwrite:
    the old run is moved aside whole (one rename, to OUT.replaced-DATE-TIME), never half;
  - --resume compares the stored config.json with the given flags: another model or corpus is
    refused, any other difference is listed and needs --allow-config-change (steps, save-every
    and the folder's own path may change freely).
The lock is an advisory flock: released by the kernel when the process dies, even by kill -9.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from spell_core.common.output_files import RunFolderError, check_writable_folder  # noqa: F401 (re-exported)

LOCK_FILE = ".spell-run.lock"
CONFIG_FILE = "config.json"
# config keys a resumed run may change without notice (the offload moves bytes, it changes no result)
FREE_TO_CHANGE = ("steps", "out", "save_every", "trainer.offload_while_sampling")
MUST_MATCH = {"model.name": "model", "data.corpus": "corpus"}


def check_free_space(out: Path, needed: int, what: str = "a checkpoint", flag: str = "--out") -> None:
    free = shutil.disk_usage(out).free
    if free < needed:
        raise RunFolderError(f"{flag} {out}: {what} needs about {needed / 2**30:.2f} GiB, only "
                             f"{free / 2**30:.2f} GiB are free on its disk; free some space or pick another {flag}")


class RunLock:
    """An exclusive flock on out/.spell-run.lock, the holder's pid written in it."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"{self.path.parent} is in use by another run (pid {holder}); wait for it to end, "
                                 "stop it, or pick another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (deleting it would race)
            self._fd = None


def holds_a_run(out: Path) -> bool:
    return any(entry.name != LOCK_FILE for entry in Path(out).iterdir())


def archive(out: Path) -> Path:
    """Move the whole folder aside in one rename: OUT.replaced-YYYYmmdd-HHMMSS next to it."""
    target = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    try:
        os.rename(out, target)
    except OSError as err:
        raise RunFolderError(f"--overwrite: cannot move the old run {out} aside to {target} ({err.strerror}); "
                             "remove it yourself, or pick another --out") from None
    return target


def config_differences(stored: dict, given: dict) -> dict[str, tuple]:
    """Flattened key -> (stored, given) for every differing value, keys in FREE_TO_CHANGE left out, and
    keys only one side has (options added or removed by another version of spell) too."""
    a, b = dict(flatten_config(stored)), dict(flatten_config(given))
    return {k: (a[k], b[k]) for k in sorted(set(a) & set(b))
            if k not in FREE_TO_CHANGE and not _same(k, a[k], b[k])}


def check_resume_config(out: Path, given: dict, allow_change: bool, report=print) -> None:
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        return  # nothing to compare against (a folder from before config.json, or --resume PATH elsewhere)
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        report(f"spell: {path} is unreadable ({err}); the flags cannot be checked against the stored run")
        return
    differences = config_differences(stored, given)
    for key, what in MUST_MATCH.items():
        if key in differences:
            old, new = differences[key]
            raise RunFolderError(f"--resume: the run in {out} was trained on {what} {old!r}, not {new!r}: resume "
                                 f"with --{what} {old}, or start a new run (another --out, or --overwrite)")
    if not differences:
        return
    listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differences.items())
    if not allow_change:
        raise RunFolderError(f"--resume: these options differ from the stored run ({path}): {listing}. Give the same "
                             "values, or pass --allow-config-change to continue with the new ones")
    report(f"spell: resuming with changed options (--allow-config-change): {listing}")


@contextlib.contextmanager
def claim(out, config: dict, *, resume: bool, overwrite: bool, allow_config_change: bool, report=print):
    """Own `out` for the duration of the with block (see the module docstring)."""
    out = check_writable_folder(Path(out))
    lock = RunLock(out).acquire()
    try:
        if resume:
            check_resume_config(out, config, allow_config_change, report)
        elif holds_a_run(out):
            if not overwrite:
                raise RunFolderError(f"--out {out} already holds a run: continue it with --resume, replace it with "
                                     "--overwrite (the old run is moved aside, not deleted), or pick another --out")
            moved = archive(out)
            out.mkdir()
            old, lock = lock, RunLock(out).acquire()
            old.release()
            report(f"spell: --overwrite: the old run was moved to {moved} (delete it when no longer needed)")
        yield out
    finally:
        lock.release()


def flatten_config(values: dict, prefix: str = ""):
    """(dotted key, value) pairs of a nested dict."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from flatten_config(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _same(key: str, a, b) -> bool:
    if isinstance(a, list) or isinstance(b, list):  # tuples come back from JSON as lists
        return list(a or []) == list(b or [])
    if key in MUST_MATCH and isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b
