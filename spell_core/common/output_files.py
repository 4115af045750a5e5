"""Output paths a command may write: a folder proven writable, a file that is none of the
command's inputs and replaces no earlier result unless asked (`--overwrite`)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


class RunFolderError(ValueError):
    """--out cannot be used for this run; the message says what to do."""


class InputError(ValueError):
    """An input or output option that cannot be used as given; the message says what to do."""


def check_writable_folder(out: Path, flag: str = "--out") -> Path:
    """Create `out` if needed and prove a file can be written in it; RunFolderError otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{flag} {out} is a file, not a folder: pass a folder for the run (it is created "
                             "when missing)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunFolderError(f"{flag} {out}: {parent} is a file, so no folder can be made under it; "
                                     "pick another path")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".spell-write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunFolderError(f"{flag} {out} is not writable ({err.strerror or err}): pick a folder you can "
                             "write to") from None
    return out


def check_output_file(out, inputs: Iterable[tuple[str, object]], *, overwrite: bool, flag: str = "--out",
                      what: str = "the results", example: str = "results.json") -> Path:
    """`out` as a file the command may write: not a folder, its folder writable (created when
    missing), none of `inputs` ((option, path) pairs), and new unless `overwrite`."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise InputError(f"{flag} {out} is a folder: pass a file name for {what}, e.g. {out / example}")
    file_above = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if file_above is not None:
        raise InputError(f"{flag} {out}: {file_above} is a file, so no folder can be made under it; pick another path")
    for option, path in inputs:
        if path is not None and _same_file(out, Path(path)):
            raise InputError(f"{flag} {out} is the {option} file: writing {what} there would destroy it; pass "
                             f"another {flag}")
    if out.exists() and not overwrite:
        raise InputError(f"{flag} {out} already exists (an earlier result?): pass --overwrite to replace it, or "
                         f"another {flag}")
    check_writable_folder(out.parent if str(out.parent) else Path("."), flag=f"{flag} {out}: folder")
    return out


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return a.samefile(b)  # hard links and symlinks too
    return a.resolve() == b.resolve()
