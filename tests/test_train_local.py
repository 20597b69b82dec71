"""Local (single-process) training on real DeepSpeed (gloo on CPU): equivalences and the HF export."""

from __future__ import annotations

import json

import pytest
import torch
from raytest import run_cfg

from distsft.launch import launch_local, prepare_data

pytestmark = pytest.mark.slow


def small_cfg(tmp_path, *overrides: str):
    return run_cfg(tmp_path, "train.micro_batch_size=4", "train.eval_every=0", *overrides)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def load_final(out):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    return model, info


def test_metrics_schema_and_export_loads_every_key(tmp_path):
    cfg = small_cfg(tmp_path)
    launch_local(cfg, quiet=True)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "elapsed_s"):
            assert key in r, key
        assert r["tokens"] > 0 and r["loss"] > 0 and r["grad_norm"] > 0
    assert (tmp_path / "config.yaml").is_file()
    model, info = load_final(tmp_path)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert list((tmp_path / "final").glob("*.safetensors"))


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_give_the_same_weights_as_stage_2(tmp_path, stage):
    """One process: ZeRO partitions nothing away, so every stage must do the same fp32 math."""
    ref_out, out = tmp_path / "ref", tmp_path / "other"
    launch_local(small_cfg(ref_out, "train.zero_stage=2"), quiet=True)
    launch_local(small_cfg(out, f"train.zero_stage={stage}"), quiet=True)
    a, _ = load_final(ref_out)
    b, _ = load_final(out)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)
    la = [r["loss"] for r in metrics(ref_out)]
    lb = [r["loss"] for r in metrics(out)]
    assert la == pytest.approx(lb, rel=1e-5)


def test_packed_and_unpacked_step_agree(tmp_path):
    """One optimizer step over the whole data set: packing must not change loss or gradient."""
    records = {}
    for packing in (True, False):
        probe = small_cfg(tmp_path / f"p{packing}", f"data.packing={str(packing).lower()}")
        n_rows = len(prepare_data(probe).train)
        cfg = small_cfg(
            tmp_path / f"p{packing}",
            f"data.packing={str(packing).lower()}",
            "train.max_steps=1",
            f"train.micro_batch_size={n_rows}",
        )
        launch_local(cfg, quiet=True)
        records[packing] = metrics(tmp_path / f"p{packing}")[0]
    assert records[True]["tokens"] == records[False]["tokens"]
    assert records[True]["loss"] == pytest.approx(records[False]["loss"], rel=1e-5)
    assert records[True]["grad_norm"] == pytest.approx(records[False]["grad_norm"], rel=1e-5)


def test_grad_accumulation_split_does_not_change_the_step(tmp_path):
    """Same global batch, micro 4 x accum 1 vs micro 1 x accum 4: exact token-weighted normalisation."""
    a, b = tmp_path / "a", tmp_path / "b"
    launch_local(small_cfg(a, "train.micro_batch_size=4", "train.grad_accum_steps=1"), quiet=True)
    launch_local(small_cfg(b, "train.micro_batch_size=1", "train.grad_accum_steps=4"), quiet=True)
    for ra, rb in zip(metrics(a), metrics(b), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)


def test_compiled_model_takes_the_same_steps_as_eager(tmp_path):
    """``train.compile`` (DeepSpeed's engine.compile, dynamic shapes) changes speed, not the math."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    launch_local(small_cfg(eager, "train.max_steps=3"), quiet=True)
    launch_local(small_cfg(compiled, "train.max_steps=3", "train.compile=true"), quiet=True)
    for ra, rb in zip(metrics(eager), metrics(compiled), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
