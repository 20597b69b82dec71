"""``distsft doctor``: what a failed run would otherwise teach an operator in its first hour, checked
before any real work, one line per check (ok, or the problem and its fix); exit 0 only when all pass.

The checks, in the order a run meets them: Ray reachable (with its token); nodes and their resources
against the cluster file; the same versions on the launcher and every node; ``storage_path`` written on
each node and read on every other (or the object store reachable from each); one tiny all-reduce across
one worker per node over the run's backend, joined as a training worker joins; GPUs visible where asked;
free disk against the checkpoint size the dry run computes. What runs on the nodes is ``probe.py``.

``distsft launch`` runs the cheap part (Ray, nodes, versions) before it prepares data (``preflight``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsft.config import Config
from distsft.config.cluster import ClusterConfig
from distsft.errors import ConfigError, DistsftError, first_line
from distsft.launcher import probe
from distsft.launcher.ray_session import RaySession

GiB = 1024**3
PROBE_TIMEOUT_S = 120.0
"""How long a node may take to answer (its runtime_env is set up first, as for a training worker)."""


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    text: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'PROBLEM':<7}  {self.check:<8}  {self.text}"


def examine(cluster: ClusterConfig, cfg: Config, say: Callable[[Finding], None] = lambda f: None) -> list[Finding]:
    """Every check, each said as soon as it is known; the ones that need Ray are left out without it."""
    found: list[Finding] = []

    def add(finding: Finding) -> None:
        found.append(finding)
        say(finding)

    logs = Path(tempfile.mkdtemp(prefix="distsft-doctor-"))
    try:
        with RaySession(cluster, logs, verbose=False) as session:
            t0 = time.perf_counter()
            try:
                session.ensure()
            except DistsftError as e:
                add(Finding("ray", False, f"{e} (the other checks need Ray)"))
                return found
            add(ray_finding(cluster, time.perf_counter() - t0))
            nodes = alive_nodes()
            add(nodes_finding(cluster, nodes))
            storage_path = resolved_storage(cluster)
            stamp = uuid.uuid4().hex[:12]
            infos = probe_nodes(cluster, nodes, probe.describe_node, storage_path, stamp)
            add(versions_finding(infos))
            add(storage_finding(cluster, nodes, storage_path, stamp, infos))
            reduced, network = network_finding(cluster, nodes, infos)
            add(network)
            add(gpu_finding(cluster, nodes, reduced))
            add(disk_finding(cfg, cluster, storage_path, infos))
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return found


def preflight(cluster: ClusterConfig) -> list[str]:
    """The cheap part, for ``launch`` on a cluster it joins: the nodes it has now (a note when they cannot
    hold the workers yet: an autoscaler or late nodes may still come) and the versions on them (different
    ones end the launch here, before data preparation and placement). Needs Ray connected."""
    nodes = alive_nodes()
    notes = []
    held = nodes_finding(cluster, nodes)
    if not held.ok:
        notes.append(f"cluster: {held.text}; waiting up to placement_timeout_s for more")
    versions = versions_finding(probe_nodes(cluster, nodes, probe.versions))
    if not versions.ok:
        raise DistsftError(f"{versions.text}; `distsft doctor --cluster FILE` runs every check")
    return notes


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeManagerAddress"])


def ray_finding(cluster: ClusterConfig, seconds: float) -> Finding:
    import os

    import ray

    where = cluster.address or "a Ray instance started here"
    auth = "token authentication" if os.environ.get("RAY_AUTH_MODE") == "token" else "no authentication"
    return Finding("ray", True, f"{where}: connected in {seconds:.1f}s (Ray {ray.__version__}, {auth})")


def _holds(node: dict[str, Any], bundle: dict[str, float]) -> int:
    """How many workers' bundles the node's resources hold."""
    have = node.get("Resources", {})
    return int(min(have.get(k, 0.0) / v for k, v in bundle.items() if v > 0) + 1e-9)


def _describe(node: dict[str, Any]) -> str:
    r = node.get("Resources", {})
    gpu = f", {r['GPU']:g} GPU" if r.get("GPU") else ""
    return f"{node['NodeManagerAddress']} ({r.get('CPU', 0):g} CPU{gpu}, {r.get('memory', 0) / GiB:.1f} GiB)"


def nodes_finding(cluster: ClusterConfig, nodes: list[dict[str, Any]]) -> Finding:
    bundle = cluster.bundle()
    holds = [_holds(n, bundle) for n in nodes]
    placeable = {
        "STRICT_PACK": max(holds, default=0),
        "STRICT_SPREAD": sum(1 for h in holds if h),
    }.get(cluster.placement_strategy, sum(holds))
    need = ", ".join(f"{k} {v:g}" for k, v in bundle.items() if not k.startswith("accelerator_type:"))
    label = cluster.resources_per_worker.accelerator_type
    asks = (
        f"the cluster file asks for {cluster.num_nodes} node(s) x {cluster.workers_per_node} worker(s) of "
        f"{need}{f' on {label}' if label else ''} ({cluster.placement_strategy})"
    )
    have = f"{len(nodes)} node(s) alive: " + ", ".join(_describe(n) for n in nodes)
    if placeable >= cluster.num_workers:
        return Finding("nodes", True, f"{have}; {asks}: all {cluster.num_workers} fit")
    if cluster.elastic and placeable >= (cluster.min_workers or 0):
        return Finding(
            "nodes", True, f"{have}; {asks}: {placeable} fit now (elastic, min_workers {cluster.min_workers})"
        )
    return Finding(
        "nodes",
        False,
        f"{have}; {asks}: only {placeable} fit; start the missing nodes (`ray start --address=HEAD:6379` on "
        "each) or lower num_nodes, workers_per_node or resources_per_worker",
    )


def resolved_storage(cluster: ClusterConfig) -> str | None:
    """``storage_path`` as workers get it: a local path made absolute on the launcher, as a launch does."""
    from distsft.checkpoint import storage

    return str(storage.absolute(cluster.storage_path)) if cluster.storage_path else None


def probe_nodes(cluster: ClusterConfig, nodes: list[dict[str, Any]], fn: Callable, *args: Any) -> dict[str, Any]:
    """``fn(*args)`` on every node, as a zero-CPU task pinned there with the workers' runtime_env: node IP ->
    its answer, or an ``Exception`` when it failed or did not answer within ``PROBE_TIMEOUT_S``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from distsft.launcher.ray_train import worker_runtime_env, worker_secrets

    task = ray.remote(num_cpus=0, max_retries=0)(_with_env)
    env, secrets = worker_runtime_env(cluster), worker_secrets(cluster)
    refs = {
        n["NodeManagerAddress"]: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False), runtime_env=env
        ).remote(secrets, fn, *args)
        for n in nodes
    }
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    answers: dict[str, Any] = {}
    for ip, ref in refs.items():
        try:
            answers[ip] = ray.get(ref, timeout=0.1)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            answers[ip] = TimeoutError(f"no answer within {PROBE_TIMEOUT_S:g}s")
        except ray.exceptions.RayError as e:
            answers[ip] = _cause(e)
    return answers


