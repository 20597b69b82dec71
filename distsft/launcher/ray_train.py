"""Running the training loop on Ray: the instance, the placement, the workers, their records, failures.

``launch.py`` tells the story of a run; this module is the Ray chapter. Ray Train's ``TorchTrainer``
places one worker per bundle of the cluster file and forms the process group; every worker runs
``train.train`` unchanged. Records travel to a ``RecordSink`` actor on the driver's node without the
workers waiting for it (``distsft/records.py``); the driver follows ``metrics.jsonl`` for the console.
A Ray instance started here is this launch's alone: it lives in its own temporary directory, and the
launcher points Ray's own address lookups at it, so another Ray instance on the machine is never joined
nor mistaken for it. Worker output goes to ``output_dir/logs/rank-N.log`` (``--verbose``: to the console).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from distsft.config import Config, build_config
from distsft.config.cluster import ClusterConfig
from distsft.errors import ConfigError, DistsftError


class WorkerFailure(RuntimeError):
    """A worker's exception, carried to the driver with the worker's rank, node and traceback."""


class StopFlag:
    """A tiny Ray actor: the driver sets it on SIGTERM/SIGINT; rank 0 reads it where records are read."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def get(self) -> bool:
        return self.value


def run_workers(
    cfg: Config,
    cluster: ClusterConfig,
    data: Any,
    root: str | Path,
    meta: dict[str, Any],
    start_step: int,
    display: Any,
    stop: Any,
    verbose: bool,
    engine: str = "local",
) -> None:
    """Train on the cluster's workers; returns when they are done (or raises with the first failure)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from distsft.metrics.display import Follower
    from distsft.metrics.records import RecordSink

    out = Path(cfg.output_dir)
    started_here = init_ray(cluster, out, verbose)
    stop.install()
    try:
        check_placement(cluster)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        stop_flag = ray.remote(num_cpus=0)(StopFlag).options(scheduling_strategy=here).remote()
        sink = (
            ray.remote(num_cpus=0)(RecordSink)
            .options(scheduling_strategy=here)
            .remote(str(out.resolve()), cluster.num_workers, start_step)
        )
        # The placement-check bundle, less the accelerator label (ScalingConfig takes that on its own).
        resources = {k: v for k, v in cluster.bundle().items() if not k.startswith("accelerator_type:")}
        runtime_env = dict(cluster.runtime_env)
        runtime_env["env_vars"] = {
            **runtime_env.get("env_vars", {}),
            **cluster.env,
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # a worker's print goes to its log once, not also as a record
        }
        backend = cluster.backend if cluster.backend != "auto" else ("nccl" if cluster.use_gpu else "gloo")
        trainer = TorchTrainer(
            ray_worker_loop,
            train_loop_config={
                "cfg": cfg.to_dict(),
                **rows_for_workers(data, cluster, engine),
                "checkpoint_dir": str(root),
                "run_meta": meta,
                "stop_flag": stop_flag,
                "sink": sink,
                "logs": None if verbose else str((out / "logs").resolve()),
            },
            torch_config=TorchConfig(backend=backend),
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
                failure_config=FailureConfig(max_failures=cluster.max_failures),
                worker_runtime_env=runtime_env,
                logging_config=LoggingConfig(log_level="INFO" if verbose else "ERROR"),
            ),
        )
        stop.on_stop = lambda: stop_flag.set.remote()
        ours = started_here or any(_SESSION)
        on_tick = (lambda: record_ray_processes(out)) if ours else None
        with Follower(out / "metrics.jsonl", display, workers=out / "workers.json"):
            error = _fit_in_thread(trainer, on_tick)
        if error is not None:
            raise DistsftError(_describe_failure(error))
    finally:
        if started_here:
            shutdown_ray(out)


_SESSION: list[bool] = []
"""Whether the Ray of the current ``ray_session`` was started by it (a stack, for nesting)."""


@contextlib.contextmanager
def ray_session(cluster: ClusterConfig, out: Path, verbose: bool, engine: str):
    """Ray up for the whole launch when the data is prepared on it too (``engine`` ``ray``): the instance
    that prepares the rows is the one that trains on them."""
    if engine != "ray":
        yield
        return
    started = init_ray(cluster, out, verbose)
    _SESSION.append(started)
    try:
        yield
    finally:
        _SESSION.pop()
        if started:
            shutdown_ray(out)


def shutdown_ray(out: Path) -> None:
    """Stop the Ray this launch started, and remove its session files (its logs are in output_dir/logs)."""
    import shutil

    import ray

    ray.shutdown()
    (out / RAY_STATE).unlink(missing_ok=True)
    while _TEMP_DIRS:
        shutil.rmtree(_TEMP_DIRS.pop(), ignore_errors=True)


def _fit_in_thread(trainer: Any, on_tick=None) -> BaseException | None:
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


def ray_worker_loop(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the same ``train`` as ``--local``, with its rank and a reporter."""
    import datasets
    import ray
    import ray.train
    import torch
    from datasets.table import InMemoryTable

    from distsft.data.prepare import load_prepared
    from distsft.metrics.records import RecordSender
    from distsft.training.loop import WorkerContext, train

    ctx = ray.train.get_context()
    rank, node = ctx.get_world_rank(), ray.util.get_node_ip_address()
    if config["logs"]:
        redirect_output(Path(config["logs"]) / f"rank-{rank}.log")
    print(f"rank {rank} of {ctx.get_world_size()} on {node}, pid {os.getpid()}", flush=True)
    cfg = build_config(config["cfg"])
    if config.get("rows_dir"):  # the prepared cache entry, memory-mapped: pages are read as steps need them
        rows = Path(config["rows_dir"])
        if not (rows / "meta.json").is_file():
            raise DistsftError(
                f"rank {rank} on node {node}: the prepared data {rows} is not visible here; set data.cache_dir "
                "to a directory every node sees"
            )
        prepared = load_prepared(rows)
        train_rows, eval_rows = prepared.train, prepared.eval
    else:  # through the object store: an explicit fingerprint skips datasets' hashing of the table
        train_rows = datasets.Dataset(InMemoryTable(ray.get(config["train"])), fingerprint="distsft-train")
        eval_rows = []
        if config["eval"] is not None:
            eval_rows = datasets.Dataset(InMemoryTable(ray.get(config["eval"])), fingerprint="distsft-eval")
    node_id = ray.get_runtime_context().get_node_id()
    local_rank = ctx.get_local_rank()
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    sink = config["sink"]
    sink.hello.remote(rank, {"node": node, "node_id": node_id, "pid": os.getpid(), "device": device})
    reporter = RecordSender(lambda records: sink.put.remote(rank, records), ray.get)
    tagged = {"node": node, "node_id": node_id, "pid": os.getpid()}
    stop_flag = config["stop_flag"]
    wctx = WorkerContext(
        rank=rank,
        world_size=ctx.get_world_size(),
        local_rank=local_rank,
        report=lambda record: reporter.report({**record, **tagged}),
        flush=reporter.flush,
        wait=reporter.wait,
        checkpoint_dir=config["checkpoint_dir"],
        should_stop=lambda: ray.get(stop_flag.get.remote()),
        run_meta=config["run_meta"],
    )
    try:
        train(cfg, train_rows, eval_rows, wctx)
    except Exception as e:
        raise WorkerFailure(f"rank {rank} on node {node} failed:\n{traceback.format_exc()}") from e


