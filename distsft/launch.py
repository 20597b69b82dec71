"""Run a training job: prepare data once on the driver, then run the training loop.

``--local`` runs the loop in this process (world size 1, no Ray): the single-GPU debug mode, and the
mode every path can be tested in on a CPU. Otherwise Ray Train places one worker per accelerator (or CPU
slot) as the cluster file says, and each worker runs the very same loop; the prepared rows reach the
workers through Ray's object store, so no shared filesystem is needed for data.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from distsft import checkpoint
from distsft.cluster import ClusterConfig
from distsft.config import Config, build_config, dump_config, save_config
from distsft.coordinator import MetricsLog, make_ray_coordinator, read_metrics
from distsft.data.prepare import PreparedData, prepare
from distsft.data.sampler import total_steps
from distsft.errors import ConfigError, DistsftError
from distsft.export import export
from distsft.model import load_tokenizer, materialize_demo
from distsft.report import Follower, Reporter, check_logging
from distsft.summary import add_run_figures, format_summary


class WorkerFailure(RuntimeError):
    """A worker's exception, carried to the driver with the worker's rank, node and traceback."""


def prepare_data(cfg: Config) -> PreparedData:
    tokenizer = load_tokenizer(cfg.model)
    return prepare(cfg.data, tokenizer, seed=cfg.train.seed, output_dir=cfg.output_dir)


def check_model(cfg: Config, device_type: str) -> str:
    """Read the model family's traits (config and class only, no weights), refuse what it cannot train,
    and say what it will run with; workers make the same choice on their own device."""
    import torch

    from distsft.model import model_plan
    from distsft.traits import check_training_fit

    traits, attn = model_plan(cfg.model, torch.device(device_type))
    check_training_fit(traits, cfg.data.packing, cfg.train.router_aux_loss_coef)
    line = f"model: {traits.describe(attn)}"
    print(line, flush=True)
    return line


def _start(cfg: Config, quiet: bool, device_type: str) -> tuple[Path, PreparedData, float]:
    check_logging(cfg.logging)
    check_model(cfg, device_type)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if cfg.model.path == "demo":
        materialize_demo(cfg.train.seed)  # once here, rather than by every worker at the same time
    if not quiet:
        print("resolved config:\n" + dump_config(cfg), flush=True)
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    s = data.stats.as_dict()
    print(
        f"data: {s['rows_read']} rows read, {s['kept']} kept, {s['rejected']} rejected, {s['too_long']} too long; "
        f"{s['packed_rows']} rows of <= {s['max_seq_len']} tokens (packing efficiency {s['packing_efficiency']:.1%}), "
        f"{s['supervised_tokens']} supervised tokens [{'cached' if data.cache_hit else 'prepared'} in "
        f"{time.perf_counter() - t0:.1f}s]",
        flush=True,
    )
    return out, data, t0


def _finish(
    cfg: Config, out: Path, root: Path, summary: dict[str, Any], data: PreparedData, t0: float, start_step: int
) -> dict[str, Any]:
    """The coordinator's last job: consolidate the final checkpoint's shards into ``output_dir/final``,
    then summarise the run and draw its loss curve."""
    summary["data"] = data.stats.as_dict()
    latest = checkpoint.find_latest(root)
    summary["checkpoint"] = str(latest) if latest else None
    if summary.get("stopped_at"):
        print(
            f"stopped at step {summary['stopped_at']}; checkpoint {summary['checkpoint']}; "
            "run the same command again to continue",
            flush=True,
        )
    elif cfg.checkpoint.final:
        export(latest, out / "final")
        summary["final_dir"] = str(out / "final")
    summary["wall_s"] = time.perf_counter() - t0
    add_run_figures(summary, read_metrics(out), out, start_step, plot=cfg.logging.plot)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if not summary.get("stopped_at"):
        print(format_summary(summary), flush=True)
    return summary


def launch_local(cfg: Config, quiet: bool = False) -> dict[str, Any]:
    import torch

    from distsft.train import WorkerContext, train

    out, data, t0 = _start(cfg, quiet, "cuda" if torch.cuda.is_available() else "cpu")
    root = checkpoint_root(cfg, None)
    meta, start_step = _resume_plan(cfg, root, world_size=1, data=data)
    steps = total_steps(len(data.train), cfg.batch_plan(1), cfg.train.max_steps, cfg.train.epochs)
    reporter = Reporter(cfg, steps, start_step)
    log = MetricsLog(out, keep_through=start_step, on_record=reporter)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with _StopOnSignal() as stop:
            ctx = WorkerContext(report=log.log, checkpoint_dir=str(root), should_stop=stop.is_set, run_meta=meta)
            summary = train(cfg, data.train, data.eval, ctx)
    finally:
        reporter.close()
    return _finish(cfg, out, root, summary, data, t0, start_step)


def checkpoint_root(cfg: Config, cluster: ClusterConfig | None) -> Path:
    """``output_dir/checkpoints`` locally; under the cluster's storage path (shared by every node) on Ray."""
    if cluster is not None and cluster.storage_path:
        return Path(cluster.storage_path).expanduser().resolve() / Path(cfg.output_dir).name / "checkpoints"
    return Path(cfg.output_dir).resolve() / "checkpoints"


