"""Checkpoints on real DeepSpeed: atomic saves, exact resume, partial saves ignored, refusals, export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from raytest import final_weights, metrics, run_cfg

from distsft import checkpoint
from distsft.errors import ConfigError
from distsft.launcher.run import launch_local

pytestmark = pytest.mark.slow


def ckpt_cfg(out, *overrides):
    return run_cfg(out, "train.max_steps=6", "checkpoint.every_steps=2", "train.micro_batch_size=2", *overrides)


def assert_weights_equal(a, b, atol=1e-6):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("stage", [2, 3])
def test_resumed_run_equals_uninterrupted(tmp_path, stage, monkeypatch):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    launch_local(ckpt_cfg(full, f"train.zero_stage={stage}"), quiet=True)
    monkeypatch.setenv("DISTSFT_FAIL_AT", "0:5")
    with pytest.raises(RuntimeError, match="injected failure"):
        launch_local(ckpt_cfg(crashed, f"train.zero_stage={stage}"), quiet=True)
    assert checkpoint.find_latest(crashed / "checkpoints").name == "step-00000004"
    monkeypatch.delenv("DISTSFT_FAIL_AT")
    summary = launch_local(ckpt_cfg(crashed, f"train.zero_stage={stage}"), quiet=True)  # the same command again
    assert summary["start_step"] == 4
    resumed = metrics(crashed)
    # the crashed launch's steps 1-4 are kept, the resumed launch logs from the step after the checkpoint
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for r, f in zip(resumed, metrics(full), strict=True):
        assert r["loss"] == pytest.approx(f["loss"], rel=1e-6) and r["lr"] == pytest.approx(f["lr"], rel=1e-9)
    assert_weights_equal(full, crashed)
    assert sorted(p.name for p in (crashed / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]


def test_partial_or_corrupt_checkpoints_are_ignored(tmp_path):
    out = tmp_path / "run"
    launch_local(ckpt_cfg(out, "train.max_steps=4", "checkpoint.keep_last=3"), quiet=True)
    root = out / "checkpoints"
    assert checkpoint.find_latest(root).name == "step-00000004"
    # a save that died after some shards: only a .tmp dir exists
    shutil.copytree(root / "step-00000004", root / ".tmp-step-00000006")
    (root / ".tmp-step-00000006" / checkpoint.MANIFEST).unlink()
    # a directory renamed into place but with a truncated shard, and a pointer that names it
    bad = root / "step-00000008"
    shutil.copytree(root / "step-00000004", bad)
    shard = max((bad / "ds").glob("*.pt"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])
    (root / "latest").write_text(bad.name)
    assert checkpoint.find_latest(root).name == "step-00000004"
    (root / "latest").write_text("garbage")
    assert checkpoint.find_latest(root).name == "step-00000004"


def test_same_size_corruption_is_caught_named_and_skipped(tmp_path, cli, capsys):
    """1 MB of a shard overwritten in place keeps its size (the manifest once recorded sizes only, and a
    continued run trained on the damaged weights): the sha256 recorded at save catches it. A relaunch skips
    that checkpoint in one line for the newest intact one; export and an explicit resume refuse it."""
    out = tmp_path / "run"
    launch_local(ckpt_cfg(out, "train.max_steps=4", "checkpoint.keep_last=3"), quiet=True)
    root = out / "checkpoints"
    manifest = checkpoint.read_manifest(root / "step-00000004")
    assert set(manifest["sha256"]) == set(manifest["files"])  # every file has its checksum
    shard = max((root / "step-00000004" / "ds").glob("*.pt"), key=lambda f: f.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 1024] = bytes(1024)
    shard.write_bytes(bytes(data))
    assert checkpoint.find_latest(root).name == "step-00000004"  # sizes alone cannot tell
    code, _, err = cli("export", str(out), "--out", str(tmp_path / "export"))
    assert code == 2 and f"ds/{shard.name} is corrupt" in err and "checkpoint.resume=" in err, err
    capsys.readouterr()
    summary = launch_local(ckpt_cfg(out, "train.max_steps=6", "checkpoint.allow_changes=true"), quiet=True)
    assert summary["start_step"] == 2
    assert f"resume: skipped step-00000004: ds/{shard.name} is corrupt" in capsys.readouterr().out


def test_explicit_resume_path_must_exist_and_be_complete(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        launch_local(ckpt_cfg(tmp_path / "a", f"checkpoint.resume={tmp_path}/missing"), quiet=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        launch_local(ckpt_cfg(tmp_path / "b", f"checkpoint.resume={tmp_path}/empty"), quiet=True)


def test_changed_config_is_refused_with_the_differences(tmp_path):
    out = tmp_path / "run"
    launch_local(ckpt_cfg(out, "train.max_steps=2"), quiet=True)
    with pytest.raises(ConfigError) as e:
        launch_local(ckpt_cfg(out, "train.max_steps=2", "train.lr=5e-4", "data.max_seq_len=128"), quiet=True)
    msg = str(e.value)
    assert "train.lr: 0.0001 -> 0.0005" in msg and "data.max_seq_len: 256 -> 128" in msg
    assert "checkpoint.allow_changes=true" in msg
    summary = launch_local(ckpt_cfg(out, "train.max_steps=4", "checkpoint.allow_changes=true"), quiet=True)
    assert summary["start_step"] == 2


def test_another_worker_count_is_a_change_only_where_it_changes_the_rows_per_step():
    """Shards are resharded (checkpoint/reshard.py); what a worker count may change is the global batch."""
    old = {"world_size": 2, "config": {"train": {"micro_batch_size": 1, "grad_accum_steps": 2}}}
    with pytest.raises(
        ConfigError, match=r"rows per step: 4 \(2 workers\) -> 8 \(4 workers\); set train.global_batch_size"
    ):
        checkpoint.check_continuation(old, old["config"], 4, "", allow=False)
    fixed = {"world_size": 2, "config": {"train": {"micro_batch_size": 1, "global_batch_size": 8}}}
    assert checkpoint.check_continuation(fixed, fixed["config"], 4, "", allow=False) == []
    assert checkpoint.needs_reshard({"world_size": 2, "engine_stage": 2}, 1, 0)
    assert not checkpoint.needs_reshard({"world_size": 2, "engine_stage": 2}, 2, 2)


@pytest.mark.parametrize("model", ["demo", "llama-tied"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_consolidated_weights_equal_the_engines_weights(tmp_path, stage, model):
    """Export reads the shards from disk; the engine's own (gathered) parameters must match exactly, a
    tied weight included (written once, under the embedding's name)."""
    import deepspeed
    from families import save_family

    from distsft.model.loading import load_model
    from distsft.training.engine import Precision, build_engine, deepspeed_plan, render_ds_config

    out = tmp_path / "run"
    extra = [] if model == "demo" else [f"model.path={save_family(model, tmp_path / model)}", "model.tokenizer=demo"]
    cfg = ckpt_cfg(out, "train.max_steps=2", f"train.zero_stage={stage}", *extra)
    launch_local(cfg, quiet=True)
    fp32 = Precision(torch.float32, torch.float32)
    plan = deepspeed_plan(cfg, 1)
    ds = render_ds_config(cfg, plan, cfg.batch_plan(1), fp32, torch.device("cpu"), 256)
    engine, _keep = build_engine(cfg, plan, ds, lambda: load_model(cfg.model, torch.float32, "sdpa", 0), 2)
    checkpoint.load(engine, checkpoint.find_latest(out / "checkpoints"))
    exported = final_weights(out)
    seen = set()
    for name, p in engine.module.named_parameters():  # a tied weight is listed once, under its first name
        seen.add(name)
        with deepspeed.zero.GatheredParameters([p]):
            torch.testing.assert_close(exported[name], p.detach().clone(), rtol=0, atol=0, msg=name)
    assert seen == set(exported)
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_export_command_and_dtype(tmp_path, cli):
    out = tmp_path / "run"
    launch_local(ckpt_cfg(out, "train.max_steps=4", "checkpoint.keep_last=2"), quiet=True)
    code, stdout, err = cli("export", str(out), "--step", "2", "--dtype", "bf16", "--out", str(tmp_path / "bf16"))
    assert code == 0, err
    from safetensors.torch import load_file

    (f,) = (tmp_path / "bf16").glob("*.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in load_file(f).values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    code, _, err = cli("export", str(out), "--step", "3")
    assert code == 2 and "no complete checkpoint" in err


def test_export_never_destroys_what_is_at_its_target(tmp_path, cli, monkeypatch):
    """``--out`` the run itself, a directory above it, the working directory, or someone's files: refused in
    one line with nothing touched; the same checkpoint's export is replaced in one step (a crash leaves
    the old or the new one); another checkpoint's export is not. The run's own final/ is replaced by the
    next export of the same run."""
    out = tmp_path / "run"
    launch_local(ckpt_cfg(out, "train.max_steps=4", "checkpoint.keep_last=2"), quiet=True)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    for target, said in ((out, "it holds"), (tmp_path, "it holds"), (".", "it holds"), (mine, "not an export")):
        code, _, err = cli("export", str(out), "--out", str(target))
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, (target, err)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (mine / "notes.txt").read_text() == "keep me"

    exported = tmp_path / "exported"
    assert cli("export", str(out), "--out", str(exported))[0] == 0
    assert cli("export", str(out), "--out", str(exported), "--dtype", "bf16")[0] == 0  # the same checkpoint again
    code, _, err = cli("export", str(out), "--step", "2", "--out", str(exported))
    assert code == 2 and "another checkpoint's export" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no scratch left behind

    from distsft.host import publish_dir

    new = tmp_path / "new"
    new.mkdir()
    (new / "a").write_text("new")
    publish_dir(new, exported)  # swapped in one step, the old one removed
    assert [p.name for p in exported.iterdir()] == ["a"] and not new.exists()
    launch_local(
        ckpt_cfg(out, "train.max_steps=5", "checkpoint.keep_last=2", "checkpoint.allow_changes=true"), quiet=True
    )
    assert json.loads((out / "final" / "distsft_export.json").read_text())["step"] == 5


def test_sigterm_saves_the_current_step_and_the_same_command_continues(tmp_path):
    """With records read only every 50 steps, a SIGTERM still saves and stops within a few steps (the stop
    is polled every step without a device sync), long before the first read point."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "distsft",
        "launch",
        "--local",
        "--set",
        f"output_dir={out}",
        "--set",
        f"data.path={REPO}/tests/fixtures/support_small.jsonl",
        "--set",
        "data.max_seq_len=256",
        "--set",
        "train.max_steps=200",
        "--set",
        "train.micro_batch_size=1",
        "--set",
        "train.log_every=50",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "DISTSFT_FAIL_AT": ""},
    )
    deadline = time.monotonic() + 240
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("engine:"):
            time.sleep(3)  # a few steps in
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, "".join(lines) + rest
    saved = checkpoint.find_latest(out / "checkpoints")
    step = checkpoint.read_manifest(saved)["step"]
    assert 1 <= step < 50 and f"stopped at step {step}" in rest, rest  # before the first read point
    assert not (out / "final").exists()
    again = subprocess.run(
        [
            *cmd[:-6],
            "--set",
            f"train.max_steps={step + 2}",
            "--set",
            "checkpoint.allow_changes=true",
            "--set",
            "train.micro_batch_size=1",
            "--set",
            "train.log_every=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resuming from {saved}" in again.stdout
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 3))