def redirect_output(path: Path) -> None:
    """This process's stdout and stderr (Python's and the C libraries') to ``path``: the console shows the
    run, not every worker's library chatter; ``--verbose`` keeps it on the console."""
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)  # what C and C++ libraries write
    os.dup2(fd, 2)
    os.close(fd)
    # Python's own streams straight to the file too (Ray wraps them to copy lines to its own logs)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def rows_for_workers(data: Any, cluster: ClusterConfig, engine: str) -> dict[str, Any]:
    """How the workers get the prepared rows: by the cache entry's path, memory-mapped, when they can see
    it (a Ray instance on this machine, or data prepared by Ray Data, which needs a directory every node
    sees); otherwise through Ray's object store (one copy per node)."""
    import ray

    if data.cache_dir is not None and (cluster.address in (None, "local") or engine == "ray"):
        return {"rows_dir": str(Path(data.cache_dir).resolve())}
    return {
        "train": ray.put(_arrow(data.train)),
        "eval": ray.put(_arrow(data.eval)) if len(data.eval) else None,
    }


def _arrow(ds: Any):
    """The Arrow table behind a prepared dataset (what goes into Ray's object store)."""
    return ds.data.table


RAY_STATE = ".ray-local.json"
_TEMP_DIRS: list[str] = []


