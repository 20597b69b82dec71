"""The story of a run: check the config and the model, prepare the data once on the driver, train, and
end with a Hugging Face model directory and a summary.

``--local`` runs the loop in this process (world size 1, no Ray): the single-GPU debug mode, and the
mode every path can be tested in on a CPU. Otherwise Ray places one worker per accelerator (or CPU slot)
as the cluster file says and each runs the very same loop (``distsft/ray_launch.py``). The data is
prepared once, on this machine or on Ray Data across the cluster (``data.engine``); workers memory-map
the prepared rows where they can see them, else get them through Ray's object store.

The console is for a person: where the resolved config is saved and how it differs from the defaults,
the model and data lines, where each worker runs, progress, the summary. Everything else (and the same
lines) goes to ``output_dir/logs/driver.log``; the workers' own output to ``output_dir/logs/rank-N.log``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from distsft import checkpoint
from distsft.checkpoint import storage
from distsft.checkpoint.export import export
from distsft.config import Config, flatten, save_config
from distsft.config.cluster import ClusterConfig
from distsft.data.prepare import PreparedData, prepare
from distsft.data.sampler import total_steps
from distsft.errors import ConfigError
from distsft.launcher.ray_train import ray_session
from distsft.metrics.console import driver_log
from distsft.metrics.display import Display, check_logging
from distsft.metrics.jsonl import read_metrics
from distsft.metrics.records import RecordSink, local_sender
from distsft.metrics.summary import add_run_figures, format_summary
from distsft.model.loading import load_tokenizer, materialize_demo

RAY_ENGINE_BYTES = 1 << 30
"""``data.engine: auto`` prepares on Ray Data from this much input (or on a cluster of several nodes)."""


def data_engine(cfg: Config, cluster: ClusterConfig | None) -> str:
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
    if any(s.kind not in ("jsonl", "parquet", "saved") for s in sources):
        return "local"
    size = sum(f.stat().st_size for s in sources for f in _files(Path(s.path)))
    return "ray" if cluster.num_nodes > 1 or size >= RAY_ENGINE_BYTES else "local"


def _files(p: Path) -> list[Path]:
    return [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]


def prepare_data(cfg: Config, engine: str = "local") -> PreparedData:
    """The prepared rows; ``engine`` ``ray`` runs the work on Ray Data (on the Ray this process is connected
    to, or on a local instance started for it and stopped after)."""
    tokenizer = load_tokenizer(cfg.model)
    if engine != "ray":
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


def launch_local(cfg: Config, quiet: bool = False, verbose: bool = False) -> dict[str, Any]:
    import torch

    from distsft.training.loop import WorkerContext, train

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    with driver_log(Path(cfg.output_dir), verbose):
        out, data, t0 = _start(cfg, quiet, device_type, 1, data_engine(cfg, None))
        root = checkpoint_root(cfg, None)
        meta, start_step = _resume_plan(cfg, root, world_size=1, data=data)
        steps = total_steps(len(data.train), cfg.batch_plan(1), cfg.train.max_steps, cfg.train.epochs)
        display = Display(cfg, steps, start_step)
        reporter = local_sender(RecordSink(str(out), 1, start_step, on_record=display))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            with StopOnSignal() as stop:
                ctx = WorkerContext(
                    report=reporter.report,
                    flush=reporter.flush,
                    wait=reporter.wait,
                    checkpoint_dir=str(root),
                    should_stop=stop.is_set,
                    run_meta=meta,
                )
                summary = train(cfg, data.train, data.eval, ctx)
        finally:
            display.close()
        return _finish(cfg, out, root, summary, data, t0, start_step)


def launch_ray(cfg: Config, cluster: ClusterConfig, quiet: bool = False, verbose: bool = False) -> dict[str, Any]:
    from distsft.launcher.ray_train import check_storage, run_workers

    cfg = absolute_paths(cfg)  # workers run in their own directories
    check_storage(cluster)
    engine = data_engine(cfg, cluster)
    with driver_log(Path(cfg.output_dir), verbose), ray_session(cluster, Path(cfg.output_dir), verbose, engine):
        if not quiet:
            print(f"cluster: {describe_cluster(cluster)}", flush=True)
        out, data, t0 = _start(cfg, quiet, "cuda" if cluster.use_gpu else "cpu", cluster.num_workers, engine)
        root = checkpoint_root(cfg, cluster)
        meta, start_step = _resume_plan(cfg, root, world_size=cluster.num_workers, data=data)
        steps = total_steps(len(data.train), cfg.batch_plan(cluster.num_workers), cfg.train.max_steps, cfg.train.epochs)
        display = Display(cfg, steps, start_step)
        try:
            with StopOnSignal() as stop:
                run_workers(cfg, cluster, data, root, meta, start_step, display, stop, verbose, engine)
        finally:
            display.close()
        rows = read_metrics(out)
        summary = {"steps": steps, "workers": cluster.num_workers, "start_step": start_step}
        summary["last"] = rows[-1] if rows else {}
        if stop.is_set():
            summary["stopped_at"] = summary["last"].get("step")
        return _finish(cfg, out, root, summary, data, t0, start_step)


def _start(
    cfg: Config, quiet: bool, device_type: str, world_size: int, engine: str
) -> tuple[Path, PreparedData, float]:
    check_logging(cfg.logging)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if not quiet:
        changed = ", ".join(f"{k}={v}" for k, v in config_changes(cfg)) or "nothing"
        print(f"config: {out / 'config.yaml'} (changed from the defaults: {changed})", flush=True)
    cfg.batch_plan(world_size)  # a sequence-parallel size that does not divide the workers fails here
    check_model(cfg, device_type)
    if cfg.model.path == "demo":
        materialize_demo(cfg.train.seed)  # once here, rather than by every worker at the same time
    t0 = time.perf_counter()
    data = prepare_data(cfg, engine)
    s = data.stats.as_dict()
    print(
        f"data: {s['rows_read']} rows read, {s['kept']} kept, {s['rejected']} rejected, {s['too_long']} too long; "
        f"{s['packed_rows']} rows of <= {s['max_seq_len']} tokens (packing efficiency {s['packing_efficiency']:.1%}), "
        f"{s['supervised_tokens']} supervised tokens [{'cached' if data.cache_hit else 'prepared'} in "
        f"{time.perf_counter() - t0:.1f}s{' on Ray Data' if engine == 'ray' and not data.cache_hit else ''}]",
        flush=True,
    )
    return out, data, t0


def check_model(cfg: Config, device_type: str) -> str:
    """Read the model family's traits (config and class only, no weights), refuse what it cannot train,
    and say what it will run with; workers make the same choice on their own device."""
    import torch

    from distsft.model.loading import model_plan
    from distsft.model.traits import check_training_fit
    from distsft.training import sequence_parallel

    traits, attn = model_plan(cfg.model, torch.device(device_type))
    check_training_fit(traits, cfg.data.packing, cfg.train.router_aux_loss_coef)
    sequence_parallel.check(cfg.train.sequence_parallel, traits, attn)
    line = f"model: {traits.describe(attn)}"
    print(line, flush=True)
    return line


def config_changes(cfg: Config) -> list[tuple[str, Any]]:
    """Keys whose value differs from the built-in default (dotted, in the config's order)."""
    from distsft.config import Config as Defaults

    mine, default = flatten(cfg.to_dict()), flatten(Defaults().to_dict())
    same_path = Path(str(mine["output_dir"])).resolve() == Path(str(default["output_dir"])).resolve()
    return [(k, v) for k, v in mine.items() if default.get(k) != v and not (k == "output_dir" and same_path)]


def describe_cluster(cluster: ClusterConfig) -> str:
    where = cluster.address or "a Ray instance started here"
    r = cluster.resources_per_worker
    gpus = f", {r.gpus:g} GPU" if r.gpus else ""
    env = f"; env for workers: {', '.join(sorted(cluster.env))} (values not shown)" if cluster.env else ""
    return (
        f"{where}; {cluster.num_workers} workers ({cluster.num_nodes} node(s) x {cluster.workers_per_node}), "
        f"{r.cpus:g} CPU{gpus} each, placement {cluster.placement_strategy}{env}"
    )


def _finish(
    cfg: Config, out: Path, root: Any, summary: dict[str, Any], data: PreparedData, t0: float, start_step: int
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


def checkpoint_root(cfg: Config, cluster: ClusterConfig | None) -> str | Path:
    """``output_dir/checkpoints`` locally; under the cluster's storage path (a shared filesystem or an
    object store) on Ray."""
    if cluster is not None and cluster.storage_path:
        base: str | Path = cluster.storage_path
        if not storage.is_remote(base):
            base = Path(base).expanduser().resolve()
        return storage.join(base, Path(cfg.output_dir).name, "checkpoints")
    return Path(cfg.output_dir).resolve() / "checkpoints"


def _resume_plan(cfg: Config, root: Any, world_size: int, data: PreparedData) -> tuple[dict[str, Any], int]:
    """Validate the checkpoint this launch will continue from, before any worker starts; returns the run's
    metadata and the step it starts after (0 for a fresh run)."""
    from distsft.training.engine import engine_stage

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


class StopOnSignal:
    """SIGTERM/SIGINT ask the run to save a checkpoint and exit (at the next step whose records are read,
    every ``train.log_every`` steps); a second signal aborts. ``on_stop`` also tells remote workers."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.on_stop = None
        self._old: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    def __enter__(self):
        self.install()
        return self

    def install(self) -> None:
        """(Again) make ours the handlers: starting Ray installs its own, which end the process."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old = signal.signal(sig, self._handle)
                self._old.setdefault(sig, old)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt
        print(
            f"\n{signal.Signals(signum).name}: saving a checkpoint and exiting (send it again to abort without saving)",
            flush=True,
        )
        self._event.set()
        if self.on_stop is not None:
            self.on_stop()


def absolute_paths(cfg: Config) -> Config:
    """Relative paths mean the driver's working directory; workers must see them the same way."""

    def fix(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p and p != "demo" and Path(p).exists() else p

    model = dataclasses.replace(cfg.model, path=fix(cfg.model.path), tokenizer=fix(cfg.model.tokenizer))
    return dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()), model=model)
