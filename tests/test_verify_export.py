"""An export proven to load (``checkpoint/proof.py``): the launch checks its final export, and ``distsft
verify --export`` passes on it and fails, naming the cause, on each broken copy: a tied weight the config
no longer ties, one weight changed after export, a generation config that does not stop at the end of a
turn. One short local run serves them all."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from raytest import run_cfg
from safetensors.torch import load_file, save_file

from distsft.launcher.run import launch_local


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("verified")
    launch_local(run_cfg(out, "train.max_steps=1", "model.config_path=null"), quiet=True)
    return out


def broken(run, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(run / "final", copy)
    return copy


def test_the_final_export_is_checked_and_each_breakage_is_named(run, tmp_path, cli):
    said = json.loads((run / "verify-export.json").read_text())  # the launch's own check of final/
    assert [f["name"] for f in said] == ["weights", "logits", "template", "stops"] and all(f["ok"] for f in said)
    code, out, _ = cli("verify", "--export", str(run / "final"))
    assert code == 0 and "verify: logits    ok: 3 probes" in out and "max |diff| 0 " in out, out

    # the config ties the output layer to the embeddings, but the file holds an lm_head of its own
    tied = broken(run, tmp_path, "tied")
    config = json.loads((tied / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    code, out, _ = cli("verify", "--export", str(tied))
    assert code == 1 and "verify: logits    FAILED: 3 probes" in out, out  # it loads: only the numbers tell

    # one weight changed after the export: it loads, and answers differently from what was trained
    changed = broken(run, tmp_path, "changed")
    state = load_file(changed / "model.safetensors")
    name = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    state[name] = state[name] + 0.05 * torch.randn_like(state[name])
    save_file(state, changed / "model.safetensors", metadata={"format": "pt"})
    code, out, _ = cli("verify", "--export", str(changed))
    assert code == 1 and "verify: weights   ok" in out and "verify: logits    FAILED: 3 probes" in out, out

    # a generation config that stops on another token: a server would run past the end of the turn
    runs_on = broken(run, tmp_path, "runs-on")
    gen = json.loads((runs_on / "generation_config.json").read_text())
    gen["eos_token_id"] = 1
    (runs_on / "generation_config.json").write_text(json.dumps(gen))
    code, out, _ = cli("verify", "--export", str(runs_on))
    assert code == 1 and "verify: stops     FAILED: the turn ends with '<|im_end|>' (id 2), which is not" in out, out


def test_a_lora_export_adapter_or_merged_is_compared_with_the_checkpoints_adapters_on_its_base(tmp_path, cli):
    """The reference is built from the run's config and the checkpoint, never from the export's files: an
    adapter whose weights were changed after export (or a merge gone wrong) answers differently."""
    out = tmp_path / "lora"
    launch_local(run_cfg(out, "train.max_steps=2", "lora.r=8", "train.lr=1e-2", "model.config_path=null"), quiet=True)
    code, said, _ = cli("verify", "--export", str(out / "final"))
    assert code == 0 and "verify: logits    ok: 3 probes" in said and "max |diff| 0 " in said, said
    code, _, _ = cli("export", str(out), "--merge", "--out", str(tmp_path / "merged"))
    code, said, _ = cli("verify", "--export", str(tmp_path / "merged"))
    assert code == 0 and "verify: logits    ok: 3 probes" in said, said
    shutil.copytree(out / "final", tmp_path / "bad")
    state = load_file(tmp_path / "bad" / "adapter_model.safetensors")
    name = next(k for k in state if "lora_B" in k)
    assert state[name].abs().max() > 0  # trained: B starts at zero
    state[name] = 2 * state[name]
    save_file(state, tmp_path / "bad" / "adapter_model.safetensors", metadata={"format": "pt"})
    code, said, _ = cli("verify", "--export", str(tmp_path / "bad"))
    assert code == 1 and "verify: logits    FAILED: 3 probes" in said, said
