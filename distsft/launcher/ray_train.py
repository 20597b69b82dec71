"""The Ray chapter of a launch: placement, the worker group, its records and its failures.

Ray Train's ``TorchTrainer`` places one worker per bundle of the cluster file and forms the process group;
every worker runs ``launcher/worker.py``'s entry, which runs ``training.loop.train`` unchanged. Records
travel to a ``RecordSink`` actor on the driver's node without the workers waiting for it
(``distsft/metrics/records.py``); the driver follows ``metrics.jsonl`` for the console.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsft.checkpoint import Location, ResumePlan
from distsft.config import Config
from distsft.config.cluster import ClusterConfig
from distsft.config.secrets import split_env
from distsft.data.prepare import PreparedData
from distsft.errors import ConfigError, DistsftError
from distsft.host import strip_ansi
from distsft.launcher.ray_session import RaySession
from distsft.launcher.stop import StopFlag, StopOnSignal
from distsft.metrics.display import Display


@dataclass(frozen=True)
class Launch:
    """What every worker group of one launch shares: the run, the cluster it runs on (an elastic restart's
    size), the prepared data, where checkpoints go, and the driver's display and stop handler."""

    cfg: Config
    cluster: ClusterConfig
    session: RaySession
    data: PreparedData
    root: Location
    display: Display
    stop: StopOnSignal
    runner: str = "local"


def run_workers(launch: Launch, resume: ResumePlan, elastic: bool = False) -> dict[str, Any]:
    """Train on the cluster's workers; returns rank 0's summary of the run when they are done (or raises
    ``WorkersFailed`` with the first failure)."""
    cfg, cluster, session, data, root = launch.cfg, launch.cluster, launch.session, launch.data, launch.root
    display, stop, runner = launch.display, launch.stop, launch.runner
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from distsft.launcher.rendezvous import RendezvousConfig
    from distsft.launcher.worker import ray_worker_loop
    from distsft.metrics.display import Follower
    from distsft.metrics.records import WORKERS_FILE, RecordSink

    out = Path(cfg.output_dir)
    session.ensure()
    stop.install()
    check_placement(cluster)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    stop_flag = ray.remote(num_cpus=0)(StopFlag).options(scheduling_strategy=here).remote()
    sink = (
        ray.remote(num_cpus=0)(RecordSink)
        .options(scheduling_strategy=here)
        .remote(str(out.resolve()), cluster.num_workers, resume.step)
    )
    # The placement-check bundle, less the accelerator label (ScalingConfig takes that on its own).
    resources = {k: v for k, v in cluster.bundle().items() if not k.startswith("accelerator_type:")}
    runtime_env = worker_runtime_env(cluster)
    trainer = TorchTrainer(
        ray_worker_loop,
        train_loop_config={
            "cfg": cfg.to_dict(),
            **rows_for_workers(data, cluster, runner),
            "checkpoint_dir": str(root),
            "resume": resume.to_dict(),
            "stop_flag": stop_flag,
            "sink": sink,
            "logs": None if session.verbose else str((out / "logs").resolve()),
            "secret_env": worker_secrets(cluster),
        },
        torch_config=RendezvousConfig(
            backend=cluster.process_group_backend,
            timeout_s=int(cluster.collective_timeout_s),
            rendezvous_timeout_s=cluster.rendezvous_timeout_s,
            collective_timeout_s=cluster.collective_timeout_s,
            upload_timeout_s=cluster.upload_timeout_s,
        ),
        scaling_config=ScalingConfig(
            num_workers=cluster.num_workers,
            use_gpu=cluster.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cluster.placement_strategy,
            accelerator_type=cluster.resources_per_worker.accelerator_type,
        ),
        run_config=RunConfig(
            name=f"distsft-{int(time.time())}",
            storage_path=str((out / "ray").resolve()),  # Ray Train's own state; checkpoints are ours
            # An elastic run restarts itself (``run_elastic``): every failure comes back here, counted there.
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0)
            if elastic
            else FailureConfig(max_failures=cluster.max_failures),
            worker_runtime_env=runtime_env,
            logging_config=LoggingConfig(log_level="INFO" if session.verbose else "ERROR"),
        ),
    )
    stop.on_stop = lambda: stop_flag.set.remote()
    with Follower(out / "metrics.jsonl", display, workers=out / WORKERS_FILE):
        error = _fit_in_thread(trainer, on_tick=session.note_processes)
    if error is not None:
        raise WorkersFailed(describe_failure(error))
    return ray.get(sink.run_summary.remote())


class WorkersFailed(DistsftError):
    """The worker group failed (after Ray Train's own restarts, if any)."""


