"""Checks of a command's inputs and outputs that need files but no model, run before any model
loads: a bad input fails in seconds, not after minutes of loading, and nothing the user made is
lost.

- an output is never one of the inputs (resolved paths compared), and a run folder neither holds
  an input nor lies inside one (`--overwrite` would move the input aside; a run folder inside a
  corpus folder would be read as documents by the next run);
- an output file is never silently replaced: an existing one needs `--overwrite`;
- `run --resume` needs a complete checkpoint, found before anything is written;
- `run`'s corpus is read here (its files, fields and lines) and every `--tasks PREFIX=TYPES`
  rule must match at least one document.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from spell_core.common.output_files import InputError, RunFolderError, check_output_file  # noqa: F401 (re-exported)


# ----------------------------------------------------------------------------- run


def check_run_inputs(config, args) -> None:
    """`run`: a missing --model named first, --out apart from every input, and --resume with a
    checkpoint to resume from."""
    import os

    from spell_core.models.assets import resolve_model

    if os.environ.get("RANK", "0") == "0":  # as the run folder's claim: rank 0 of a torchrun job fetches it
        resolve_model(config.model.name)
    out = Path(config.out).expanduser()
    corpora = config.data.corpus if isinstance(config.data.corpus, list) else [config.data.corpus]
    inputs = [("--model", config.model.name), *(("--corpus", c) for c in corpora),
              ("--eval-data", getattr(args, "eval_data", None))]
    check_folder_apart(out, inputs)
    check_resume(out, args.resume)


def check_folder_apart(out: Path, inputs: Iterable[tuple[str, object]], flag: str = "--out") -> None:
    """A run folder is not an input, holds none, and lies inside none (only local paths are
    compared: aliases and hub ids live in their caches)."""
    where = out.resolve()
    for option, given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        path = Path(given).expanduser().resolve()
        if where == path:
            relation = f"is the {option} {given}"
        elif where in path.parents:
            relation = f"holds the {option} {given} (--overwrite would move it aside with the old run)"
        elif path in where.parents:
            relation = (f"lies inside the {option} {given}" + (" (the run's .jsonl logs would be read as documents "
                                                               "by the next run)" if option == "--corpus" else ""))
        else:
            continue
        raise InputError(f"{flag} {out} {relation}: a run folder must be apart from its inputs; pick an {flag} "
                         "outside them")


def check_resume(out: Path, resume: str | None) -> None:
    """--resume (the latest complete checkpoint in `out`) or --resume PATH, before anything is
    written: a folder with nothing to resume gets no config.json and no lock file."""
    from spell_core.training import train_state
    from spell_core.cli.run_folder import holds_a_run

    if resume is None:
        return
    if resume == "latest":
        if train_state.find_latest(out) is None:
            holder = _lock_holder(out)
            if holder is not None:  # a run still working towards its first checkpoint: say that instead
                raise RunFolderError(f"{out} is in use by another run (pid {holder}); wait for it to end, stop it, "
                                     "or pick another --out")
            started = out.is_dir() and holds_a_run(out)
            fresh = "--overwrite instead of --resume" if started else "without --resume"
            raise RunFolderError(f"--resume: no complete checkpoint in {out}; start it again ({fresh}), or pass a "
                                 "checkpoint folder: --resume PATH")
        return
    path = Path(resume).expanduser()
    complete = path.is_dir() and ((path / train_state.COMPLETE).is_file() or train_state.find_latest(path) is not None)
    if not complete:
        state = "does not exist" if not path.exists() else "is not a complete training checkpoint"
        raise RunFolderError(f"--resume {resume}: {path} {state}; pass a run's --out folder or one of its "
                             f"{train_state.CHECKPOINTS}/step-NNNNNN folders (with a {train_state.COMPLETE} marker)")


def _lock_holder(out: Path) -> str | None:
    """The pid in out/.spell-run.lock while another process holds it, else None (nothing written)."""
    import fcntl
    import os

    from spell_core.cli.run_folder import LOCK_FILE

    try:
        fd = os.open(Path(out) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # drops a shared lock taken here


def run_documents(config) -> list:
    """The corpus's documents with their task types (`--tasks`), read before the model loads; a
    `--tasks PREFIX=TYPES` rule that matches no document's source name is an error."""
    from spell_core.data.corpus_tables import load_corpus
    from spell_core.data.documents import CorpusError
    from spell_core.data.task_types import TaskRules

    documents = load_corpus(config.data.corpus, text_field=config.data.text_field,
                            cluster_field=config.data.cluster_field)
    rules = TaskRules.parse(config.data.tasks)
    rules.apply(documents)
    sources = sorted({doc.data_source for doc in documents})
    for prefix, types in rules.prefixes.items():
        if not any(source.startswith(prefix) for source in sources):
            shown = ", ".join(repr(s) for s in sources[:5]) + (f", ... ({len(sources)} in all)" if len(sources) > 5
                                                                else "")
            raise CorpusError(f"--tasks {prefix}={','.join(types)}: no document's source name starts with {prefix!r}; "
                              f"the corpus's source names are {shown} (the field data_source, else the file path "
                              "without its suffix); correct the prefix, or drop the rule")
    return documents
