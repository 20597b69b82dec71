"""What a task name means, and proof that the task reads nothing from the network.

lm-eval's own tasks read their datasets from the Hugging Face hub. ``distsft eval`` runs offline, so it
indexes only the shipped examples (``tasks/`` beside this file) and the ``--include-path`` directories, and
refuses a task whose data is not local before lm-eval tries to download it: an error in seconds instead of a
connection timeout deep inside ``datasets``. Relative ``data_files`` are made absolute against the task
file's directory (lm-eval would read them against the working directory), so a task directory works from
wherever the command runs, and the parsed datasets are cached under distsft's cache, not the hub's.
"""

from __future__ import annotations

import difflib
import glob
from pathlib import Path
from typing import Any

from distsft.config.schema import cache_home
from distsft.errors import DistsftError

EXAMPLES = Path(__file__).resolve().parent / "tasks"
"""The shipped example tasks: a multiple-choice and a generation task on local JSONL files."""

LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow"})
"""``datasets`` builders that read only the files they are given."""

INSTALL = "pip install 'distsft[eval]'"


def require_lm_eval() -> None:
    """The one line a user without the extra sees, before any model is loaded."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise DistsftError(f"--tasks runs lm-evaluation-harness, which is not installed: {INSTALL}") from None


def task_roots(include_paths: list[str]) -> list[Path]:
    roots = [EXAMPLES]
    for p in include_paths:
        if not Path(p).is_dir():
            raise DistsftError(f"--include-path {p}: not a directory")
        roots.append(Path(p).resolve())
    return roots


def resolve(names: list[str], include_paths: list[str]) -> list[dict[str, Any]]:
    """One lm-eval task config per task ``names`` mean (a tag stands for its tasks), each checked to read
    local files only. A name is a task or tag in the roots, or the path of a task's YAML file."""
    from lm_eval.tasks._index import Kind, TaskIndex

    roots = task_roots(include_paths)
    index = TaskIndex.build(roots)
    configs: dict[str, dict[str, Any]] = {}
    for name in names:
        entry = TaskIndex.entry_from_path(Path(name)) if name.endswith((".yaml", ".yml")) else index.get(name)
        if entry is None:
            raise DistsftError(unknown(name, index, roots))
        if entry.kind == Kind.GROUP:
            raise DistsftError(f"{name} is a group of tasks ({entry.yaml_path}); name its tasks in --tasks instead")
        leaves = [index[t] for t in sorted(entry.tags)] if entry.kind == Kind.TAG else [entry]
        for leaf in leaves:
            if leaf.kind == Kind.PY_TASK:
                raise DistsftError(
                    f"task {leaf.name} ({leaf.yaml_path}) is a Python task class that reads its data in its own "
                    "code; distsft eval runs YAML tasks on local files"
                )
            configs.setdefault(leaf.name, local_config(leaf.yaml_path))
    return list(configs.values())


def unknown(name: str, index: dict[str, Any], roots: list[Path]) -> str:
    known = sorted(index)
    near = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {near[0]}? " if near else ""
    shown = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
    where = ", ".join(str(r) for r in roots)
    return (
        f"unknown task {name!r}; {hint}the task paths hold {shown or 'nothing'} (in {where}); lm-eval's own "
        "tasks read the hub and are not searched: copy one into a directory and pass --include-path DIR"
    )


def local_config(path: Path) -> dict[str, Any]:
    """The task's full config (includes merged, functions imported) with its data proven local."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(path, resolve_func=True)
    name, here = cfg.get("task", path.stem), Path(path).parent
    if cfg.get("custom_dataset") is not None:  # the task's own function builds its data
        return cfg
    source = cfg.get("dataset_path")
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if source in LOCAL_BUILDERS:
        if not kwargs.get("data_files") and not kwargs.get("data_dir"):
            raise DistsftError(f"task {name} ({path}): dataset_path {source} needs dataset_kwargs.data_files")
        if kwargs.get("data_files"):
            kwargs["data_files"] = _local_files(kwargs["data_files"], here, name, path)
        if kwargs.get("data_dir"):
            kwargs["data_dir"] = str(_local_file(kwargs["data_dir"], here, name, path))
    elif isinstance(source, str) and (here / source).is_dir():  # a saved dataset's or a data directory
        source = str((here / source).resolve())
    else:
        raise DistsftError(
            f"task {name} ({path}): dataset_path {source!r} would be read from the Hugging Face hub, and distsft "
            "eval runs offline; point it at local files (dataset_path: json, dataset_kwargs.data_files: FILE.jsonl"
            f"; see {EXAMPLES})"
        )
    kwargs.setdefault("cache_dir", str(cache_home() / "lm-eval-datasets"))
    return {**cfg, "dataset_path": source, "dataset_kwargs": kwargs}


def _local_files(files: Any, here: Path, name: str, path: Path) -> Any:
    """``data_files`` in each of the shapes ``datasets`` takes (a path, a list, splits to either)."""
    if isinstance(files, dict):
        return {split: _local_files(f, here, name, path) for split, f in files.items()}
    if isinstance(files, list):
        return [_local_files(f, here, name, path) for f in files]
    return str(_local_file(files, here, name, path))


def _local_file(file: str, here: Path, name: str, path: Path) -> Path:
    if "://" in str(file):
        raise DistsftError(f"task {name} ({path}): data file {file} is remote, and distsft eval runs offline")
    full = (here / Path(file).expanduser()).resolve()
    if not glob.glob(str(full)):  # a path or a pattern that matches nothing
        raise DistsftError(f"task {name} ({path}): data file {full} not found")
    return full