def _cause(e: Exception) -> Exception:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


def versions_finding(infos: dict[str, Any]) -> Finding:
    mine = probe.versions()
    differ, silent = [], []
    for ip, info in infos.items():
        if isinstance(info, Exception):
            silent.append(f"{ip}: {first_line(info, 1000)}")
            continue
        theirs = info.get("versions", info)
        differ += [f"{k} {theirs.get(k)} on {ip} but {mine[k]} here" for k in mine if theirs.get(k) != mine[k]]
    listed = ", ".join(f"{k} {v}" for k, v in mine.items())
    if silent:
        return Finding("versions", False, f"node(s) did not answer: {'; '.join(silent)}")
    if differ:
        return Finding(
            "versions",
            False,
            f"{'; '.join(differ)} (the launcher); install the same versions on every node (one container "
            "image, or one environment on a path every node mounts)",
        )
    return Finding("versions", True, f"{listed} on the launcher and on all {len(infos)} node(s)")


def storage_finding(
    cluster: ClusterConfig, nodes: list[dict[str, Any]], storage_path: str | None, stamp: str, infos: dict[str, Any]
) -> Finding:
    from distsft.checkpoint import storage
    from distsft.launcher.ray_train import check_storage

    if not storage_path:
        try:
            check_storage(cluster)
        except ConfigError as e:
            return Finding("storage", False, str(e))
        return Finding("storage", True, "no storage_path: checkpoints go under output_dir on this one node")
    written = {ip for ip, i in infos.items() if isinstance(i, dict) and not i.get("write_error")}
    problems = [
        f"{ip} cannot write there: {i['write_error']}"
        for ip, i in infos.items()
        if isinstance(i, dict) and i.get("write_error")
    ]
    seen = probe_nodes(cluster, nodes, probe.seen_stamps, storage_path, stamp)
    seen["the launcher"] = probe.seen_stamps(storage_path, stamp)
    for reader, names in seen.items():
        if isinstance(names, (Exception, str)):
            problems.append(f"{reader} cannot read there: {names}")
            continue
        missing = sorted(written - set(names) - {reader})
        if missing:
            problems.append(f"{reader} does not see the files {', '.join(missing)} wrote")
    nodes_seen = [(r, n) for r, n in seen.items() if r != "the launcher"]
    if len(written) > 1 and all(isinstance(n, list) and set(n) <= {r} for r, n in nodes_seen):
        problems = [p for p in problems if "does not see" not in p]  # the common case, in one phrase
        problems.append(f"each of {', '.join(r for r, _ in nodes_seen)} sees only its own file")
    probe_nodes(cluster, nodes, probe.remove_stamps, storage_path, stamp)
    probe.remove_stamps(storage_path, stamp)
    kind = "an object store" if storage.is_remote(storage_path) else "a shared filesystem"
    if problems:
        fix = (
            "use a filesystem every node mounts at the same path (NFS, Lustre, a ReadWriteMany volume) or an "
            "object store (s3://bucket/prefix)"
            if not storage.is_remote(storage_path)
            else "check the credentials and endpoint (AWS_* in the cluster file's env) on every node"
        )
        return Finding("storage", False, f"storage_path {storage_path} is not shared: {'; '.join(problems)}; {fix}")
    return Finding(
        "storage",
        True,
        f"{storage_path}: a file written on each of {len(written)} node(s) is read on every other and by the "
        f"launcher ({kind})",
    )