def run_elastic(launch: Launch, resume: ResumePlan) -> tuple[dict[str, Any], int]:
    """``run_workers`` again after every failure, ``max_failures`` in all, each time on as many workers as
    the cluster offers: all of them if they can be placed within ``replacement_timeout_s`` (a replacement
    node joined, or the failure lost none), else the most whole nodes that can, down to ``min_workers``.
    Each restart continues from the run's latest checkpoint, resharded to its size. Returns rank 0's
    summary and the workers of the last group."""
    import dataclasses
    import os

    cluster, stop = launch.cluster, launch.stop
    # A group that cannot be placed in this time fails back to us (Ray Train retries it forever otherwise);
    # the launcher's environment is given back as it was when the run ends.
    var = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    before = os.environ.get(var)
    os.environ[var] = str(cluster.replacement_timeout_s)
    size, failures = cluster, 0
    try:
        while True:
            try:
                ran = run_workers(dataclasses.replace(launch, cluster=size), resume, elastic=True)
                return ran, size.num_workers
            except WorkersFailed as e:
                failures += 1
                if stop.is_set() or (cluster.max_failures != -1 and failures > cluster.max_failures):
                    used = f"restarts used: {failures - 1} of max_failures {cluster.max_failures}"
                    raise WorkersFailed(f"{e} ({used})") from None
                size, resume = _restart(launch, resume, failures, summary_line(str(e)))
    finally:
        if before is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = before


def _restart(launch: Launch, resume: ResumePlan, failures: int, first: str) -> tuple[ClusterConfig, ResumePlan]:
    """The size of the next group, and where it continues: this launch's latest checkpoint, resharded."""
    from distsft.checkpoint import convert_for, find_latest, read_manifest
    from distsft.training.engine import deepspeed_plan

    cfg, cluster = launch.cfg, launch.cluster
    t0 = time.monotonic()
    size = restart_size(cfg, cluster)
    latest = find_latest(launch.root)
    manifest = read_manifest(latest) if latest is not None else None
    if manifest and manifest.get("run_id") == resume.run_id:  # this launch's own latest checkpoint
        step = int(manifest.get("step") or 0)
        resume = ResumePlan(resume.run_id, str(latest), step, resume.data_fingerprint, resume.engine_stage)
    budget = "unlimited" if cluster.max_failures == -1 else cluster.max_failures
    print(
        f"restart {failures}/{budget}: {first}; going on with {size.num_workers} of "
        f"{cluster.num_workers} workers from step {resume.step} (placed in {time.monotonic() - t0:.0f}s)",
        flush=True,
    )
    if resume.checkpoint is not None:  # this launch's, or the one it started from
        said = convert_for(resume.checkpoint, size.num_workers, deepspeed_plan(cfg, size.num_workers).layout)
        if said:
            print(said, flush=True)
    return size, resume


def summary_line(message: str) -> str:
    """A failure in one line: who failed, and the exception that ended it (a traceback's last line)."""
    lines = [x.strip() for x in message.splitlines() if x.strip()]
    if not lines:
        return "unknown failure"
    head, last = lines[0].rstrip(":"), lines[-1]
    return (head if last == lines[0] else f"{head}: {last}")[:300]


def restart_size(cfg: Config, cluster: ClusterConfig) -> ClusterConfig:
    """The full cluster if it can be placed within ``replacement_timeout_s``, else the most whole nodes
    that can be at once, with at least ``min_workers`` workers and a count the global batch divides."""
    if placeable(cluster, cluster.replacement_timeout_s):
        return cluster
    for nodes in range(cluster.num_nodes - 1, 0, -1):
        smaller = cluster.with_nodes(nodes)
        if smaller.num_workers < (cluster.min_workers or cluster.num_workers):
            break
        if cfg.fits_workers(smaller.num_workers) and placeable(smaller, 10.0):
            return smaller
    raise WorkersFailed(
        f"no replacement within replacement_timeout_s = {cluster.replacement_timeout_s:g}s and fewer than "
        f"min_workers = {cluster.min_workers} workers can be placed: {describe_nodes()}"
    )


def _fit_in_thread(trainer: Any, on_tick: Any = None) -> BaseException | None:
    """``fit()`` off the main thread, so SIGTERM/SIGINT reach our handler (a graceful, checkpointed stop)
    instead of Ray's (which aborts the workers without saving)."""
    result: list[BaseException | None] = [None]

    def run() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            result[0] = e

    thread = threading.Thread(target=run, name="distsft-fit", daemon=True)
    thread.start()
    last = 0.0
    while thread.is_alive():
        thread.join(timeout=0.5)
        if on_tick is not None and time.monotonic() - last > 5:
            on_tick()
            last = time.monotonic()
    return result[0]