def _resume_plan(cfg: Config, root: Path, world_size: int, data: PreparedData) -> tuple[dict[str, Any], int]:
    """Validate the checkpoint this launch will continue from, before any worker starts; returns the run's
    metadata and the step it starts after (0 for a fresh run)."""
    from distsft.engine import engine_stage

    meta = {
        "run_id": uuid.uuid4().hex,
        "data_fingerprint": data.cache_dir.name if data.cache_dir else "",
        "engine_stage": engine_stage(cfg, world_size),
    }
    ckpt = checkpoint.pick_resume(cfg.checkpoint.resume, root, meta["run_id"])
    if ckpt is not None:
        manifest = checkpoint.read_manifest(ckpt) or {}
        diffs = checkpoint.check_continuation(
            manifest, cfg.to_dict(), world_size, meta["data_fingerprint"], cfg.checkpoint.allow_changes,
            engine_stage=meta["engine_stage"],
        )  # fmt: skip
        note = f" (allowed changes: {'; '.join(diffs)})" if diffs else ""
        print(f"resuming from {ckpt} (step {manifest.get('step')}){note}", flush=True)
        return meta, int(manifest.get("step") or 0)
    return meta, 0


class _StopOnSignal:
    """SIGTERM/SIGINT ask the run to save a checkpoint of the current step and exit; a second one aborts."""

    def __init__(self, on_stop=None) -> None:
        self._event = threading.Event()
        self._on_stop = on_stop
        self._old: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt
        print(
            f"\n{signal.Signals(signum).name}: saving a checkpoint of the current step, then exiting "
            "(send it again to abort without saving)",
            flush=True,
        )
        self._event.set()
        if self._on_stop is not None:
            self._on_stop()


