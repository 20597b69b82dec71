"""A checkpoint can no longer run code. An attacker who can write to the checkpoint storage replaces a
DeepSpeed shard with a pickle whose unpickling creates a marker file, and rewrites the manifest's sizes
and checksums to match. With manifests signed (the default) the rewritten manifest is refused and the
newest signed checkpoint used; with signing off, resuming, exporting and resharding each refuse the pickle
in one line. The marker never appears. One ZeRO-3 run on one worker serves all three: its shards go
through DeepSpeed's own loaders (the engine's, ``zero_to_fp32``, ``ds_to_universal``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from raytest import run_cfg

from distsft import checkpoint
from distsft.checkpoint import auth, store
from distsft.checkpoint.safe_load import UnsafeCheckpoint
from distsft.launcher.run import launch_local

pytestmark = pytest.mark.slow


class Payload:
    """Unpickled by a full unpickler, it opens (creates) ``marker``: code chosen by whoever wrote the file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(ckpt, rel: str, marker) -> None:
    """Replace ``rel`` with the payload and make the manifest agree, as someone with write access can."""
    path = ckpt / rel
    torch.save({"optimizer_state_dict": Payload(str(marker)), "pad": b"x" * 64}, path)
    manifest = json.loads((ckpt / store.MANIFEST).read_text())
    manifest["files"][rel] = path.stat().st_size
    manifest["sha256"][rel] = store.digest(path)
    (ckpt / store.MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    launch_local(run_cfg(out, "train.max_steps=2", "train.zero_stage=3", "checkpoint.every_steps=1"), quiet=True)
    return out


def test_a_planted_pickle_never_runs(zero3_run, tmp_path, cli, capsys, monkeypatch):
    root = zero3_run / "checkpoints"
    step1, step2 = sorted(root.glob("step-*"))
    shard = next((step2 / "ds").glob("*optim_states.pt"))
    states = next((step1 / "ds").glob("*model_states.pt"))
    intact = tmp_path / "intact"
    shutil.copytree(step1, intact)
    marker = tmp_path / "ran"
    plant(step2, f"ds/{shard.name}", marker)
    plant(step1, f"ds/{states.name}", marker)

    # Manifests unchecked (authentication off): the loaders themselves refuse, in one line each.
    code, _, err = cli("export", str(zero3_run), "--no-authenticate", "--out", str(tmp_path / "e1"))  # zero_to_fp32
    assert code == 2 and "refused: reading it would need a full unpickler" in err and shard.name in err, err
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli("export", str(zero3_run), "--step", "1", "--no-authenticate", "--out", str(tmp_path / "e2"))
    assert code == 2 and states.name in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv(auth.ENV_SWITCH, "off")
    with pytest.raises(UnsafeCheckpoint, match=r"it asks for io.open"):  # ds_to_universal, for another worker count
        checkpoint.make_portable(step2)
    off = run_cfg(zero3_run, "train.max_steps=3", "train.zero_stage=3", "checkpoint.every_steps=1",
                  "checkpoint.allow_changes=true", "checkpoint.authenticate=false")  # fmt: skip
    with pytest.raises(UnsafeCheckpoint, match=shard.name):  # the engine's own loader, on resume
        launch_local(off, quiet=True)
    assert not marker.exists()

    # Signed manifests (the default): a rewritten one is refused before any of its files is read, and the
    # newest checkpoint still signed is used; with none left, one line and nothing started over.
    monkeypatch.delenv(auth.ENV_SWITCH)
    code, _, err = cli("export", str(zero3_run), "--out", str(tmp_path / "e3"))
    assert code == 2 and "signature does not match" in err and len(err.strip().splitlines()) == 1, err
    shutil.rmtree(step1)
    shutil.copytree(intact, step1)
    store._said.clear()  # a process names a skipped checkpoint once; each CLI command is a process of its own
    code, out, err = cli("export", str(zero3_run), "--out", str(tmp_path / "e4"))
    assert code == 0, err
    assert f"checkpoint: skipped {step2.name}: its manifest's signature does not match" in out, out
    assert "exported step 1" in out, out
    on = run_cfg(zero3_run, "train.max_steps=3", "train.zero_stage=3", "checkpoint.every_steps=1",
                 "checkpoint.allow_changes=true")  # fmt: skip
    capsys.readouterr()
    summary = launch_local(on, quiet=True)
    assert f"resuming from {step1} (step 1)" in capsys.readouterr().out and not marker.exists()
    assert summary["checkpoint"].endswith("step-00000003")

    # the same file through a full unpickler: what DeepSpeed did before (the test can fail)
    torch.load(intact / "ds" / states.name, weights_only=True)  # the intact one is plain data
    plant(intact, f"ds/{states.name}", marker)
    torch.load(intact / "ds" / states.name, weights_only=False)
    assert marker.exists()


def test_a_plain_pickle_padded_to_a_shards_size_is_refused_in_one_line_by_every_kind_of_load(tmp_path):
    """The old (not zip) pickle format, padded: what a memory-mapped load (``zero_to_fp32``) and a plain
    one (the engine, ``ds_to_universal``) make of it, with no traceback and no marker."""
    import pickle

    from distsft.checkpoint.safe_load import no_code_from_checkpoints

    marker, shard = tmp_path / "ran", tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(pickle.dumps(Payload(str(marker))).ljust(4096, b"\0"))
    with no_code_from_checkpoints():
        with pytest.raises(UnsafeCheckpoint, match=r"optim_states.pt: refused: not a file PyTorch reads without"):
            torch.load(shard, map_location="cpu", mmap=True, weights_only=False)
        with pytest.raises(UnsafeCheckpoint, match=r"refused: reading it would need a full unpickler \(the restr"):
            torch.load(shard, map_location="cpu", weights_only=False)
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="magic number"):  # the test can fail: a full unpickler runs it first
        torch.load(shard, weights_only=False)
    assert marker.exists()
