"""A checkpoint can no longer run code. An attacker who can write to the checkpoint storage replaces a
DeepSpeed shard with a pickle whose unpickling creates a marker file, and rewrites the manifest's sizes
and checksums to match (integrity is not authenticity). Resuming, exporting and resharding each refuse it
in one line, and the marker never appears. One ZeRO-3 run on one worker serves all three: its shards go
through DeepSpeed's own loaders (the engine's, ``zero_to_fp32``, ``ds_to_universal``)."""

from __future__ import annotations

import json

import pytest
import torch
from raytest import run_cfg

from distsft import checkpoint
from distsft.checkpoint import store
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


def test_a_planted_pickle_is_refused_by_resume_export_and_resharding(zero3_run, tmp_path, cli):
    ckpt = checkpoint.find_latest(zero3_run / "checkpoints")
    shard = next(p for p in (ckpt / "ds").glob("*optim_states.pt"))
    marker = tmp_path / "ran"
    plant(ckpt, f"ds/{shard.name}", marker)

    code, _, err = cli("export", str(zero3_run), "--out", str(tmp_path / "export"))  # zero_to_fp32
    assert code == 2 and "refused: reading it would need a full unpickler" in err and shard.name in err, err
    assert len(err.strip().splitlines()) == 1

    with pytest.raises(UnsafeCheckpoint, match=r"it asks for io.open"):  # ds_to_universal, for another worker count
        checkpoint.make_portable(ckpt)

    cfg = run_cfg(zero3_run, "train.max_steps=3", "train.zero_stage=3", "checkpoint.every_steps=1",
                  "checkpoint.allow_changes=true")  # fmt: skip
    with pytest.raises(UnsafeCheckpoint, match=shard.name):  # the engine's own loader, on resume
        launch_local(cfg, quiet=True)
    assert not marker.exists()

    # the same file through a full unpickler: what DeepSpeed did before (the test can fail)
    torch.load(ckpt / "ds" / shard.name, weights_only=False)
    assert marker.exists()
