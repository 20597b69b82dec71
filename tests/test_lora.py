"""LoRA and QLoRA on real DeepSpeed: only adapters train, checkpoints resume exactly, the adapter directory
loads in peft, and the merged export computes what the adapter model computes."""

from __future__ import annotations

import json

import pytest
import torch
from raytest import SMALL, final_weights, metrics, run_cfg

from distsft.config import load_config
from distsft.errors import ConfigError
from distsft.launcher.run import launch_local

LORA = ["lora.r=8", "lora.alpha=16", "train.lr=1e-2"]  # a large lr so adapters move measurably in a few steps


def lora_cfg(out, *overrides):
    return run_cfg(out, *LORA, "train.micro_batch_size=2", "train.max_steps=3", *overrides)


# --- config and model, no training -------------------------------------------------------------------------
def test_quantising_without_adapters_and_impossible_combinations_fail_at_load(tmp_path):
    bad = tmp_path / "q.yaml"
    bad.write_text("model:\n  quantization: 4bit\n")
    with pytest.raises(ConfigError, match=rf"{bad}:2: model.quantization: 4bit .* set lora.r > 0"):
        load_config(bad)
    with pytest.raises(ConfigError, match="8-bit weights cannot be sharded by ZeRO-3"):
        load_config(None, ["lora.r=8", "model.quantization=8bit", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match="cannot be offloaded"):
        load_config(None, ["lora.r=8", "model.quantization=4bit", "train.zero_stage=3_offload"])
    assert load_config(None, ["lora.r=8", "model.quantization=4bit", "train.zero_stage=3"]).lora.r == 8


def test_target_modules_that_match_nothing_list_the_models_linear_modules():
    from distsft.config import LoraConfig, ModelConfig
    from distsft.model.loading import load_model

    with pytest.raises(ConfigError) as e:
        load_model(ModelConfig(), torch.float32, "sdpa", 0, LoraConfig(r=4, target_modules=["qkv_proj"]))
    msg = str(e.value)
    assert "\n" not in msg and "lora.target_modules = ['qkv_proj'] matches no module of LlamaForCausalLM" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in msg


def test_only_adapters_train_and_the_flops_count_a_frozen_base_at_4_per_token():
    from distsft.config import LoraConfig, ModelConfig
    from distsft.model.flops import flops_model
    from distsft.model.loading import count_parameters, load_model
    from distsft.model.lora import trainable_and_total

    full = load_model(ModelConfig(), torch.float32, "sdpa", 0)
    model = load_model(ModelConfig(), torch.float32, "sdpa", 0, LoraConfig(r=8))
    trainable, total = trainable_and_total(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and trainable < 0.1 * total
    fm, fm_full = flops_model(model, count_parameters(model)), flops_model(full, count_parameters(full))
    assert fm.dense_params == fm_full.dense_params + trainable and fm.frozen_params == fm_full.dense_params
    # per token: 2N fewer (no weight gradient for the base), 6 per adapter parameter; attention unchanged
    expected = fm_full.flops([100]) - 100 * 2 * fm_full.dense_params + 100 * 6 * trainable
    assert fm.flops([100]) == pytest.approx(expected, rel=1e-9)


# --- training ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lora_run_writes_a_peft_adapter_that_peft_generate_and_eval_load(tmp_path, cli):
    from peft import AutoPeftModelForCausalLM, PeftModel

    launch_local(lora_cfg(tmp_path), quiet=True)
    final = tmp_path / "final"
    assert {p.name for p in final.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not (final / "config.json").exists() and json.loads((final / "tokenizer_config.json").read_text())
    weights = final_weights(tmp_path)
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # B starts at 0: it trained
    model = AutoPeftModelForCausalLM.from_pretrained(final)
    assert isinstance(model, PeftModel)
    code, out, _ = cli("generate", "--model", str(final), "My internet is slow.", "--max-new-tokens", "4")
    assert code == 0
    code, out, _ = cli("eval", "--model", str(final), "--set", f"data.path={SMALL}")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["loss"] > 0
    # checkpoints hold what trains (adapters, their optimizer state), not the frozen base
    from distsft.model.loading import count_parameters, load_model

    ckpt = next((tmp_path / "checkpoints").glob("step-*"))
    base_bytes = 4 * count_parameters(load_model(lora_cfg(tmp_path).model, torch.float32, "sdpa", 0))
    assert sum(f.stat().st_size for f in (ckpt / "ds").iterdir()) < 0.2 * base_bytes


@pytest.mark.slow
def test_merged_export_computes_the_adapter_models_logits(tmp_path, cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distsft.model.lora import adapter_base

    launch_local(lora_cfg(tmp_path, "lora.modules_to_save=[lm_head]"), quiet=True)
    code, out, err = cli("export", str(tmp_path), "--merge")
    assert code == 0, err
    merged_dir = tmp_path / "export-step-3-merged"
    merged, info = AutoModelForCausalLM.from_pretrained(merged_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    base = AutoModelForCausalLM.from_pretrained(adapter_base(tmp_path / "final"))
    adapter = PeftModel.from_pretrained(base, str(tmp_path / "final")).eval()
    ids = torch.randint(3, 3000, (2, 37))
    with torch.no_grad():
        a, b = adapter(input_ids=ids).logits, merged.eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(adapter_base(tmp_path / "final")).eval()(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert (a - plain).abs().max() > 1e-3  # the adapters (and the saved lm_head) changed the model


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_lora_resumed_equals_uninterrupted(tmp_path, stage, monkeypatch):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    extra = ["train.max_steps=6", "checkpoint.every_steps=2", f"train.zero_stage={stage}"]
    launch_local(lora_cfg(full, *extra), quiet=True)
    monkeypatch.setenv("DISTSFT_FAIL_AT", "0:5")
    with pytest.raises(RuntimeError, match="injected failure"):
        launch_local(lora_cfg(crashed, *extra), quiet=True)
    monkeypatch.delenv("DISTSFT_FAIL_AT")
    assert launch_local(lora_cfg(crashed, *extra), quiet=True)["start_step"] == 4
    for r, f in zip(metrics(crashed), metrics(full), strict=True):
        assert r["loss"] == pytest.approx(f["loss"], rel=1e-6)
    wa, wb = final_weights(full), final_weights(crashed)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_lora_packed_and_unpacked_step_agree(tmp_path):
    from distsft.launcher.prepare import prepare_data

    records = {}
    for packing in (True, False):
        flag = f"data.packing={str(packing).lower()}"
        n_rows = len(prepare_data(lora_cfg(tmp_path / f"p{packing}", flag)).train)
        cfg = lora_cfg(tmp_path / f"p{packing}", flag, "train.max_steps=1", f"train.micro_batch_size={n_rows}")
        launch_local(cfg, quiet=True)
        records[packing] = metrics(tmp_path / f"p{packing}")[0]
    assert records[True]["tokens"] == records[False]["tokens"]
    assert records[True]["loss"] == pytest.approx(records[False]["loss"], rel=1e-5)
    assert records[True]["grad_norm"] == pytest.approx(records[False]["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_qlora_trains_4bit_on_cpu_exports_and_merges(tmp_path, cli):
    """bitsandbytes runs NF4 layers on CPU: the base is 4-bit in training, adapters train, export works."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q"
    launch_local(lora_cfg(out, "model.quantization=4bit"), quiet=True)
    rows = metrics(out)
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
    assert any(w.abs().sum() > 0 for k, w in final_weights(out).items() if "lora_B" in k)
    code, _, err = cli("export", str(out), "--merge", "--out", str(tmp_path / "merged"))
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("quant" in type(m).__name__.lower() or "4bit" in type(m).__name__ for m in merged.modules())


@pytest.mark.slow
# LoRA on two Ray workers under ZeRO 1 (and resharded to one): tests/test_reshard.py
@pytest.mark.parametrize("stage,quant", [(3, "none"), (3, "4bit")], ids=["zero3", "qlora-zero3"])
def test_lora_two_ray_workers_equal_one_process(ray_instance, tmp_path, stage, quant):
    """1 process x accumulation 4 = 2 Ray workers x 2: losses, gradient norms and adapter weights (1e-5);
    the base is partitioned under ZeRO-3, and held in 4 bits for QLoRA.

    Adam's eps is 1 here, so an update is proportional to its gradient: LoRA's B starts at zero, which
    makes some of A's first gradients zero up to rounding, and Adam's sign-like first update would turn
    that rounding (the two runs sum micro-batches in a different order) into lr-sized differences."""
    from conftest import REPO
    from raytest import assert_same_run, cluster

    from distsft.launcher.run import launch_ray

    ds = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    ds["optimizer"]["params"]["eps"] = 1.0
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    extra = ["train.micro_batch_size=1", f"train.zero_stage={tmp_path / 'ds.json'}", f"model.quantization={quant}"]
    ref, ray_out = tmp_path / "ref", tmp_path / "ray"
    launch_local(lora_cfg(ref, *extra, "train.grad_accum_steps=4"), quiet=True)
    launch_ray(lora_cfg(ray_out, *extra, "train.grad_accum_steps=2"), cluster(2), quiet=True)
    assert_same_run(ref, ray_out)
