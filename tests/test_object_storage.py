"""Checkpoints in an object store, against a real S3-compatible server (moto's server mode on 127.0.0.1):
the same promises as on a disk, a kill during the upload included; export and resharding read the
bucket."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO
from raytest import SMALL, final_weights, metrics

from distsft import checkpoint
from distsft.checkpoint import storage

pytestmark = pytest.mark.slow


def launch(out, cluster_file, *extra: str) -> list[str]:
    sets = [
        f"output_dir={out}",
        f"data.path={SMALL}",
        "data.max_seq_len=256",
        "data.eval_fraction=0",
        "train.max_steps=6",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=2",
        "train.micro_batch_size=1",
        "train.log_every=1",
        "train.lr=1e-4",
        *extra,
    ]
    return [sys.executable, "-m", "distsft", "launch", "--cluster", str(cluster_file)] + [
        a for s in sets for a in ("--set", s)
    ]


def cluster_file(tmp_path, s3, **extra) -> str:
    spec = {
        "num_nodes": 1,
        "workers_per_node": 2,
        "resources_per_worker": {"cpus": 1},
        "storage_path": "s3://ckpt/runs",
        "env": dict(s3),
        **extra,
    }
    path = tmp_path / f"cluster-{len(list(tmp_path.glob('cluster-*')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_checkpoints_in_s3_survive_a_kill_in_the_upload_export_and_reshard_from_the_bucket(tmp_path, s3, cli):
    env = {**os.environ, **s3}
    # 1. every rank is killed while uploading step 4 (once): the worker group restarts from step 2, and
    #    the history still has every step once
    marker = tmp_path / "killed-once"
    first = tmp_path / "first"
    cluster = cluster_file(tmp_path, s3, max_failures=1, env={**s3, "DISTSFT_KILL_IN_SAVE": f"4:upload:{marker}"})
    run = subprocess.run(launch(first, cluster), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert marker.exists() and "worker: restarted: rank" in run.stdout
    assert [r["step"] for r in metrics(first)] == [1, 2, 3, 4, 5, 6]
    root = "s3://ckpt/runs/first/checkpoints"
    assert storage.bucket(root).children(root) == ["step-00000004", "step-00000006"]  # rotation kept 2
    assert checkpoint.find_latest(root) == f"{root}/step-00000006"
    assert (first / "final" / "model.safetensors").is_file()

    wa = final_weights(first)
    # (a launcher SIGKILL and rerun: tests/test_kill.py, the same driver-side resume as from a bucket)

    # 2. distsft export reads the shards straight from the bucket
    code, _, err = cli("export", "s3://ckpt/runs/first", "--out", str(tmp_path / "exported"))
    assert code == 0, err
    exported = final_weights(tmp_path / "exported", name=".")
    for k in wa:
        torch.testing.assert_close(exported[k], wa[k], rtol=0, atol=0, msg=k)

    # 3. resharding for another worker count converts in the bucket: whole tensors by name, marker last
    from distsft.checkpoint import reshard

    ckpt = f"{root}/step-00000006"
    assert not reshard.is_converted(ckpt)
    assert "resharding" in checkpoint.convert_for(ckpt, 1, 0)
    assert reshard.is_converted(ckpt) and checkpoint.read_manifest(ckpt) is not None  # still complete
    local = tmp_path / "universal"
    storage.bucket(ckpt).download(reshard.universal_dir(ckpt), local)
    assert json.loads((local / "meta.json").read_text())["step"] == 6
    for k in wa:
        torch.testing.assert_close(reshard._load(local / "zero" / k / "fp32.pt"), wa[k], rtol=0, atol=0, msg=k)
