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
_REVISION = re.compile(r"^[\w./-]+$")


def is_hub_uri(uri: str) -> bool:
    return uri.startswith("hf://")


def parse_uri(uri: str) -> tuple[str, str | None]:
    """``hf://org/name[@revision]`` as (repo id, revision or None), the repo id checked by
    huggingface_hub's own validator."""
    repo, at, revision = uri[len("hf://"):].partition("@")
    if not is_hub_uri(uri) or not check_repo_id(repo) or (
            at and (not _REVISION.match(revision) or ".." in revision)):
        raise StorageError(f"{uri}: expected hf://org/name or hf://org/name@revision")
    return repo, revision or None


def resolve(uri: str, cache_dir: str | None, offline: bool) -> tuple[LocalStore, str]:
    """The local snapshot of a hub source and the commit sha it is pinned to."""
    repo, revision = parse_uri(uri)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = snapshot_download(repo, revision=revision or "main",
                                 cache_dir=cache_dir, local_files_only=offline,
                                 allow_patterns=ALLOW_PATTERNS)
    except LocalEntryNotFoundError:
        where = cache_dir or "the default huggingface_hub cache"
        raise StorageError(f"{uri}: not in {where}" + (
            " and hub.offline is true" if offline else " and the hub cannot be reached")
        ) from None
    except RevisionNotFoundError:
        raise StorageError(f"{uri}: revision {revision!r} does not exist") from None
    except RepositoryNotFoundError:
        raise StorageError(f"{uri}: repository not found, or private without a token "
                           "(set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise StorageError(f"{uri}: hub error {e}") from None
    return LocalStore(str(path)), os.path.basename(os.path.normpath(path))


def check_repo_id(repo_id: str, *, namespaced: bool = False) -> bool:
    """Whether ``repo_id`` is a valid hub repository id (``name`` or ``org/name``; with
    ``namespaced``, ``org/name`` only), by huggingface_hub's own validator."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return "/" in repo_id or not namespaced


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
