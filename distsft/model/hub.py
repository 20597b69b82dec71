"""Where a model or tokenizer named in the config comes from: a local directory, or a Hugging Face hub id.

Asked for a hub id it cannot reach, transformers retries each file for about half a minute and then ends
in a long traceback. The causes users meet (no network, a typo, a gated or private model, a missing
revision) are told apart here in seconds, with one request that is never retried, before anything heavy
starts; and a model already in the local Hugging Face cache is used from there when the hub is out of
reach.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from distsft.errors import ConfigError

PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ModelSource:
    path: str
    """A local directory, or a hub id."""
    local_files_only: bool = False
    """A hub id served from the local Hugging Face cache, because the hub cannot be reached."""

    def kwargs(self) -> dict[str, bool]:
        return {"local_files_only": True} if self.local_files_only else {}


def looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a path on this machine."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def resolve(spec: str, key: str, revision: str | None = None, probe_file: str = "config.json") -> ModelSource:
    """A local directory as it is; a hub id after checking, in seconds, that it can be loaded.

    ``key`` names the config key the value came from, so every error points at what to change.
    """
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{key}: {spec}: not a directory (a Hugging Face model directory is expected)")
        return ModelSource(str(p))
    if looks_like_path(spec):
        raise ConfigError(f"{key}: {spec}: no such directory")
    return _resolve_hub(spec, key, revision, probe_file)


@functools.cache
def _resolve_hub(repo_id: str, key: str, revision: str | None, probe_file: str) -> ModelSource:
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"{key}: {repo_id!r} is neither a local directory nor a valid hub id ({e})") from None
    cached = isinstance(try_to_load_from_cache(repo_id, probe_file, revision=revision), str)
    where = f"the local cache ({constants.HF_HUB_CACHE})"
    fix = f"point {key} at a local directory, or download it where the hub is reachable (`hf download {repo_id}`)"
    if constants.HF_HUB_OFFLINE:
        if cached:
            return ModelSource(repo_id, local_files_only=True)
        raise ConfigError(f"{key}: {repo_id}: HF_HUB_OFFLINE is set and {where} has no copy of it; {fix}")
    problem = _probe(repo_id, revision, probe_file)
    if problem is None:
        return ModelSource(repo_id)
    kind, detail = problem
    if kind == "unreachable":
        if cached:
            print(f"{key}: the hub is unreachable ({detail}); using {repo_id} from {where}", flush=True)
            return ModelSource(repo_id, local_files_only=True)
        raise ConfigError(
            f"{key}: {repo_id}: not a local directory, and the hub ({constants.ENDPOINT}) could not be reached "
            f"({detail}); HF_HUB_OFFLINE is not set and {where} has no copy of it; {fix}"
        )
    raise ConfigError(f"{key}: {repo_id}: {detail}")


def _probe(repo_id: str, revision: str | None, filename: str) -> tuple[str, str] | None:
    """One HEAD request for ``filename``, never retried: None when it is there, else (kind, reason)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, filename, revision=revision)
    try:
        response = get_session().request(
            "HEAD", url, headers=build_hf_headers(), timeout=PROBE_TIMEOUT_S, follow_redirects=False
        )
    except Exception as e:  # noqa: BLE001 - DNS, refused or timed-out connections, proxies: all "unreachable"
        return "unreachable", f"{type(e).__name__}: {e}"
    if response.status_code < 400:
        return None
    try:
        hf_raise_for_status(response)
    except GatedRepoError:
        return "gated", (
            "a gated model: accept its licence on its hub page, then log in (`hf auth login`, or HF_TOKEN in the "
            "environment and in the cluster file's env)"
        )
    except RevisionNotFoundError:
        return "revision", f"no revision {revision!r} (model.revision)"
    except RepositoryNotFoundError:
        return "missing", "no such model on the hub (check the spelling; a private model needs HF_TOKEN)"
    except EntryNotFoundError:
        return "missing", f"the hub repository has no {filename}: not a transformers model or tokenizer"
    except HfHubHTTPError as e:
        if response.status_code >= 500:
            return "unreachable", f"HTTP {response.status_code}"
        return "http", f"the hub answered HTTP {response.status_code}: {str(e).splitlines()[0]}"
    return None
