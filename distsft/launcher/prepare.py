"""Preparing a run's data on the driver: on this machine, or on Ray Data across the cluster.

``data.engine`` (the config key) names the runner of ``distsft/data/prepare.py``'s chunk passes:
``LocalRunner`` (this machine's processes) or ``RayRunner`` (``launcher/ray_data.py``). Ray stays out of
``data/``; this module is where the two meet.
"""

from __future__ import annotations

import os
from pathlib import Path

from distsft.config import Config
from distsft.config.cluster import ClusterConfig
from distsft.data.prepare import PreparedData, prepare
from distsft.errors import ConfigError
from distsft.model.loading import load_tokenizer

RAY_DATA_BYTES = 1 << 30
"""``data.engine: auto`` prepares on Ray Data from this much input (or on a cluster of several nodes)."""


def choose_data_runner(cfg: Config, cluster: ClusterConfig | None) -> str:
    """``local`` or ``ray``: the config's choice, or for ``auto``: Ray Data when the launch runs on Ray and
    either the cluster has several nodes (and ``data.cache_dir`` is set: it must be a directory they all
    see) or the input is large; a source Ray Data does not read (JSON arrays, hub datasets) keeps
    ``auto`` local."""
    shared = cfg.data.cache_dir is not None  # where every node's chunks go: must be one place for all
    if cfg.data.engine == "ray" and cluster is not None and cluster.num_nodes > 1 and not shared:
        raise ConfigError(
            f"data.engine = ray on {cluster.num_nodes} nodes writes the prepared chunks from every node: set "
            "data.cache_dir to a directory every node sees (or data.engine=local)"
        )
    if cfg.data.engine != "auto":
        return cfg.data.engine
    if cluster is None or (cluster.num_nodes > 1 and not shared):
        return "local"
    from distsft.data.sources import resolve_sources

    sources = resolve_sources(cfg.data.path, cfg.data.format)
    sources += resolve_sources(cfg.data.eval_path, cfg.data.format) if cfg.data.eval_path else []
    sources += [s for path in cfg.data.evals.values() for s in resolve_sources(path, cfg.data.format)]
    if any(s.kind not in ("jsonl", "parquet", "saved") for s in sources):
        return "local"
    size = sum(f.stat().st_size for s in sources for f in _files(Path(s.path)))
    return "ray" if cluster.num_nodes > 1 or size >= RAY_DATA_BYTES else "local"


def _files(p: Path) -> list[Path]:
    return [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]


def prepare_data(cfg: Config, runner: str = "local") -> PreparedData:
    """The prepared rows; ``runner`` ``ray`` runs the work on Ray Data (on the Ray this process is connected
    to, or on a local instance started for it and stopped after)."""
    tokenizer = load_tokenizer(cfg.model)
    if runner != "ray":
        return prepare(cfg.data, tokenizer, seed=cfg.train.seed, output_dir=cfg.output_dir)
    import ray

    from distsft.launcher.ray_data import RayRunner

    started = not ray.is_initialized()
    if started:  # a Ray of its own, like a launch without --cluster: never someone else's (RAY_ADDRESS)
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    try:
        return prepare(cfg.data, tokenizer, seed=cfg.train.seed, output_dir=cfg.output_dir, runner=RayRunner())
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
