"""Recipes: run configs for the model families people fine-tune, shipped in the package together with the
cluster files their launch commands name and the architecture files (``configs/models/<name>/config.json``)
their ``--dry-run`` plans from, so that a plan needs neither weights nor the Hub.

In a checkout, the top-level ``configs/`` and ``cluster/`` are symlinks to the directories here. A recipe's
header (its leading comment lines) says what it is (first line), the one command that launches it (the
``distsft launch`` line) and what its dry run prints per GPU (the ``--dry-run:`` line); ``distsft recipes``
lists them, and ``distsft recipes NAME --out DIR`` copies one with its cluster and architecture files into DIR
in the layout its command expects (``configs/NAME.yaml``, ``cluster/X.yaml``, ``configs/models/...``), so that
the command runs there as written.

Imports only ``errors`` of distsft (and yaml): data files and their headers, nothing that trains.
"""

from __future__ import annotations

import difflib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from distsft.errors import ConfigError

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
CLUSTERS = HERE / "cluster"
COMMAND = re.compile(r"distsft launch(?:\s+--(?:config|cluster)\s+\S+)*")


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str
    """The header's first line."""
    command: str
    """The one command that launches it, from a checkout or from a copy (paths relative to either)."""
    cluster: str | None
    """The cluster file its command names (``cluster/X.yaml``); None: a Ray instance of its own."""
    model: str
    architecture: str | None
    """``model.config_path`` when it is one of the shipped architecture files (``configs/models/...``)."""
    memory: str
    """What the header says the dry run prints per GPU (``--dry-run:`` line), or ``""``."""

    def files(self) -> list[tuple[Path, str]]:
        """(shipped file, path relative to the directory the command runs in) for everything the command needs."""
        out = [(self.path, f"configs/{self.path.name}")]
        if self.cluster:
            out.append((CLUSTERS / self.cluster.removeprefix("cluster/"), self.cluster))
        if self.architecture:
            out.append((CONFIGS / self.architecture.removeprefix("configs/"), self.architecture))
        return out


def _header(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def read(path: Path) -> Recipe:
    text = path.read_text(encoding="utf-8")
    header = _header(text)
    description = header[0].rstrip(":") if header else ""
    command = next((m.group(0) for line in header if (m := COMMAND.match(line))), None)
    command = command or f"distsft launch --config configs/{path.name}"
    cluster = re.search(r"--cluster\s+(\S+)", command)
    memory = next((line.removeprefix("--dry-run:").strip() for line in header if line.startswith("--dry-run:")), "")
    model = (yaml.safe_load(text) or {}).get("model") or {}
    arch = model.get("config_path")
    return Recipe(
        name=path.stem,
        path=path,
        description=description,
        command=command,
        cluster=cluster.group(1) if cluster else None,
        model=str(model.get("path", "demo")),
        architecture=arch if isinstance(arch, str) and arch.startswith("configs/models/") else None,
        memory=memory,
    )


def recipes() -> list[Recipe]:
    return [read(p) for p in sorted(CONFIGS.glob("*.yaml"))]


def find(name: str) -> Recipe:
    known = {r.name: r for r in recipes()}
    name = name.removesuffix(".yaml")
    if name in known:
        return known[name]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]}?" if close else "`distsft recipes` lists them"
    raise ConfigError(f"no recipe {name!r}; {hint}")


def copy(recipe: Recipe, out: Path) -> list[tuple[Path, bool]]:
    """Copy the recipe and what its command needs under ``out``: (path, written) for each; a file already there
    with the same content is left as it is (two recipes may share a cluster file), and when any file there
    differs nothing is written."""
    targets = [(src, out / rel) for src, rel in recipe.files()]
    for src, _ in targets:
        if not src.is_file():  # a recipe whose header names a file that is not shipped: a packaging bug
            raise ConfigError(f"recipe {recipe.name}: {src} is missing from this installation")
    differ = [
        dst for src, dst in targets if dst.exists() and (not dst.is_file() or dst.read_bytes() != src.read_bytes())
    ]
    if differ:
        more = f"; {len(differ) - 1} more of the recipe's files differ there too" if len(differ) > 1 else ""
        raise ConfigError(
            f"{differ[0]} exists and differs from the recipe's: not overwritten (remove it, or --out DIR){more}"
        )
    done = []
    for src, dst in targets:
        written = not dst.exists()
        if written:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        done.append((dst, written))
    return done


def table(items: list[Recipe]) -> list[str]:
    """The listing: one block per recipe (name and what it is; model, cluster file, the dry run's memory)."""
    width = max(len(r.name) for r in items)
    lines = []
    for r in items:
        lines.append(f"{r.name:<{width}}  {r.description}")
        pad = " " * (width + 2)
        lines.append(f"{pad}model {r.model}; cluster {r.cluster or '(a Ray instance of its own)'}")
        if r.memory:
            lines.append(f"{pad}dry run: {r.memory}")
    return lines