# --- Ray --------------------------------------------------------------------------------------------
def launch_ray(cfg: Config, cluster: ClusterConfig, quiet: bool = False) -> dict[str, Any]:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    cfg = absolute_paths(cfg)  # workers run in their own directories
    check_storage(cluster)
    if not quiet:
        import yaml

        print("cluster:\n" + yaml.safe_dump(cluster.redacted(), sort_keys=False), flush=True)
    out, data, t0 = _start(cfg, quiet, "cuda" if cluster.use_gpu else "cpu")
    root = checkpoint_root(cfg, cluster)
    meta, start_step = _resume_plan(cfg, root, world_size=cluster.num_workers, data=data)
    plan = cfg.batch_plan(cluster.num_workers)
    steps = total_steps(len(data.train), plan, cfg.train.max_steps, cfg.train.epochs)
    started_here = _init_ray(cluster, out)
    try:
        _check_placement(cluster)
        stop_flag = ray.remote(num_cpus=0)(StopFlag).remote()
        log = MetricsLog(out, keep_through=start_step)
        # The placement-check bundle, less the accelerator label (ScalingConfig takes that on its own).
        resources = {k: v for k, v in cluster.bundle().items() if not k.startswith("accelerator_type:")}
        runtime_env = dict(cluster.runtime_env)
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **cluster.env, "TOKENIZERS_PARALLELISM": "false"}
        backend = cluster.backend if cluster.backend != "auto" else ("nccl" if cluster.use_gpu else "gloo")
        trainer = TorchTrainer(
            ray_worker_loop,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "train": ray.put(_arrow(data.train)),
                "eval": ray.put(_arrow(data.eval)) if len(data.eval) else None,
                "checkpoint_dir": str(root),
                "run_meta": meta,
                "stop_flag": stop_flag,
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
                storage_path=_storage_path(cfg, cluster),
                failure_config=FailureConfig(max_failures=cluster.max_failures),
                callbacks=[make_ray_coordinator(log)],
                worker_runtime_env=runtime_env,
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        stop = _StopOnSignal(on_stop=lambda: stop_flag.set.remote())
        on_tick = (lambda: record_ray_processes(out)) if started_here else None
        reporter = Reporter(cfg, steps, start_step)
        try:
            with Follower(log.path, reporter), stop:
                error = _fit_in_thread(trainer, on_tick)
        finally:
            reporter.close()
        if error is not None:
            raise DistsftError(_describe_failure(error))
    finally:
        if started_here:
            ray.shutdown()
            (out / RAY_STATE).unlink(missing_ok=True)
    rows = read_metrics(log.path)
    summary = {"steps": steps, "workers": cluster.num_workers, "start_step": start_step}
    summary["last"] = rows[-1] if rows else {}
    if stop.is_set():
        summary["stopped_at"] = summary["last"].get("step")
    return _finish(cfg, out, root, summary, data, t0, start_step)


class StopFlag:
    """A tiny Ray actor: the driver sets it on SIGTERM/SIGINT; rank 0 reads it after every step."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def get(self) -> bool:
        return self.value


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
    """Refuse plans whose checkpoints would be scattered over node-local disks with nothing to merge them."""
    if cluster.storage_path and "://" in cluster.storage_path:
        raise ConfigError(
            f"storage_path {cluster.storage_path}: object-store URIs are not supported for checkpoints yet; "
            "mount the bucket (or an NFS share) on every node and give its path"
        )
    if cluster.num_nodes > 1 and not cluster.storage_path:
        raise ConfigError(
            f"{cluster.num_nodes} nodes but no storage_path: every rank writes its checkpoint shards where "
            "the others can read them, so set storage_path to a filesystem all nodes share (an NFS mount)"
        )


def ray_worker_loop(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the same ``train`` as ``--local``, with its rank and a reporter."""
    import datasets
    import ray
    import ray.train
    from datasets.table import InMemoryTable

    from distsft.train import WorkerContext, train

    ctx = ray.train.get_context()
    rank, node = ctx.get_world_rank(), ray.util.get_node_ip_address()
    tag_worker_output(f"[rank {rank} @ {node}] ")
    cfg = build_config(config["cfg"])
    # An explicit fingerprint skips datasets' hashing of the table (nothing is cached on workers).
    train_rows = datasets.Dataset(InMemoryTable(ray.get(config["train"])), fingerprint="distsft-train")
    eval_rows = []
    if config["eval"] is not None:
        eval_rows = datasets.Dataset(InMemoryTable(ray.get(config["eval"])), fingerprint="distsft-eval")

    node_id = ray.get_runtime_context().get_node_id()

    # ray.train.report synchronises all workers with the controller (about a second on a busy CPU), so
    # records travel in batches: every log_every steps, before each checkpoint and at the end.
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        if pending:
            ray.train.report({"records": list(pending)})
            pending.clear()

    def report(record: dict[str, Any]) -> None:
        pending.append({**record, "node": node, "node_id": node_id, "pid": os.getpid()})
        if record["step"] % cfg.train.log_every == 0 or "eval_loss" in record:
            flush()

    stop_flag = config["stop_flag"]
    wctx = WorkerContext(
        rank=rank,
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        report=report,
        flush=flush,
        checkpoint_dir=config["checkpoint_dir"],
        should_stop=lambda: ray.get(stop_flag.get.remote()),
        run_meta=config["run_meta"],
    )
    try:
        train(cfg, train_rows, eval_rows, wctx)
    except Exception as e:
        raise WorkerFailure(f"rank {rank} on node {node} failed:\n{traceback.format_exc()}") from e


def tag_worker_output(tag: str) -> None:
    """Ray prefixes worker output with pid and node; our loggers add the rank and node to each line."""
    import logging

    import ray.train.v2._internal.execution.context as train_context

    fmt = logging.Formatter(tag + "%(levelname)s %(name)s: %(message)s")
    for name in ("DeepSpeed", "distsft"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(fmt)
    # Ray Train logs every report at INFO under a logger named after its file; one line per step per
    # worker drowns the coordinator's own line.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    print(f"{tag}worker started (pid {os.getpid()})", flush=True)


def absolute_paths(cfg: Config) -> Config:
    """Relative paths mean the driver's working directory; workers must see them the same way."""
    import dataclasses

    def fix(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p and p != "demo" and Path(p).exists() else p

    model = dataclasses.replace(cfg.model, path=fix(cfg.model.path), tokenizer=fix(cfg.model.tokenizer))
    return dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()), model=model)


def _arrow(ds: Any):
    """The Arrow table behind a prepared dataset (what goes into Ray's object store)."""
    return ds.data.table


def _storage_path(cfg: Config, cluster: ClusterConfig) -> str:
    if cluster.storage_path:
        return cluster.storage_path
    return str((Path(cfg.output_dir) / "ray").resolve())


RAY_STATE = ".ray-local.json"


def _init_ray(cluster: ClusterConfig, out: Path) -> bool:
    """Connect to the cluster file's Ray, or start one here with its dashboard on loopback."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": "WARNING"}
    if cluster.address in (None, "local"):
        _reap_killed_run(out)
        ray.init(num_cpus=cluster.num_cpus, dashboard_host=cluster.dashboard_host, **kwargs)
        record_ray_processes(out)
    else:
        try:
            ray.init(address=cluster.address, **kwargs)
        except Exception as e:
            raise DistsftError(f"cluster address {cluster.address}: cannot connect to Ray: {e}") from None
    return True


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


def _check_placement(cluster: ClusterConfig) -> None:
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
