"""A cluster started with `ray start` (two raylets on this machine), token authentication on: a wrong
token, and a launch without --cluster beside it. A launch across hosts with their own addresses:
tests/test_multihost.py."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO
from raytest import SMALL, free_port, start_ray, stop_ray

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """`ray start --head` and `ray start --address`: the README's cluster start, with token auth on."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    common = ["--num-cpus=1", "--disable-usage-stats"]
    daemons = start_ray(["--head", f"--port={port}", "--dashboard-host=127.0.0.1", *common], env, temp)
    try:
        daemons += start_ray([f"--address=127.0.0.1:{port}", *common], env, temp, f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}", env
    finally:  # by id: the session's shared Ray (conftest.ray_head) keeps running
        stop_ray(daemons)


def cluster_file(tmp_path, address: str) -> str:
    spec = {
        "address": address,
        "num_nodes": 2,
        "workers_per_node": 1,
        "resources_per_worker": {"cpus": 1},
        "placement_strategy": "STRICT_SPREAD",
        "storage_path": str(tmp_path / "shared"),
        "placement_timeout_s": 60,
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def launch(out, *extra: str) -> list[str]:
    sets = [f"output_dir={out}", f"data.path={SMALL}", "data.max_seq_len=256", "data.eval_fraction=0",
            "train.max_steps=2", "train.micro_batch_size=1", "logging.plot=false"]  # fmt: skip
    return [sys.executable, "-m", "distsft", "launch", *extra] + [a for s in sets for a in ("--set", s)]


def test_a_wrong_token_is_one_line_that_says_what_to_set(two_nodes, tmp_path):
    address, env = two_nodes
    t0 = time.monotonic()
    run = subprocess.run(
        launch(tmp_path / "run", "--cluster", cluster_file(tmp_path, address)), cwd=REPO,
        env={**env, "RAY_AUTH_TOKEN": "not-the-token"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2 and time.monotonic() - t0 < 120
    err = run.stderr.strip()
    assert "\n" not in err and "refused this launcher's Ray token: set RAY_AUTH_TOKEN" in err, err
    assert "InvalidAuthToken" in (tmp_path / "run" / "logs" / "driver.log").read_text()


def test_a_launch_without_cluster_starts_its_own_ray_beside_another(two_nodes, tmp_path):
    """Another Ray instance runs on this machine (and RAY_ADDRESS even points at it): the embedded launch
    neither joins it nor is confused by it."""
    address, env = two_nodes
    out = tmp_path / "run"
    run = subprocess.run(
        launch(out), cwd=REPO, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "cluster: a Ray instance started here" in run.stdout and "Found multiple" not in run.stdout + run.stderr
    ours = {w["node_id"] for w in json.loads((out / "workers.json").read_text()).values()}
    probe = (
        f"import json, ray; ray.init(address='{address}', logging_level='ERROR'); "
        "print(json.dumps([n['NodeID'] for n in ray.nodes()]))"
    )
    listed = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    theirs = set(json.loads(listed.stdout.strip().splitlines()[-1]))
    assert len(theirs) == 2 and not ours & theirs
