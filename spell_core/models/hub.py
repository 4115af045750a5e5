"""`--model Org/Name[@revision]`: a Hugging Face Hub model, through huggingface_hub.

The snapshot comes from huggingface_hub's own cache (`HF_HUB_CACHE`, `HF_HOME`), downloaded
there on first use; with `HF_HUB_OFFLINE=1`, or without network, a cached snapshot is used as
is. Only the files a checkpoint folder needs are fetched (config, safetensors, tokenizer).
"""
from __future__ import annotations

import re
from pathlib import Path

from spell_core.models.asset_error import AssetError

# Org/Name as the Hub spells repository ids, optionally @revision (a branch, tag or commit)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def is_hub_id(text: str) -> bool:
    """Whether `text` reads as `Org/Name` or `Org/Name@revision` (not a path like ./x or /x/y)."""
    return _HUB_ID.match(text) is not None and not text.startswith((".", "/", "~"))


def split_hub_id(text: str) -> tuple[str, str | None]:
    match = _HUB_ID.match(text)
    if match is None:
        raise AssetError(f"{text!r} is not a Hugging Face Hub id: write Org/Name or Org/Name@revision")
    return match["repo"], match["revision"]


def resolve_hub_model(text: str) -> Path:
    """The local snapshot folder of a Hub model id (downloaded into huggingface_hub's cache once)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, revision = split_hub_id(text)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_CHECKPOINT_FILES))
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached")
        raise AssetError(
            f"model {text!r}: {why} and the Hugging Face cache ({constants.HF_HUB_CACHE}) holds no copy of "
            f"{repo_id}{'@' + revision if revision else ''}. Download it where there is network "
            f"(`hf download {repo_id}{' --revision ' + revision if revision else ''}`) and copy the cache, "
            "or pass the path of a local checkpoint folder (config.json, *.safetensors, tokenizer files) to --model"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise AssetError(f"model {text!r}: {type(err).__name__}: the Hub has no such model or revision "
                         "(or it is private: log in with `hf auth login`)") from None
    except HfHubHTTPError as err:
        raise AssetError(f"model {text!r}: the Hugging Face Hub answered {err}") from None
    if not (folder / "config.json").is_file():
        raise AssetError(f"model {text!r}: the snapshot {folder} has no config.json; it is not a transformers "
                         "checkpoint")
    return folder