def _with_env(secrets: dict[str, str], fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` with the cluster's secret variables set, as a worker has them (never a runtime_env)."""
    os.environ.update(secrets)
    return fn(*args)


def network_finding(
    cluster: ClusterConfig, nodes: list[dict[str, Any]], infos: dict[str, Any]
) -> tuple[list[dict[str, Any]], Finding]:
    """One worker per node that can hold one, joined as training workers join, one all-reduce."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from distsft.launcher.ray_train import worker_runtime_env

    backend = cluster.process_group_backend
    hosts = [n for n in nodes if _holds(n, cluster.bundle())] or nodes
    gpus = cluster.resources_per_worker.gpus
    actor = ray.remote(probe.ReduceProbe)
    actors = [
        actor.options(
            num_cpus=0,
            num_gpus=min(gpus, 1.0),
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            runtime_env=worker_runtime_env(cluster),
        ).remote()
        for n in hosts
    ]
    try:
        try:
            address, port = ray.get(actors[0].address.remote(), timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.RayError as e:
            return [], Finding("network", False, f"no worker started on {hosts[0]['NodeManagerAddress']}: {e}")
        fields = {
            "backend": backend,
            "world_size": len(actors),
            "address": address,
            "port": port,
            "rendezvous_timeout_s": cluster.rendezvous_timeout_s,
            "collective_timeout_s": min(cluster.collective_timeout_s, 60.0),
        }
        refs = [a.all_reduce.remote({**fields, "rank": rank}) for rank, a in enumerate(actors)]
        ray.wait(refs, num_returns=len(refs), timeout=cluster.rendezvous_timeout_s + PROBE_TIMEOUT_S)
        results, errors = [], []
        for n, ref in zip(hosts, refs, strict=True):
            try:
                results.append(ray.get(ref, timeout=0.1))
            except ray.exceptions.GetTimeoutError:
                errors.append(f"{n['NodeManagerAddress']}: no answer")
            except ray.exceptions.RayError as e:
                errors.append(f"{n['NodeManagerAddress']}: {first_line(_cause(e), 1000)}")
    finally:
        for a in actors:
            ray.kill(a)
    loopback = sorted(
        ip for ip, i in infos.items() if isinstance(i, dict) and str(i.get("resolves_to") or "").startswith("127.")
    )
    note = f"; host names resolve to loopback on {', '.join(loopback)}" if loopback and len(hosts) > 1 else ""
    want = len(actors) * (len(actors) + 1) / 2
    if errors or any(r["sum"] != want for r in results):
        others = f"; {', '.join(e.split(':')[0] for e in errors[1:])} failed too" if len(errors) > 1 else ""
        first = errors[0] if errors else f"the sum came out wrong: {[r['sum'] for r in results]}"
        return results, Finding("network", False, f"all-reduce over {backend} failed: {first}{others}{note}")
    if note:
        note += " (the interfaces above are used instead)"
    via = ", ".join(f"{r['ip']} via {r['interface'] or '?'}" for r in results)
    slowest = max(r["seconds"] for r in results)
    return results, Finding(
        "network", True, f"all-reduce over {backend} across {len(results)} node(s) in {slowest:.1f}s: {via}{note}"
    )


def gpu_finding(cluster: ClusterConfig, nodes: list[dict[str, Any]], reduced: list[dict[str, Any]]) -> Finding:
    if not cluster.use_gpu:
        return Finding("gpus", True, "none asked (resources_per_worker.gpus is 0: workers train on CPUs)")
    blind = [r["ip"] for r in reduced if not r["gpus"]]
    if not reduced or blind:
        where = ", ".join(blind) or "any node"
        return Finding(
            "gpus",
            False,
            f"a worker given a GPU by Ray sees none on {where}: check the NVIDIA driver and CUDA_VISIBLE_DEVICES "
            "there, and that Ray was started with the node's GPUs (`ray start --num-gpus`)",
        )
    per_node = ", ".join(f"{n['NodeManagerAddress']} {n.get('Resources', {}).get('GPU', 0):g}" for n in nodes)
    emulated = [r["ip"] for r in reduced if not r.get("native_bf16", True)]
    if emulated:
        return Finding(
            "gpus",
            False,
            f"the GPUs on {', '.join(emulated)} only emulate bf16 (V100, T4): model.dtype auto trains in fp32 there, "
            "at a fraction of the speed; use GPUs with bf16 (Ampere or newer) or set model.dtype explicitly",
        )
    env = reduced[0].get("env", {})
    if env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == "0":
        return Finding(
            "gpus",
            False,
            "TORCH_NCCL_ASYNC_ERROR_HANDLING=0 on the workers: a timed-out NCCL collective then hangs instead of "
            "ending the worker; unset it (torch's default ends the worker, and Ray restarts the group)",
        )
    return Finding(
        "gpus",
        True,
        f"{reduced[0]['gpu_name']} seen by a worker on each node; GPUs in Ray: {per_node}; "
        + gpu_settings(env, cluster.collective_timeout_s),
    )


def gpu_settings(env: dict[str, str], collective_timeout_s: float) -> str:
    """What the workers will run with: distsft's choices, or the cluster's own settings where they override."""
    alloc = env.get("PYTORCH_ALLOC_CONF") or env.get("PYTORCH_CUDA_ALLOC_CONF")
    parts = [f"allocator {alloc} (the cluster's)" if alloc else "allocator expandable_segments:True (distsft's)"]
    parts.append(f"NCCL async error handling {env.get('TORCH_NCCL_ASYNC_ERROR_HANDLING') or '3 (torch default)'}")
    parts.append(f"collectives bounded by collective_timeout_s={collective_timeout_s:g}s")
    return "; ".join(parts)


def disk_finding(cfg: Config, cluster: ClusterConfig, storage_path: str | None, infos: dict[str, Any]) -> Finding:
    from distsft.checkpoint import storage
    from distsft.launcher.dry_run import _bytes, checkpoint_bytes, model_sizes

    sizes = model_sizes(cfg, "cuda" if cluster.use_gpu else "cpu")
    if sizes is None:
        return Finding("disk", True, f"not checked: the config of model {cfg.model.path} is out of reach here")
    one, most = checkpoint_bytes(cfg, sizes, cluster.use_gpu)
    if storage_path and storage.is_remote(storage_path):
        need, what = one / cluster.num_nodes, "one checkpoint's share, staged on its way to the object store"
    elif storage_path:
        need, what = most, f"{cfg.checkpoint.keep_last} checkpoints + the one being written"
    else:
        need, what = most, "every checkpoint, under output_dir"
    short, free = [], []
    for ip, info in infos.items():
        if not isinstance(info, dict):
            continue
        disk = info["disk"]
        free.append(f"{ip} {_bytes(disk['free'])}")
        if disk["free"] < need:
            short.append(f"{ip} has {_bytes(disk['free'])} free at {disk['path']}")
    final = (sizes.trainable if cfg.lora.r else sizes.total) * 4
    launcher = probe.free_disk(str(Path(cfg.output_dir).resolve()))  # output_dir's nearest existing directory
    here = launcher["free"]
    if cfg.checkpoint.final and here < final:
        short.append(
            f"the launcher has {_bytes(here)} free at {launcher['path']} for the final export of {_bytes(final)}"
        )
    text = f"checkpoints of {_bytes(one)} each need {_bytes(need)} per node ({what})"
    if short:
        return Finding("disk", False, f"{text}: {'; '.join(short)}; free space or lower checkpoint.keep_last")
    return Finding("disk", True, f"{text}; free: {', '.join(free)}; the launcher {_bytes(here)} for the final export")


def report(found: list[Finding], seconds: float) -> str:
    bad = [f for f in found if not f.ok]
    if bad:
        return f"doctor: {len(bad)} problem(s) in {len(found)} checks ({seconds:.1f}s)"
    return f"doctor: all {len(found)} checks passed ({seconds:.1f}s)"