def init_ray(cluster: ClusterConfig, out: Path, verbose: bool) -> bool:
    """Connect to the cluster file's Ray, or start one here that is this launch's alone."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"}
    if cluster.address in (None, "local"):
        _reap_killed_run(out)
        os.environ.pop("RAY_ADDRESS", None)  # never join an instance someone else started
        import tempfile

        temp = tempfile.mkdtemp(prefix="ray-distsft-")
        _TEMP_DIRS.append(temp)
        ray.init(num_cpus=cluster.num_cpus, dashboard_host=cluster.dashboard_host, _temp_dir=temp, **kwargs)
        # Ray's own helpers (the state API that Ray Train's controller uses) find "the" local instance
        # through RAY_ADDRESS first; point them at ours, so a second instance on the machine is no puzzle.
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        record_ray_processes(out)
    else:
        error = None
        with _captured_stderr(out / "logs" / "driver.log") as said:  # Ray's C++ client retries noisily
            try:
                ray.init(address=cluster.address, **kwargs)
            except Exception as e:  # noqa: BLE001
                error = e
        if error is not None:
            raise DistsftError(connect_error(cluster.address, error, said())) from None
    return True


def connect_error(address: str, error: Exception, client_log: str = "") -> str:
    text = f"{type(error).__name__}: {error}"
    if "InvalidAuthToken" in client_log or "auth" in text.lower():
        return (
            f"cluster address {address}: the cluster refused this launcher's Ray token: set RAY_AUTH_TOKEN to "
            "the cluster's token (`ray get-auth-token` on the head node; or RAY_AUTH_TOKEN_PATH to a file "
            "holding it) and RAY_AUTH_MODE=token; see README 'Running on a cluster'"
        )
    return f"cluster address {address}: cannot connect to Ray: {text.splitlines()[0]}"


@contextlib.contextmanager
def _captured_stderr(log: Path):
    """The process's stderr (file descriptor 2, where C++ libraries write) into ``log`` while inside;
    yields a function that returns what was written."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        text: list[str] = []
        try:
            yield lambda: "".join(text)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read().decode(errors="replace"))
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a", encoding="utf-8") as f:
                f.write(text[0])


def record_ray_processes(out: Path) -> None:
    """Note the Ray processes this launcher started (its descendants, with their start times), so a
    later launch can stop whatever a SIGKILL of this one leaves behind."""
    import psutil

    me = psutil.Process()
    procs = []
    for child in me.children(recursive=True):
        try:
            procs.append([child.pid, child.create_time()])
        except psutil.NoSuchProcess:
            pass
    state = {"launcher_pid": me.pid, "processes": procs}
    tmp = out / (RAY_STATE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, out / RAY_STATE)


def _reap_killed_run(out: Path) -> None:
    """A launcher killed with SIGKILL cannot stop the Ray instance it started; most of it dies with it,
    but agents whose parent lingers as a zombie may not. The next launch in the same output_dir stops
    the processes the killed one recorded, and refuses to run beside a launcher that is still alive."""
    import psutil

    state = out / RAY_STATE
    if not state.is_file():
        return
    info = json.loads(state.read_text())
    pid = info.get("launcher_pid")
    if pid and psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and pid != os.getpid():
        raise DistsftError(f"another launch (pid {pid}) is running in {out}; stop it first or use another output_dir")
    stale = []
    for pid, created in info.get("processes", []):
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 1e-3 and proc.status() != psutil.STATUS_ZOMBIE:
                stale.append(proc)  # the same process, not a new one that reused the pid
        except psutil.NoSuchProcess:
            pass
    for proc in stale:
        proc.kill()
    psutil.wait_procs(stale, timeout=10)
    if stale:
        print(f"stopped {len(stale)} leftover Ray processes of an earlier launch that was killed", flush=True)
    state.unlink(missing_ok=True)


def check_placement(cluster: ClusterConfig) -> None:
    """Reserve the workers' bundles once with a bounded wait, so an impossible plan fails with a reason
    instead of waiting forever; the reservation is released before Ray Train makes its own."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = cluster.bundle()
    pg = placement_group([bundle] * cluster.num_workers, strategy=cluster.placement_strategy)
    try:
        if ray.get(pg.ready(), timeout=cluster.placement_timeout_s) is not None:
            return
    except ray.exceptions.GetTimeoutError:
        pass
    finally:
        remove_placement_group(pg)
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
    need = ", ".join(f"{k}={v:g}" for k, v in bundle.items())
    raise DistsftError(
        f"the cluster cannot place {cluster.num_workers} workers ({cluster.num_nodes} nodes x "
        f"{cluster.workers_per_node}) of {{{need}}} each with strategy {cluster.placement_strategy} within "
        f"{cluster.placement_timeout_s:g}s; it has {len(nodes)} node(s): {have}"
    )


def _describe_failure(e: Exception) -> str:
    failures = getattr(e, "worker_failures", None)
    if failures:
        rank, err = sorted(failures.items())[0]
        text = str(err)
        start = text.find("rank ")
        return f"training failed on {len(failures)} worker(s); first: " + (
            text[start:] if start >= 0 else f"rank {rank}: {text}"
        )
    return f"training failed: {e}"
