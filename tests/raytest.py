"""Helpers for the Ray tests: small configs whose runs can be compared step by step."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import torch
from conftest import REPO

from distsft.config import load_config
from distsft.config.cluster import ClusterConfig, WorkerResources

SMALL = str(REPO / "tests" / "fixtures" / "support_small.jsonl")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cfg(out, *overrides: str):
    base = [
        f"output_dir={out}",
        f"data.path={SMALL}",
        "data.max_seq_len=256",
        "data.eval_fraction=0",
        "train.max_steps=2",
        "train.lr=1e-4",
        "train.warmup_steps=0",
        "train.log_every=1",
    ]
    return load_config(None, base + list(overrides))


def cluster(workers: int, nodes: int = 1, **kw) -> ClusterConfig:
    """Two or more nodes need a shared storage_path; on one machine any directory is shared."""
    return ClusterConfig(num_nodes=nodes, workers_per_node=workers, resources_per_worker=WorkerResources(cpus=1), **kw)


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out, name: str = "final") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = (out / name).glob("*.safetensors")
    return load_file(path)


def assert_same_run(a, b, rel: float = 1e-5, atol: float = 1e-5) -> None:
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["tokens"] == rb["tokens"], (ra, rb)
        assert abs(ra["loss"] - rb["loss"]) <= rel * abs(ra["loss"]), (ra["step"], ra["loss"], rb["loss"])
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= rel * abs(ra["grad_norm"]), (ra["step"], ra, rb)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def with_env(c: ClusterConfig, **env: str) -> ClusterConfig:
    return dataclasses.replace(c, env={**c.env, **env})


def start_ray(args: list[str], env: dict[str, str], temp, address: str = "") -> list:
    """``ray start ARGS --temp-dir=TEMP``; returns its daemons (found by TEMP, or the head's ``address``, in
    their command lines), for ``stop_ray``. Never ``ray stop``: that stops every Ray process of the
    machine, other tests' too."""
    import psutil

    subprocess.run([RAY, "start", *args, f"--temp-dir={temp}"], env=env, check=True, capture_output=True, timeout=120)
    marks = [str(temp), *([address] if address else [])]
    return [p for p in psutil.process_iter(["cmdline"]) if any(m in a for a in p.info["cmdline"] or [] for m in marks)]


def stop_ray(daemons: list) -> None:
    """SIGKILL the daemons ``start_ray`` returned and every process under them (the raylets' workers)."""
    import psutil

    procs = []
    for p in daemons:
        try:
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=20)
