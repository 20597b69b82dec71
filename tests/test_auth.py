"""Checkpoints signed with the owner's key (``checkpoint/auth.py``): a manifest someone rewrote, or one
written under another key or none, is never used and never deleted; the key file is private and made
once. Hand-made checkpoints (a file and a manifest): no engine is needed to check the manifests."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from distsft.checkpoint import auth, store
from distsft.checkpoint.store import MANIFEST, UnsignedCheckpoint


def fake_checkpoint(root, step: int, signed: bool = True):
    d = root / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(bytes([step]) * 64)
    manifest = {"step": step, "files": {"weights.bin": 64}, "sha256": {"weights.bin": store.digest(d / "weights.bin")}}
    (d / MANIFEST).write_text(json.dumps(auth.sign(manifest) if signed else manifest))
    (root / "latest").write_text(d.name)
    return d


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(auth.ENV_KEY, raising=False)
    monkeypatch.delenv(auth.ENV_SWITCH, raising=False)
    store._said.clear()


def test_the_key_file_is_made_once_private_and_refused_when_others_can_read_it(tmp_path):
    key = auth.key()
    path = tmp_path / "config" / "distsft" / "checkpoint.key"
    assert len(key) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert auth.key() == key  # made once
    # two processes making it at once end with one key
    path.unlink()
    code = "from distsft.checkpoint import auth; print(auth.key().decode())"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    keys = {p.communicate()[0].strip() for p in procs}
    assert keys == {path.read_text().strip()}
    os.chmod(path, 0o644)
    with pytest.raises(auth.ConfigError, match=r"mode 0644 lets others read it; chmod 600"):
        auth.key()


def test_a_rewritten_or_foreign_manifest_is_skipped_for_the_newest_signed_one_and_never_deleted(
    tmp_path, capsys, monkeypatch
):
    root = tmp_path / "checkpoints"
    first = fake_checkpoint(root, 1)
    second = fake_checkpoint(root, 2)
    third = fake_checkpoint(root, 3, signed=False)  # someone else's, or written with checking off
    manifest = json.loads((second / MANIFEST).read_text())
    manifest["sha256"]["weights.bin"] = "0" * 64  # what an attacker who replaced the file would write
    (second / MANIFEST).write_text(json.dumps(manifest))

    assert store.find_latest(root) == first
    said = capsys.readouterr().out
    assert f"checkpoint: skipped {third.name}: its manifest is not signed" in said
    assert f"checkpoint: skipped {second.name}: its manifest's signature does not match this key" in said
    with pytest.raises(UnsignedCheckpoint, match=r"step-00000002: its manifest's signature does not match"):
        store.read_manifest(second)  # an explicit checkpoint.resume or export names it, in one line

    store._purge(root, keep_last=1, keep=fake_checkpoint(root, 4))
    assert third.is_dir() and second.is_dir() and not first.exists()  # rotation: only what is provably ours
    assert "kept step-00000002, step-00000003: not signed with this run's key" in capsys.readouterr().out

    # another key: nothing signed with it, so nothing is used, and nothing is taken for an empty root
    monkeypatch.setenv(auth.ENV_KEY, "another key")
    with pytest.raises(UnsignedCheckpoint):
        store.find_latest(root)
    # turned off explicitly: sizes and checksums still decide, signatures do not
    monkeypatch.setenv(auth.ENV_SWITCH, "off")
    assert store.find_latest(root).name == "step-00000004"
    assert store.read_manifest(second) is not None
