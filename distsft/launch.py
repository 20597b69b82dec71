"""Run a training job: prepare data once on the driver, then run the training loop.

``--local`` runs the loop in this process (world size 1, no Ray): the single-GPU debug mode, and the
mode every path can be tested in on a CPU. Otherwise Ray Train places one worker per accelerator (or CPU
slot) as the cluster file says, and each worker runs the very same loop; the prepared rows reach the
workers through Ray's object store, so no shared filesystem is needed for data.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from distsft.cluster import ClusterConfig
from distsft.config import Config, build_config, dump_config, save_config
from distsft.coordinator import MetricsLog, format_record, make_ray_coordinator, should_print
from distsft.data.prepare import PreparedData, prepare
from distsft.data.sampler import total_steps
from distsft.errors import DistsftError
from distsft.model import load_tokenizer


class WorkerFailure(RuntimeError):
    """A worker's exception, carried to the driver with the worker's rank, node and traceback."""


def prepare_data(cfg: Config) -> PreparedData:
    tokenizer = load_tokenizer(cfg.model)
    return prepare(cfg.data, tokenizer, seed=cfg.train.seed, output_dir=cfg.output_dir)


def _start(cfg: Config, quiet: bool) -> tuple[Path, PreparedData, float]:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
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


def _finish(out: Path, summary: dict[str, Any], data: PreparedData, t0: float) -> dict[str, Any]:
    summary["data"] = data.stats.as_dict()
    summary["final_dir"] = str(out / "final")
    summary["wall_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def launch_local(cfg: Config, quiet: bool = False) -> dict[str, Any]:
    from distsft.train import WorkerContext, train

    out, data, t0 = _start(cfg, quiet)
    steps = total_steps(len(data.train), cfg.batch_plan(1), cfg.train.max_steps, cfg.train.epochs)
    log = MetricsLog(out, total_steps=steps, log_every=cfg.train.log_every)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary = train(cfg, data.train, data.eval, WorkerContext(report=log.log))
    return _finish(out, summary, data, t0)


# --- Ray --------------------------------------------------------------------------------------------
def launch_ray(cfg: Config, cluster: ClusterConfig, quiet: bool = False) -> dict[str, Any]:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    cfg = absolute_paths(cfg)  # workers run in their own directories
    out, data, t0 = _start(cfg, quiet)
    plan = cfg.batch_plan(cluster.num_workers)
    steps = total_steps(len(data.train), plan, cfg.train.max_steps, cfg.train.epochs)
    started_here = _init_ray(cluster)
    try:
        _check_placement(cluster)
        log = MetricsLog(out, total_steps=steps, log_every=cfg.train.log_every, out=None)
        resources = {"CPU": cluster.resources_per_worker.cpus}
        if cluster.use_gpu:
            resources["GPU"] = cluster.resources_per_worker.gpus
        if cluster.resources_per_worker.memory_gb:
            resources["memory"] = cluster.resources_per_worker.memory_gb * 1024**3
        runtime_env = dict(cluster.runtime_env)
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **cluster.env, "TOKENIZERS_PARALLELISM": "false"}
        backend = cluster.backend if cluster.backend != "auto" else ("nccl" if cluster.use_gpu else "gloo")
        trainer = TorchTrainer(
            ray_worker_loop,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "train": ray.put(_arrow(data.train)),
                "eval": ray.put(_arrow(data.eval)) if len(data.eval) else None,
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
        with _MetricsPrinter(log.path, steps, cfg.train.log_every):
            try:
                trainer.fit()
            except Exception as e:
                raise DistsftError(_describe_failure(e)) from None
    finally:
        if started_here:
            ray.shutdown()
    rows = [json.loads(x) for x in log.path.read_text().splitlines()]
    summary = {"steps": steps, "workers": cluster.num_workers, "last": rows[-1] if rows else {}}
    return _finish(out, summary, data, t0)


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

    def report(record: dict[str, Any]) -> None:
        ray.train.report({**record, "node": node, "node_id": node_id})

    wctx = WorkerContext(rank=rank, world_size=ctx.get_world_size(), local_rank=ctx.get_local_rank(), report=report)
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


def _init_ray(cluster: ClusterConfig) -> bool:
    """Connect to the cluster file's Ray, or start one here with its dashboard on loopback."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": "WARNING"}
    if cluster.address in (None, "local"):
        ray.init(num_cpus=cluster.num_cpus, dashboard_host=cluster.dashboard_host, **kwargs)
    else:
        try:
            ray.init(address=cluster.address, **kwargs)
        except Exception as e:
            raise DistsftError(f"cluster address {cluster.address}: cannot connect to Ray: {e}") from None
    return True


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


class _MetricsPrinter:
    """Prints the coordinator's merged records on the driver as they land in metrics.jsonl."""

    def __init__(self, path: Path, total_steps: int, log_every: int) -> None:
        self.path, self.total, self.every = path, total_steps, log_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._pos = 0

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._drain()

    def _drain(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a record still being written; read it next time
                self._pos += len(line)
                rec = json.loads(line)
                if should_print(rec, self.total, self.every):
                    print(format_record(rec, self.total), flush=True)