def worker_runtime_env(cluster: ClusterConfig) -> dict[str, Any]:
    """The runtime_env of every process distsft starts on the cluster: the file's, with its ``env`` but for
    the secrets (``worker_secrets``), which Ray would write in clear into its session logs."""
    runtime_env = dict(cluster.runtime_env)
    public, _ = split_env({**runtime_env.get("env_vars", {}), **cluster.env}, cluster.secret_env)
    runtime_env["env_vars"] = {
        **public,
        "DISTSFT_STORAGE_RETRY_S": os.environ.get("DISTSFT_STORAGE_RETRY_S", f"{cluster.storage_retry_s:g}"),
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # a worker's print goes to its log once, not also as a record
    }
    return runtime_env


def worker_secrets(cluster: ClusterConfig) -> dict[str, str]:
    """The secret variables of the cluster file's ``env`` (and its runtime_env's): each worker sets them
    before its training code runs (``worker.ray_worker_loop``), so they travel with the run's arguments
    and never through a runtime_env. The checkpoint key that signs manifests goes the same way."""
    from distsft.checkpoint import auth

    _, secret = split_env({**cluster.runtime_env.get("env_vars", {}), **cluster.env}, cluster.secret_env)
    return {**secret, **auth.worker_env()}


def check_storage(cluster: ClusterConfig) -> None:
    """Checkpoints must land where every rank can write and rank 0 can read them all: a filesystem all
    nodes share, or an object store."""
    from distsft.checkpoint import storage

    if cluster.storage_path:
        storage.check_uri(cluster.storage_path, "storage_path")
    if cluster.num_nodes > 1 and not cluster.storage_path:
        raise ConfigError(
            f"{cluster.num_nodes} nodes but no storage_path: every rank writes its checkpoint shards where "
            "the others can read them, so set storage_path to a filesystem all nodes share (an NFS mount) or "
            "to an object store (s3://bucket/prefix, gs://bucket/prefix)"
        )


def rows_for_workers(data: PreparedData, cluster: ClusterConfig, runner: str) -> dict[str, Any]:
    """How the workers get the prepared rows: by the cache entry's path, memory-mapped, when they can see
    it (a Ray instance on this machine, or data prepared by Ray Data, which needs a directory every node
    sees); otherwise through Ray's object store (one copy per node)."""
    import ray

    if data.cache_dir is not None and (cluster.address in (None, "local") or runner == "ray"):
        named = {name: str(Path(d.cache_dir).resolve()) for name, d in data.evals.items() if d.cache_dir}
        return {"rows_dir": str(Path(data.cache_dir).resolve()), "eval_dirs": named}
    return {
        "train": ray.put(_arrow(data.train)),
        "eval": ray.put(_arrow(data.eval)) if len(data.eval) else None,
        "evals": {name: ray.put(_arrow(d.train)) for name, d in data.evals.items()},
    }


def _arrow(ds: Any) -> Any:
    """The Arrow table behind a prepared dataset (what goes into Ray's object store)."""
    return ds.data.table


def check_placement(cluster: ClusterConfig) -> None:
    """Reserve the workers' bundles once with a bounded wait, so an impossible plan fails with a reason
    instead of waiting forever; the reservation is released before Ray Train makes its own."""
    if placeable(cluster, cluster.placement_timeout_s):
        return
    need = ", ".join(f"{k}={v:g}" for k, v in cluster.bundle().items())
    raise DistsftError(
        f"the cluster cannot place {cluster.num_workers} workers ({cluster.num_nodes} nodes x "
        f"{cluster.workers_per_node}) of {{{need}}} each with strategy {cluster.placement_strategy} within "
        f"{cluster.placement_timeout_s:g}s; {describe_nodes()}"
    )


def placeable(cluster: ClusterConfig, timeout_s: float) -> bool:
    """Whether the cluster's workers can all be placed within ``timeout_s`` (the reservation is released)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([cluster.bundle()] * cluster.num_workers, strategy=cluster.placement_strategy)
    try:
        return ray.get(pg.ready(), timeout=timeout_s) is not None
    except ray.exceptions.GetTimeoutError:
        return False
    finally:
        remove_placement_group(pg)


def describe_nodes() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = "; ".join(
        f"node {n['NodeManagerAddress']}: "
        + ", ".join(
            f"{k}={v:g}"
            for k, v in sorted(n["Resources"].items())
            if k in ("CPU", "GPU", "memory") or k.startswith("accelerator_type")
        )
        for n in nodes
    )
    return f"it has {len(nodes)} node(s): {have}"


def describe_failure(e: BaseException) -> str:
    """One message for a failed fit: the first failing worker's rank, node and traceback, without the
    terminal colours Ray puts into remote tracebacks (a log file or a pipe would show them as codes)."""
    failures = getattr(e, "worker_failures", None)
    if failures:
        rank, err = sorted(failures.items())[0]
        text = str(err)
        start = text.find("rank ")
        first = text[start:] if start >= 0 else f"rank {rank}: {text}"
        return strip_ansi(f"training failed on {len(failures)} worker(s); first: {first}")
    return strip_ansi(f"training failed: {e}")
