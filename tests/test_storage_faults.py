"""Unreadable is not absent: checkpoints that cannot be read are never taken for missing ones, so a
relaunch never starts over on them and rotation never deletes them. On a disk the faults are real OS
errors (a file that is a symbolic link to itself: ELOOP); in a bucket, a proxy in front of the test's S3
server answers chosen requests with ``503 SlowDown``. No training is needed: checkpoints are written as
distsft lays them out (files, then the manifest listing them)."""

from __future__ import annotations

import json

import pytest

from distsft.checkpoint import auth, storage, store
from distsft.training.distributed import upload_group


def put(root, step: int, files: dict[str, bytes] | None = None):
    """A complete checkpoint of ``step`` under ``root`` (a directory or a bucket URI)."""
    files = files or {"ds/weights.pt": b"w" * (10 + step), "hf/config.json": b"{}"}
    ckpt = store.step_dir(root, step)
    manifest = json.dumps(auth.sign({"step": step, "files": {k: len(v) for k, v in files.items()}}))
    if storage.is_remote(root):
        bucket = storage.bucket(root)
        for rel, data in files.items():
            bucket.write_text(storage.join(ckpt, rel), data.decode())
        bucket.write_text(storage.join(ckpt, store.MANIFEST), manifest)
        return ckpt
    for rel, data in files.items():
        (ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / rel).write_bytes(data)
    (ckpt / store.MANIFEST).write_text(manifest)
    return ckpt


def unreadable(path) -> None:
    """A real read error where ``path`` was: a symbolic link to itself (ELOOP), as an NFS fault is EIO."""
    path.unlink()
    path.symlink_to(path.name)


def test_an_unreadable_checkpoint_is_never_taken_for_a_missing_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTSFT_STORAGE_RETRY_S", "0")
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        put(root, step)
    assert store.find_latest(root) == store.step_dir(root, 6)
    unreadable(store.step_dir(root, 6) / store.MANIFEST)
    with pytest.raises(storage.StorageError, match="step-00000006/MANIFEST.json: reading failed") as e:
        store.find_latest(root)  # before: None for step 6, so step 4 resumed, or with all unreadable, step 0
    assert "nothing was started over or deleted" in str(e.value) and "\n" not in str(e.value)
    assert store.find_latest(tmp_path / "nothing-here") is None  # proven absent: a fresh start is right
    listing = tmp_path / "loop"
    listing.symlink_to("loop")
    with pytest.raises(storage.StorageError, match="listing failed"):
        store.find_latest(listing)


def test_rotation_deletes_only_what_it_proved_stale(tmp_path, monkeypatch, capsys):
    """keep_last 2 over complete 4, 6, 8, 10: 6 goes (beyond keep_last), a crashed save's leftover 12 goes
    (its listing succeeded, no manifest), and 4 stays: its manifest could not be read."""
    root = tmp_path / "checkpoints"
    for step in (4, 6, 8, 10):
        put(root, step)
    leftover = put(root, 12)
    (leftover / store.MANIFEST).unlink()
    unreadable(store.step_dir(root, 4) / store.MANIFEST)
    store._purge(root, keep_last=2, keep=store.step_dir(root, 10))
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000008", "step-00000010"]
    assert "kept step-00000004: could not be read now" in capsys.readouterr().out


@pytest.mark.slow
def test_a_bucket_that_throttles_is_waited_for_then_reported_never_read_as_empty(s3, monkeypatch, capsys):
    """Every read answered 503 SlowDown: the resume decision raises in one line (before: it started over
    from step 0 and its saves replaced the old checkpoints); an outage shorter than the retry budget is
    waited out; rotation keeps a checkpoint whose manifest it cannot read (before: deleted as a leftover)."""
    from faultproxy import FaultProxy, matching

    root = "s3://ckpt/faults/checkpoints"
    for step in (2, 4, 6):
        put(root, step)
    upstream = int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with FaultProxy(upstream) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setattr(storage, "_buckets", {})
        assert store.find_latest(root) == store.step_dir(root, 6)  # through the proxy, nothing failing

        monkeypatch.setenv("DISTSFT_STORAGE_RETRY_S", "2")
        proxy.fail = lambda method, path: True
        with pytest.raises(storage.StorageError, match="listing failed for 2s") as e:
            store.find_latest(root)
        assert "\n" not in str(e.value) and proxy.failed > 0

        calls = {"n": 0}

        def for_a_while(method, path):  # the first few requests fail, then the store answers again
            calls["n"] += 1
            return calls["n"] <= 3

        monkeypatch.setenv("DISTSFT_STORAGE_RETRY_S", "30")
        proxy.fail = for_a_while
        assert store.find_latest(root) == store.step_dir(root, 6)

        proxy.fail = matching(r"step-00000002/MANIFEST\.json")
        store._purge(root, keep_last=1, keep=store.step_dir(root, 6))
        proxy.fail = lambda method, path: False
        left = storage.bucket(root).children(root)
        assert left == ["step-00000002", "step-00000006"], left  # 4 rotated, 2 kept
        assert "kept step-00000002" in capsys.readouterr().out


