"""Cluster files: where the workers run and with what, validated like run configs.

A cluster file says how to reach Ray and how to place workers; it never says what to train. Values of
``env`` are passed to workers but never printed (they often hold tokens), and secrets among them never go
through Ray's runtime_env (``config/secrets.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distsft.config.loader import build_typed, load_typed
from distsft.config.schema import checked
from distsft.errors import ConfigError


@dataclass(frozen=True)
class WorkerResources:
    cpus: float = checked(1.0, lambda v: v > 0, "a number > 0")
    """CPUs Ray reserves for each worker (its bundle's ``CPU``)."""
    gpus: float = checked(0.0, lambda v: v >= 0, "a number >= 0")
    """GPUs Ray reserves for each worker; 0 trains on CPUs (gloo). With ``workers_per_node: 0`` on a machine with GPUs,
    at least 1."""
    memory_gb: float | None = checked(None, lambda v: v is None or v > 0, "a number > 0")
    """Host memory, GiB, Ray reserves for each worker (a scheduling reservation, not a limit); ``null``: none."""
    accelerator_type: str | None = None
    """Ray's accelerator type label, e.g. ``A100-80G`` or ``H100``: workers only go to such nodes."""


@dataclass(frozen=True)
class ClusterConfig:
    address: str | None = None
    """``null``: start a Ray instance on this machine; ``auto``: join the one running here (``ray start``);
    ``ray://head:10001``: a remote cluster through Ray Client; or ``head:6379``."""
    num_nodes: int = checked(1, lambda v: v >= 1, "an integer >= 1")
    """Nodes the workers are placed on; workers = ``num_nodes x workers_per_node``. More than one needs a
    ``storage_path`` every node sees."""
    workers_per_node: int = checked(0, lambda v: v >= 0, "an integer >= 0 (0: one per local GPU, or 2 on CPU)")
    """0: one per GPU of this machine, or 2 CPU workers where it has none (local Ray only)."""
    resources_per_worker: WorkerResources = field(default_factory=WorkerResources)
    """What Ray reserves for each worker: one placement-group bundle per worker."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for the workers' bundles; PACK fills a node before the next."""
    storage_path: str | None = None
    """Where checkpoints go: a local path, an NFS mount shared by all nodes, or ``s3://``/``gs://`` URI.
    Defaults to ``output_dir`` (fine on one node)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment for workers, e.g. NCCL_* settings or HF_TOKEN; values are never printed. Those whose
    names look like secrets (``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, ``*API_KEY*``, ...) or are listed in
    ``secret_env`` reach the workers with the run's arguments, not through Ray's runtime_env (which Ray logs)."""
    secret_env: list[str] = field(default_factory=list)
    """More ``env`` names to treat as secrets, beyond those whose names say so."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """Passed to Ray as the workers' runtime_env (pip, working_dir, ...)."""
    max_failures: int = checked(0, lambda v: v >= -1, "-1 (unlimited) or an integer >= 0")
    """Worker-group restarts after a worker or node dies (Ray Train FailureConfig)."""
    placement_timeout_s: float = checked(120.0, lambda v: v > 0, "a number of seconds > 0")
    """How long to wait for the cluster to offer every worker's resources before failing."""
    min_workers: int | None = checked(None, lambda v: v is None or v >= 1, "an integer >= 1, or null")
    """Elastic restarts: when a node is lost and no replacement joins within ``replacement_timeout_s``, the
    run goes on from its last checkpoint on the workers that remain (whole nodes, at least this many),
    resharded; a later restart uses returned nodes again. Needs ``train.global_batch_size``. null: always
    ``num_nodes x workers_per_node``."""
    replacement_timeout_s: float = checked(120.0, lambda v: v > 0, "a number of seconds > 0")
    """How long a restart waits for every worker's resources before it shrinks (``min_workers``) or fails."""
    rendezvous_timeout_s: float = checked(60.0, lambda v: v > 0, "a number of seconds > 0")
    """How long a worker may take to join the process group (reach rank 0's address) before it fails."""
    collective_timeout_s: float = checked(600.0, lambda v: v > 0, "a number of seconds > 0")
    """A collective that waits longer (a rank stopped, a link down) fails the step: every rank's Python
    stacks go to its log, and the failure is handled like a crash (restart, or a clear end)."""
    upload_timeout_s: float = checked(3600.0, lambda v: v > 0, "a number of seconds > 0")
    """With an object store: how long a rank that finished uploading its part of a checkpoint waits for the
    slowest rank's upload (outside the collectives that ``collective_timeout_s`` bounds)."""
    storage_retry_s: float = checked(60.0, lambda v: v >= 0, "a number of seconds >= 0")
    """How long a checkpoint read, listing or upload that fails transiently (S3 throttling and 5xx, timeouts,
    NFS EIO/ESTALE) is retried before the run stops with one line; ``DISTSFT_STORAGE_RETRY_S`` overrides it."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """The torch.distributed backend: ``auto`` is ``nccl`` when workers have GPUs, else ``gloo``."""
    dashboard_host: str = "127.0.0.1"
    """For a Ray instance distsft starts: where its dashboard listens (loopback unless you open it)."""
    allow_remote_dashboard: bool = False
    """Needed for a ``dashboard_host`` other than loopback: Ray's dashboard accepts jobs, and a job runs
    code as you, so opening it to a network is a choice you make knowingly (said again at launch)."""
    num_cpus: int | None = checked(None, lambda v: v is None or v >= 1, "an integer >= 1")
    """For a Ray instance distsft starts: CPUs it may use (default: all of this machine's)."""

    @property
    def num_workers(self) -> int:
        return self.num_nodes * self.workers_per_node

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    def with_nodes(self, num_nodes: int) -> ClusterConfig:
        """The same cluster on ``num_nodes`` nodes (an elastic restart's size)."""
        import dataclasses

        return dataclasses.replace(self, num_nodes=num_nodes)

    @property
    def use_gpu(self) -> bool:
        return self.resources_per_worker.gpus > 0

    @property
    def process_group_backend(self) -> str:
        """The torch.distributed backend the workers use: the file's, or nccl with GPUs and gloo without."""
        return self.backend if self.backend != "auto" else backend_for(self.use_gpu)

    def bundle(self) -> dict[str, float]:
        """One worker's Ray resources."""
        r = self.resources_per_worker
        b: dict[str, float] = {"CPU": r.cpus}
        if r.gpus:
            b["GPU"] = r.gpus
        if r.memory_gb:
            b["memory"] = r.memory_gb * 1024**3
        if r.accelerator_type:
            b[f"accelerator_type:{r.accelerator_type}"] = 0.001
        return b

    def redacted(self) -> dict[str, Any]:
        """For printing: env values replaced, so secrets never reach a log."""
        import dataclasses

        d = dataclasses.asdict(self)
        d["env"] = {k: "<set>" for k in self.env}
        rt = dict(d.get("runtime_env") or {})
        if "env_vars" in rt:
            rt["env_vars"] = {k: "<set>" for k in rt["env_vars"]}
        d["runtime_env"] = rt
        return d


def backend_for(gpu: bool) -> str:
    """nccl between GPUs, gloo between CPU processes: the one place this choice is made."""
    return "nccl" if gpu else "gloo"


def load_cluster(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ClusterConfig:
    """The file's cluster, or the embedded default (a local Ray instance) when ``path`` is None."""
    if path is None:
        return resolve_local_workers(build_typed(ClusterConfig, {}, "<default>", {}))
    cluster = load_typed(ClusterConfig, path, overrides, combined=_combination_problems)
    if cluster.address not in (None, "local") and cluster.workers_per_node == 0:
        raise ConfigError(f"{path}: workers_per_node must be set for a remote cluster (address {cluster.address})")
    if cluster.min_workers is not None and cluster.workers_per_node and cluster.min_workers > cluster.num_workers:
        raise ConfigError(
            f"{path}: min_workers = {cluster.min_workers} is more than the {cluster.num_workers} workers "
            f"(num_nodes {cluster.num_nodes} x workers_per_node {cluster.workers_per_node})"
        )
    return resolve_local_workers(cluster)


def _combination_problems(cluster: ClusterConfig) -> list[tuple[str, str]]:
    if not is_loopback(cluster.dashboard_host) and not cluster.allow_remote_dashboard:
        why = (
            f"{cluster.dashboard_host!r} opens Ray's dashboard, which runs jobs as you, beyond this machine; "
            "set allow_remote_dashboard: true if that is meant (or reach it with ssh -L 8265:127.0.0.1:8265)"
        )
        return [("dashboard_host", why)]
    return []


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_local_workers(cluster: ClusterConfig) -> ClusterConfig:
    """Fill ``workers_per_node: 0`` from this machine: one worker per GPU, or 2 CPU workers."""
    import dataclasses

    if cluster.workers_per_node:
        return cluster
    import torch

    gpus = torch.cuda.device_count()
    res = cluster.resources_per_worker
    if gpus:
        res = dataclasses.replace(res, gpus=max(res.gpus, 1.0))
    return dataclasses.replace(cluster, workers_per_node=gpus or 2, resources_per_worker=res)
