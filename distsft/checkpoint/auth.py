"""Checkpoints this run's owner wrote, told from those someone else did: an HMAC of every manifest.

A manifest proves a checkpoint whole (every file's size and sha256), but anyone who can write to
``storage_path`` (a shared NFS directory, a bucket) can also rewrite the manifest. So the manifest
is signed with HMAC-SHA256 under a key only the run's owner holds, and a manifest whose signature
does not match is refused: resume skips it for the newest checkpoint that does, with one line;
export, resharding and an explicit ``checkpoint.resume`` refuse it with one line; rotation keeps it.

The key is, in order: ``$DISTSFT_CHECKPOINT_KEY``; the file ``$DISTSFT_CHECKPOINT_KEY_FILE``; or
``~/.config/distsft/checkpoint.key`` (``$XDG_CONFIG_HOME``), made at first need with 256 random bits,
mode 0600. A key file others can read is refused, as ssh refuses such a private key. Ray workers get
the driver's key with the run's secrets (``launcher/ray_train.worker_secrets``), never from their own
node. Checking is on unless turned off explicitly (``checkpoint.authenticate: false``, ``distsft export
--no-authenticate``, or ``DISTSFT_CHECKPOINT_AUTH=off``); off, manifests are neither signed nor checked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from distsft.errors import ConfigError

ENV_KEY = "DISTSFT_CHECKPOINT_KEY"
ENV_KEY_FILE = "DISTSFT_CHECKPOINT_KEY_FILE"
ENV_SWITCH = "DISTSFT_CHECKPOINT_AUTH"
FIELD = "hmac"
"""The manifest's field that holds the signature (hex HMAC-SHA256 of the rest of the manifest)."""


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


def turn_off() -> None:
    """For this process and the workers it starts (``worker_env``): an explicit setting, never a default."""
    os.environ[ENV_SWITCH] = "off"


def key_file() -> Path:
    if os.environ.get(ENV_KEY_FILE):
        return Path(os.environ[ENV_KEY_FILE]).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser()
    return config / "distsft" / "checkpoint.key"


def key() -> bytes | None:
    """The signing key, made on first need; None when checking is off."""
    if not enabled():
        return None
    if os.environ.get(ENV_KEY):
        return os.environ[ENV_KEY].strip().encode()
    path = key_file()
    try:
        if not path.exists() and not os.environ.get(ENV_KEY_FILE):
            _create(path)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"checkpoint key {path}: mode {stat.S_IMODE(mode):04o} lets others read it; chmod 600 {path}"
            )
        text = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(
            f"checkpoint key {path}: {e.strerror or e}; set {ENV_KEY} (or {ENV_KEY_FILE}) to a key, or "
            "checkpoint.authenticate=false to use checkpoints without checking who wrote them"
        ) from None
    if not text:
        raise ConfigError(f"checkpoint key {path}: the file is empty")
    return text.encode()


def _create(path: Path) -> None:
    """A new random key at ``path``, atomically: two processes making it at once end with one key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    try:
        os.link(tmp, path)  # fails if another process made it first: theirs is the key
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def worker_env() -> dict[str, str]:
    """What a worker on another node needs to sign and check as this process does."""
    k = key()
    return {ENV_SWITCH: "off"} if k is None else {ENV_KEY: k.decode(), ENV_SWITCH: "on"}


def _mac(k: bytes, manifest: dict[str, Any]) -> str:
    body = {name: value for name, value in manifest.items() if name != FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hmac.new(k, text.encode(), hashlib.sha256).hexdigest()


def sign(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its signature (unchanged when checking is off)."""
    k = key()
    return manifest if k is None else {**manifest, FIELD: _mac(k, manifest)}


def problem(manifest: dict[str, Any]) -> str | None:
    """Why ``manifest`` is not one this key signed, or None when it is (or checking is off)."""
    k = key()
    if k is None:
        return None
    got = manifest.get(FIELD)
    if not isinstance(got, str):
        return "its manifest is not signed (written with checking off, or by an older distsft, or by someone else)"
    if not hmac.compare_digest(got, _mac(k, manifest)):
        return "its manifest's signature does not match this key (rewritten, or signed with another key)"
    return None


HOW_TO_ACCEPT = (
    f"if you wrote it, set {ENV_KEY} to the key it was written with, or turn checking off for this "
    "run (checkpoint.authenticate=false; export: --no-authenticate)"
)