def test_each_rank_verifies_the_files_it_reads(tmp_path):
    """At load a rank checks its own shards and the files every rank reads, not the other ranks' shards."""
    files = {"ds/zero_pp_rank_1_mp_rank_00_optim_states.pt": b"a" * 64, "ds/mp_rank_00_model_states.pt": b"m" * 32}
    ckpt = put(tmp_path, 2, files)
    manifest = json.loads((ckpt / store.MANIFEST).read_text())
    manifest["sha256"] = {rel: store.digest(ckpt / rel) for rel in files}
    (ckpt / "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"b" * 64)  # same size, other bytes
    store.verify(ckpt, manifest, ckpt, rank=0)
    for rank in (1, None):
        with pytest.raises(store.CorruptCheckpoint, match="zero_pp_rank_1_mp_rank_00_optim_states.pt is corrupt"):
            store.verify(ckpt, manifest, ckpt, rank=rank)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path, cli):
    """A checkpoint written onto a 20 MiB filesystem (the demo's needs ~57 MiB): one line that says the
    device is full, names the path and the sizes, exit 2; no .tmp-step left to fill the next launch."""
    import subprocess

    from raytest import SMALL

    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = disk / "run"
        code, _, err = cli("launch", "--local", "--set", f"output_dir={out}", "--set", f"data.path={SMALL}",
                           "--set", "data.max_seq_len=256", "--set", "train.max_steps=1")  # fmt: skip
        assert code == 2, err
        line = err.strip().splitlines()[-1]
        assert "no space left on the device writing" in line and str(out / "checkpoints") in line, line
        assert "the partial save was removed" in line
        assert not list((out / "checkpoints").glob(".tmp-*")) and not list((out / "checkpoints").glob("step-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


class _Engine:
    """What ``store.save`` asks of a DeepSpeed engine: each rank writes its shard."""

    def __init__(self, rank: int) -> None:
        import torch

        self.rank, self.module = rank, torch.nn.Linear(2, 2)

    def save_checkpoint(self, path, tag, client_state, save_latest, exclude_frozen_parameters):
        import pathlib

        (pathlib.Path(path) / tag).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(path) / tag / f"shard-{self.rank}.pt").write_bytes(b"s" * 100)


def _save_with_a_slow_upload(rank: int, port: int, env: dict, slow_s: float, result) -> None:
    import os
    import time

    os.environ.update(env)
    from distsft.training.distributed import RENDEZVOUS_ENV, Rendezvous, join_group

    rv = Rendezvous("gloo", rank, 2, "127.0.0.1", port, "127.0.0.1", 30.0, 2.0, upload_timeout_s=60.0)
    os.environ[RENDEZVOUS_ENV] = rv.to_env()
    join_group(rv)
    upload = storage.Bucket.upload

    def slow(self, local, location):
        if rank == 1:
            time.sleep(slow_s)  # longer than the collective timeout (2 s), within the upload one
        return upload(self, local, location)

    storage.Bucket.upload = slow
    try:
        final = store.save(
            _Engine(rank), "s3://ckpt/slow/checkpoints", 2, {}, 2, lambda d: d.mkdir(), upload_group=upload_group
        )
        result.put((rank, str(final)))
    except Exception as e:  # noqa: BLE001
        result.put((rank, f"failed: {e}"))


def test_ranks_wait_for_a_slow_upload_outside_the_training_timeout(s3):
    """One rank's upload takes longer than the collective timeout: the others wait for it on a group
    bounded by upload_timeout_s (before: the exchange after the upload was on the world group and failed
    after collective_timeout_s), and the checkpoint is complete."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    procs = [ctx.Process(target=_save_with_a_slow_upload, args=(r, port, dict(s3), 5.0, result)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = dict(result.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    ckpt = store.step_dir("s3://ckpt/slow/checkpoints", 2)
    assert got == {0: ckpt, 1: ckpt}, got
    manifest = store.read_manifest(ckpt)
    assert {"ds/shard-0.pt", "ds/shard-1.pt"} <= set(manifest["files"]) and len(manifest["sha256"]) >= 2
