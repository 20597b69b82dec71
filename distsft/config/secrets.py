"""Which configured values are secrets, and how they are kept out of sight.

A value is a secret when its key's name says so (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``,
``WANDB_API_KEY``, ``*_PASSWORD``, ...) or when the cluster file's ``secret_env`` names it. Secrets are never
printed (config errors name the key and the problem, never the value) and never handed to Ray as a
``runtime_env``, which Ray writes in clear into its session logs and shows on its dashboard: the launcher
sends them to the workers with the run's own arguments and each worker sets them before any training
code runs (``launcher/worker.py``). Variables a process reads as it starts (``LD_LIBRARY_PATH``,
``OMP_NUM_THREADS``, ``HF_HOME``) are not secrets and keep going through the ``runtime_env``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSW|PASSPHRASE|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY|AUTH|COOKIE|SESSION|SIGNATURE|"
    r"CONNECTION_STRING|(^|_)SAS($|_)|(^|_)KEY$|DSN$",
    re.IGNORECASE,
)
"""Names whose values are taken for secrets (matched anywhere in the name, case-insensitively)."""


def looks_secret(name: str) -> bool:
    """Whether the key ``name`` (a variable's name, or a config key's last part) likely holds a secret."""
    return bool(SECRET_NAME.search(name))


def split_env(env: Mapping[str, str], also: Iterable[str] = ()) -> tuple[dict[str, str], dict[str, str]]:
    """``env`` as (public, secret): the second holds the variables that look like secrets or are named in
    ``also``; only the first may go where others can read it (a Ray ``runtime_env``)."""
    named = set(also)
    public = {k: v for k, v in env.items() if k not in named and not looks_secret(k)}
    return public, {k: v for k, v in env.items() if k not in public}
