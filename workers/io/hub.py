"""Hugging Face hub sources: ``hf://org/name[@revision]`` pinned to a commit, read from the cache.

The driver resolves the revision to its commit sha and fetches only safetensors, config and
tokenizer files into the huggingface_hub cache (``hub.cache_dir``; nothing is fetched when
``hub.offline``); workers then read the local snapshot by byte ranges like any folder. The token
comes from the environment (``HF_TOKEN``) or huggingface_hub's own login, never from the config.
"""

from __future__ import annotations

import os
import re

from workers.io.errors import StorageError
from workers.io.storage import LocalStore

ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_URI = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def is_hub_uri(uri: str) -> bool:
    return uri.startswith("hf://")


def resolve(uri: str, cache_dir: str | None, offline: bool) -> tuple[LocalStore, str]:
    """The local snapshot of a hub source and the commit sha it is pinned to."""
    m = _URI.match(uri)
    if not m or ".." in m["repo"]:
        raise StorageError(f"{uri}: expected hf://org/name or hf://org/name@revision")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = snapshot_download(m["repo"], revision=m["revision"] or "main",
                                 cache_dir=cache_dir, local_files_only=offline,
                                 allow_patterns=ALLOW_PATTERNS)
    except LocalEntryNotFoundError:
        where = cache_dir or "the default huggingface_hub cache"
        raise StorageError(f"{uri}: not in {where}" + (
            " and hub.offline is true" if offline else " and the hub cannot be reached")
        ) from None
    except RevisionNotFoundError:
        raise StorageError(f"{uri}: revision {m['revision']!r} does not exist") from None
    except RepositoryNotFoundError:
        raise StorageError(f"{uri}: repository not found, or private without a token "
                           "(set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise StorageError(f"{uri}: hub error {e}") from None
    return LocalStore(str(path)), os.path.basename(os.path.normpath(path))


_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_repo_id(repo_id: str) -> bool:
    return bool(_REPO.match(repo_id)) and ".." not in repo_id


def push(folder: str, repo_id: str, message: str) -> str:
    """Upload a finished output folder (shards, index, config, tokenizer, model card,
    manifest) as one commit to a model repository, creating it if needed; return the commit
    URL. The token comes from HF_TOKEN or huggingface_hub's login; HF_ENDPOINT picks the hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                                 commit_message=message,
                                 ignore_patterns=["raymerge-progress.json", "*.raymerge-partial",
                                                  ".raymerge-lock"])
    except HfHubHTTPError as e:
        raise StorageError(f"push to hf://{repo_id} failed: {e}") from None
    return info.commit_url
