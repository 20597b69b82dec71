"""The story of a run: check the config and the model, prepare the data once on the driver, train, and
end with a Hugging Face model directory and a summary.

``--local`` runs the loop in this process (world size 1, no Ray): the single-GPU debug mode, and the
mode every path can be tested in on a CPU. Otherwise Ray places one worker per accelerator (or CPU slot)
as the cluster file says and each runs the very same loop (``launcher/ray_train.py``). The data is
prepared once, on this machine or on Ray Data across the cluster (``data.engine``); workers memory-map
the prepared rows where they can see them, else get them through Ray's object store.

The console is for a person: where the resolved config is saved and how it differs from the defaults,
the model and data lines, where each worker runs, progress, the summary. Everything else (and the same
lines) goes to ``output_dir/logs/driver.log``; the workers' own output to ``output_dir/logs/rank-N.log``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from distsft import checkpoint
from distsft.checkpoint import Location, ResumePlan, storage
from distsft.checkpoint.export import check_out, export
from distsft.config import Config, flatten, save_config
from distsft.config.cluster import ClusterConfig, is_loopback
from distsft.config.schema import is_inline_template
from distsft.data.prepare import PreparedData
from distsft.data.sampler import total_steps
from distsft.errors import ConfigError, DistsftError
from distsft.host import BusyError, DirectoryLock, write_atomic
from distsft.launcher.prepare import choose_data_runner, prepare_data
from distsft.launcher.ray_session import RaySession
from distsft.launcher.stop import StopOnSignal
from distsft.metrics.console import driver_log
from distsft.metrics.display import Display, check_logging
from distsft.metrics.jsonl import read_metrics
from distsft.metrics.records import RecordSink, local_sender
from distsft.metrics.summary import add_run_figures, format_summary
from distsft.model.loading import materialize_demo
from distsft.training.engine import deepspeed_plan


def launch_local(
    cfg: Config, quiet: bool = False, verbose: bool = False, rows: PreparedData | None = None
) -> dict[str, Any]:
    """``rows``: train on these prepared rows rather than preparing ``cfg.data`` (``distsft verify`` gives
    each variant the very rows it compares)."""
    import torch

    from distsft.training.evaluate import eval_sets
    from distsft.training.loop import WorkerContext, train

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    with run_lock(Path(cfg.output_dir)), driver_log(Path(cfg.output_dir), verbose):
        out, data, t0 = _start(cfg, quiet, device_type, 1, choose_data_runner(cfg, None), rows=rows)
        root = checkpoint_root(cfg, None)
        resume = decide_resume(cfg, root, 1, data)
        steps = total_steps(len(data.train), cfg.batch_plan(1), cfg.train.max_steps, cfg.train.epochs)
        display = Display(cfg, steps, resume.step)
        sender = local_sender(RecordSink(str(out), 1, resume.step, on_record=display))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            with StopOnSignal() as stop:
                ctx = WorkerContext(
                    checkpoint_dir=root,
                    resume=resume,
                    report=sender.report,
                    flush=sender.flush,
                    wait=sender.wait,
                    should_stop=stop.is_set,
                )
                evals = eval_sets(data.eval, {name: d.train for name, d in data.evals.items()})
                summary = {"workers": 1, **train(cfg, data.train, evals, ctx)}
        finally:
            display.close()
        return _finish(cfg, out, root, summary, data, t0, resume.step)


def launch_ray(
    cfg: Config, cluster: ClusterConfig, quiet: bool = False, verbose: bool = False, rows: PreparedData | None = None
) -> dict[str, Any]:
    from distsft.launcher.ray_train import Launch, check_storage, run_elastic, run_workers

    cfg = absolute_paths(cfg)  # workers run in their own directories
    check_storage(cluster)
    os.environ.setdefault("DISTSFT_STORAGE_RETRY_S", f"{cluster.storage_retry_s:g}")  # the driver reads them too
    if cluster.elastic and cfg.train.global_batch_size is None:
        raise ConfigError(
            f"the cluster's min_workers = {cluster.min_workers} lets the run go on with fewer workers: set "
            "train.global_batch_size (rows per step) so that the batch, and the run, stay the same"
        )
    runner = choose_data_runner(cfg, cluster)
    out_dir = Path(cfg.output_dir)
    with run_lock(out_dir), driver_log(out_dir, verbose), RaySession(cluster, out_dir, verbose) as session:
        if not quiet:
            print(f"cluster: {describe_cluster(cluster)}", flush=True)
        if cluster.address in (None, "local") and not is_loopback(cluster.dashboard_host):
            print(
                f"warning: Ray's dashboard listens on {cluster.dashboard_host} (allow_remote_dashboard: true): "
                "whoever reaches its port can run code as you",
                flush=True,
            )
        if cluster.address not in (None, "local"):  # the cheap checks of `distsft doctor`, before any work
            from distsft.launcher.doctor import preflight

            session.ensure()
            for note in preflight(cluster):
                print(note, flush=True)
        if runner == "ray":  # the instance that prepares the rows is the one that trains on them
            session.ensure()
        device_type = "cuda" if cluster.use_gpu else "cpu"  # the workers' device: never touched from here
        # Ray's start (seconds: its processes) beside the config, model and data checks on this machine
        started = Background(_start, cfg, quiet, device_type, cluster.num_workers, runner, False, rows)
        with contextlib.suppress(Exception):  # a failing start-up is said by _start's own error first
            session.ensure()  # Ray stays in the main thread, where it installs its signal handlers
        out, data, t0 = started.result()
        session.ensure()  # where Ray failed to start above, its own error now
        root = checkpoint_root(cfg, cluster)
        resume = decide_resume(cfg, root, cluster.num_workers, data)
        steps = total_steps(len(data.train), cfg.batch_plan(cluster.num_workers), cfg.train.max_steps, cfg.train.epochs)
        display = Display(cfg, steps, resume.step)
        try:
            with StopOnSignal() as stop:
                try:
                    workers = cluster.num_workers
                    launch = Launch(cfg, cluster, session, data, root, display, stop, runner)
                    if cluster.elastic:
                        ran, workers = run_elastic(launch, resume)
                    else:
                        ran = run_workers(launch, resume)
                finally:  # Ray down while our handlers still hold: its shutdown must not meet the default
                    session.close()
        finally:
            display.close()
        summary: dict[str, Any] = {"steps": steps, "workers": workers, "start_step": resume.step, **ran}
        if "last" not in summary:
            rows = read_metrics(out)
            summary["last"] = rows[-1] if rows else {}
        return _finish(cfg, out, root, summary, data, t0, resume.step)


class Background:
    """``fn(*args)`` in a daemon thread: a Ctrl-C of the main thread ends the launch at once, without
    waiting for it (a pool's thread would be joined at exit); ``result()`` returns or raises what it did."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._out: list[Any] = []
        self._error: list[BaseException] = []

        def run() -> None:
            try:
                self._out.append(fn(*args))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self._error.append(e)

        self._thread = threading.Thread(target=run, name="distsft-start", daemon=True)
        self._thread.start()

    def result(self) -> Any:
        while self._thread.is_alive():
            self._thread.join(0.2)  # in short waits, so that a Ctrl-C is taken at once
        if self._error:
            raise self._error[0]
        return self._out[0]


def decide_resume(cfg: Config, root: Location, world_size: int, data: PreparedData) -> ResumePlan:
    """The checkpoint this launch continues from, validated before any worker starts (and said)."""
    from distsft.checkpoint import auth

    # Whether manifests are signed and checked, for this process and (``worker_secrets``) its workers; a bad
    # key file is said here, before any work.
    os.environ[auth.ENV_SWITCH] = "on" if cfg.checkpoint.authenticate else "off"
    auth.key()
    plan, diffs = checkpoint.decide_resume(
        cfg.checkpoint.resume,
        root,
        cfg.to_dict(),
        world_size,
        data.cache_dir.name if data.cache_dir else "",
        deepspeed_plan(cfg, world_size).layout,
        cfg.checkpoint.allow_changes,
        verify_files=world_size == 1,  # one worker reads the whole checkpoint anyway; more verify their own
    )
    if plan.checkpoint is not None:
        check_owner(cfg, root, plan.checkpoint)
        note = f" (allowed changes: {'; '.join(diffs)})" if diffs else ""
        print(f"resuming from {plan.checkpoint} (step {plan.step}){note}", flush=True)
        said = checkpoint.convert_for(plan.checkpoint, world_size, deepspeed_plan(cfg, world_size).layout)
        if said:
            print(said, flush=True)
    return plan


def check_owner(cfg: Config, root: Location, ckpt: str) -> None:
    """Under a cluster's storage_path, checkpoints live in ``storage_path/<output_dir's name>``: two runs
    whose output directories share a name would share them. One whose checkpoints another run wrote is
    refused rather than resumed from them (or its saves rotating theirs away)."""
    if not storage.is_remote(root) and Path(cfg.output_dir).resolve() in Path(root).parents:
        return  # the run's own output_dir/checkpoints
    theirs = ((checkpoint.read_manifest(ckpt) or {}).get("config") or {}).get("output_dir")
    if theirs and Path(str(theirs)).resolve() != Path(cfg.output_dir).resolve():
        raise ConfigError(
            f"checkpoints {root} belong to the run whose output_dir is {theirs}, not {cfg.output_dir}: two runs "
            "whose output directories share a name would share them; give this run's output_dir another name"
        )


def _start(
    cfg: Config,
    quiet: bool,
    device_type: str,
    world_size: int,
    runner: str,
    probe: bool = True,
    rows: PreparedData | None = None,
) -> tuple[Path, PreparedData, float]:
    """What every launch does first, in this order: the config saved and its changes said, the batch plan
    and the model checked (no weights; ``probe=False``: without touching a GPU here), the data prepared
    and described."""
    check_logging(cfg.logging)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if not quiet:
        changed = ", ".join(f"{k}={v}" for k, v in config_changes(cfg)) or "nothing"
        print(f"config: {out / 'config.yaml'} (changed from the defaults: {changed})", flush=True)
    cfg.batch_plan(world_size)  # a sequence-parallel size that does not divide the workers fails here
    check_model(cfg, device_type, probe)
    if cfg.model.path == "demo":
        materialize_demo(cfg.train.seed)  # once here, rather than by every worker at the same time
    t0 = time.perf_counter()
    data = rows if rows is not None else prepare_data(cfg, runner)
    s = data.stats.as_dict()
    print(
        f"data: {s['rows_read']} rows read, {s['kept']} kept, {s['rejected']} rejected, {s['too_long']} too long; "
        f"{s['packed_rows']} rows of <= {s['max_seq_len']} tokens (packing efficiency {s['packing_efficiency']:.1%}), "
        f"{s['supervised_tokens']} supervised tokens [{'cached' if data.cache_hit else 'prepared'} in "
        f"{time.perf_counter() - t0:.1f}s{' on Ray Data' if runner == 'ray' and not data.cache_hit else ''}]",
        flush=True,
    )
    if any(k in src for src in s["sources"] for k in ("weight", "epochs", "max_examples")):
        from distsft.data.inspect import describe_source

        print("\n".join(f"data: {describe_source(src)}" for src in s["sources"]), flush=True)
    if s["reasoning_dropped"]:
        print(
            f"data: {s['reasoning_dropped']} rows hold reasoning on turns where the chat template does not "
            "render it; it is left out (README: Data, reasoning)",
            flush=True,
        )
    return out, data, t0


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """This launch owns ``out_dir`` until it ends (``host.DirectoryLock``)."""
    try:
        lock = DirectoryLock(out_dir).__enter__()
    except BusyError as e:
        raise ConfigError(str(e)) from None
    try:
        yield
    finally:
        lock.__exit__()


def check_model(cfg: Config, device_type: str, probe: bool = True) -> str:
    """Read the model family's traits (config and class only, no weights), refuse what it cannot train,
    and say what it will run with; workers make the same choice on their own device. ``probe=False``: the
    Ray driver, which lives for the whole run, creates no CUDA context (it would sit on GPU 0 beside a
    worker, and fail in exclusive-process mode)."""
    import torch

    from distsft.model.loading import traits_and_attention
    from distsft.model.traits import check_context, check_training_fit
    from distsft.training import sequence_parallel

    traits, attn = traits_and_attention(cfg.model, torch.device(device_type), probe=probe)
    check_training_fit(traits, cfg.data.packing, cfg.train.router_aux_loss_coef)
    check_context(traits, cfg.data.max_seq_len)
    sequence_parallel.check(cfg.train.sequence_parallel, traits, attn)
    line = f"model: {traits.describe(attn)}"
    print(line, flush=True)
    return line


def config_changes(cfg: Config) -> list[tuple[str, Any]]:
    """Keys whose value differs from the built-in default (dotted, in the config's order)."""
    mine, default = flatten(cfg.to_dict()), flatten(Config().to_dict())
    same_path = Path(str(mine["output_dir"])).resolve() == Path(str(default["output_dir"])).resolve()
    return [(k, v) for k, v in mine.items() if default.get(k) != v and not (k == "output_dir" and same_path)]


def describe_cluster(cluster: ClusterConfig) -> str:
    where = cluster.address or "a Ray instance started here"
    r = cluster.resources_per_worker
    gpus = f", {r.gpus:g} GPU" if r.gpus else ""
    env = f"; env for workers: {', '.join(sorted(cluster.env))} (values not shown)" if cluster.env else ""
    elastic = f", elastic down to {cluster.min_workers}" if cluster.elastic else ""
    return (
        f"{where}; {cluster.num_workers} workers ({cluster.num_nodes} node(s) x {cluster.workers_per_node}"
        f"{elastic}), {r.cpus:g} CPU{gpus} each, placement {cluster.placement_strategy}{env}"
    )


def _finish(
    cfg: Config, out: Path, root: Location, summary: dict[str, Any], data: PreparedData, t0: float, start_step: int
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
        check_out(out / "final", latest, [] if storage.is_remote(root) else [Path(root)], same_run=True)
        export(latest, out / "final", dtype=summary.get("dtype", "fp32"))  # bf16 from a bf16 run, as on the hub
        summary["final_dir"] = str(out / "final")
        if cfg.checkpoint.verify_export:
            summary["export_verified"] = verify_final(out / "final", latest, cfg.model.trust_remote_code)
    summary["wall_s"] = time.perf_counter() - t0
    add_run_figures(summary, read_metrics(out), out, start_step, plot=cfg.logging.plot)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    if not summary.get("stopped_at"):
        print(format_summary(summary), flush=True)
    return summary


def verify_final(final: Path, ckpt: Location, trust_remote_code: bool = False) -> bool | None:
    """The final export loaded as a server loads it and compared with its checkpoint (``checkpoint/proof``),
    here on the driver, which never built the model; one line per check. A model too large for a quarter of
    this machine's free memory (two copies are built) is left to ``distsft verify --export`` elsewhere.
    Broken weights or logits fail the launch (after everything is saved); a template or stop-token
    finding is said."""
    import psutil

    from distsft.checkpoint import proof

    size = sum(f.stat().st_size for f in final.glob("*.safetensors"))
    if 4 * size > psutil.virtual_memory().available:
        print(f"verify: skipped ({size / 2**30:.1f} GiB): run distsft verify --export {final}", flush=True)
        return None
    findings = proof.prove(final, ckpt, trust_remote_code)
    proof.report(findings, final.parent / "verify-export.json")
    broken = [f for f in findings if not f.ok and f.name in ("weights", "logits")]
    if broken:
        raise ExportBroken(f"the final export {final} does not hold what training held: {broken[0].detail}")
    return all(f.ok for f in findings)


class ExportBroken(DistsftError):
    """The final export loads wrongly or not at all (``distsft verify --export`` says how)."""


def checkpoint_root(cfg: Config, cluster: ClusterConfig | None) -> Location:
    """``output_dir/checkpoints`` locally; under the cluster's storage path (a shared filesystem or an
    object store) on Ray."""
    if cluster is not None and cluster.storage_path:
        return storage.join(storage.absolute(cluster.storage_path), Path(cfg.output_dir).name, "checkpoints")
    return Path(cfg.output_dir).resolve() / "checkpoints"


def absolute_paths(cfg: Config) -> Config:
    """Relative paths mean the driver's working directory; workers must see them the same way."""

    def fix(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p and p != "demo" and Path(p).exists() else p

    template = cfg.model.chat_template  # a file, or the template itself (no path to fix)
    template = template if template is None or is_inline_template(template) else fix(template)
    model = dataclasses.replace(cfg.model, path=fix(cfg.model.path), tokenizer=fix(cfg.model.tokenizer))
    model = dataclasses.replace(model, chat_template=template)
    samples = dataclasses.replace(cfg.train.samples, path=fix(cfg.train.samples.path))  # read by the workers
    train = dataclasses.replace(cfg.train, samples=samples)
    return dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()), model=model, train=train)
