"""The paths only a GPU runs: the default ``model.dtype: auto`` (fp32 weights, bf16 autocast) into PyTorch's
varlen kernel, host syncs per step, LoRA's memory, ZeRO-3 + LoRA on one GPU, flex_attention, pinned-memory
prefetch with CUDA-event timing, torch's fused AdamW, and QLoRA's 4-bit layers on CUDA. Skipped without a
GPU (CI has none); run on a lent GPU machine (benchmarks/gpu_check.sh), which collects the figures these
tests write to ``DISTSFT_GPU_REPORT``."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from families import save_family
from raytest import metrics, run_cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def report(**figures) -> None:
    """One line of figures for the GPU check's summary (and the console with ``-s``)."""
    line = json.dumps(figures, default=str)
    print(f"GPU-FIGURES {line}", flush=True)
    path = os.environ.get("DISTSFT_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def test_the_default_dtype_runs_fp32_weights_under_autocast_into_varlen_without_host_syncs(tmp_path, monkeypatch):
    """``model.dtype: auto`` on one GPU, as every GPU user runs it: fp32 weights, bf16 autocast, the varlen
    kernel (q/k arrive in fp32 beside a bf16 v), the loop clipping. Every step is counted for host syncs
    with CUDA's sync debug mode, and DeepSpeed's synchronize calls are counted too: both must be 0."""
    from deepspeed.accelerator import get_accelerator

    from distsft.launcher.run import launch_local
    from distsft.training import loop

    real_step, per_step, ds_syncs = loop.train_step, [], []

    def counted(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = real_step(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        per_step.append([str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)])
        return out

    accelerator = get_accelerator()
    real_sync = accelerator.synchronize
    monkeypatch.setattr(accelerator, "synchronize", lambda *a, **k: (ds_syncs.append(1), real_sync(*a, **k)))
    monkeypatch.setattr(loop, "train_step", counted)
    model = save_family("llama", tmp_path / "model", hidden_size=256, intermediate_size=512, head_dim=64)
    for kernel in ("plain", "fused"):
        out = tmp_path / kernel
        cfg = run_cfg(out, f"model.path={model}", "model.tokenizer=demo", "train.max_steps=6",
                      "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.log_every=6",
                      f"train.cross_entropy={kernel}")  # fmt: skip
        per_step.clear(), ds_syncs.clear()
        summary = launch_local(cfg, quiet=True)
        rows = metrics(out)
        first = next((s[0] for s in per_step if s), None)
        report(check="default dtype", loss_kernel=kernel, attention=summary["attention"], first_sync=first,
               syncs_per_step=[len(s) for s in per_step], deepspeed_syncs=len(ds_syncs),
               loss=[round(r["loss"], 4) for r in rows])  # fmt: skip
        assert summary["attention"] == "distsft_varlen"
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
        assert per_step == [[]] * 6, per_step
        assert ds_syncs == []


def test_lora_on_one_gpu_holds_a_bf16_base_and_zero3_lora_runs(tmp_path):
    """LoRA r=8 with ``dtype: auto``: the frozen base in bf16, so the peak stays under what an fp32 base alone
    would take (4 bytes a parameter); ZeRO-3 + LoRA on the same GPU trains too."""
    from distsft.launcher.run import launch_local

    shape = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 12, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 64}  # fmt: skip
    model = save_family("llama", tmp_path / "model", **shape)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        params = sum(
            p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters()
        )
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}"
        cfg = run_cfg(out, f"model.path={model}", "model.tokenizer=demo", "train.max_steps=4", "lora.r=8",
                      "train.lr=1e-3", "train.micro_batch_size=1", f"train.zero_stage={stage}")  # fmt: skip
        summary = launch_local(cfg, quiet=True)
        rows = metrics(out)
        peak = max(r["peak_mem_mb"] for r in rows) * 2**20
        report(check="lora r=8", zero_stage=stage, base_params=params, bf16_base_mb=round(params * 2 / 2**20),
               peak_mb=round(peak / 2**20), loss=[round(r["loss"], 4) for r in rows],
               engine=summary.get("attention"))  # fmt: skip
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
        if stage == 0:
            assert peak < 4 * params, (peak, params)


def test_a_nan_step_on_the_gpu_stops_before_any_checkpoint_of_its_weights(tmp_path, monkeypatch):
    from distsft.launcher.run import launch_local
    from distsft.training.step import Diverged

    monkeypatch.setenv("DISTSFT_NAN_AT", "0:3")
    model = save_family("llama", tmp_path / "model", hidden_size=256, intermediate_size=512, head_dim=64)
    out = tmp_path / "run"
    cfg = run_cfg(out, f"model.path={model}", "model.tokenizer=demo", "train.max_steps=5",
                  "checkpoint.every_steps=1", "checkpoint.keep_last=1")  # fmt: skip
    with pytest.raises(Diverged) as e:
        launch_local(cfg, quiet=True)
    steps = sorted(int(p.name[5:]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    report(check="nan step", said=str(e.value)[:160], checkpoints=steps)
    assert "step 3" in str(e.value) and steps == [2]


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_auto_attention_on_gpu_isolates_packed_examples(name, tmp_path):
    """Whatever `auto` picks on this GPU (varlen for Llama and Mistral's window, flex for Gemma-2's
    soft-capping), a packed batch equals its examples alone within bf16 rounding."""
    from families import family_model
    from isolation import packed_vs_alone

    from distsft.config import ModelConfig
    from distsft.model.loading import traits_and_attention

    shape = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}  # flex needs head_dim >= 16
    path = save_family(name, tmp_path / name, **shape)
    _, attn = traits_and_attention(ModelConfig(path=str(path)), torch.device("cuda"), torch.bfloat16)
    assert attn == ("flex_attention" if name == "gemma2" else "distsft_varlen"), attn
    model = family_model(name, attn=attn, vocab_size=211, **shape).to("cuda", torch.bfloat16).train()
    packed, alone, logit_diff, _ = packed_vs_alone(model, [40, 23, 50, 9], max_len=128, device="cuda")
    assert packed == pytest.approx(alone, rel=2e-2)
    assert logit_diff < 0.1, logit_diff


def test_local_run_on_gpu_uses_the_fast_path_and_reads_its_figures(tmp_path):
    """bf16, distsft_varlen, the fused loss, torch's fused AdamW, pinned prefetch, CUDA-event phases."""
    from distsft.launcher.run import launch_local

    model = save_family("llama", tmp_path / "model", hidden_size=256, intermediate_size=512, head_dim=64)
    cfg = run_cfg(tmp_path / "run", f"model.path={model}", "model.tokenizer=demo", "train.max_steps=4",
                  "train.micro_batch_size=2", "train.log_every=2")  # fmt: skip
    summary = launch_local(cfg, quiet=True)
    assert summary["attention"] == "distsft_varlen"
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["fwd_bwd_s"] > 0 and r["optimizer_s"] > 0 and r["data_wait_s"] >= 0 and r["mfu"] is not None
    assert rows[-1]["loss"] < rows[0]["loss"] + 1.0


def test_qlora_on_gpu_trains_4bit_and_merges(tmp_path, cli):
    pytest.importorskip("bitsandbytes")
    from distsft.launcher.run import launch_local

    model = save_family("llama", tmp_path / "model", hidden_size=256, intermediate_size=512, head_dim=64)
    out = tmp_path / "run"
    cfg = run_cfg(out, f"model.path={model}", "model.tokenizer=demo", "train.max_steps=3", "lora.r=8",
                  "model.quantization=4bit", "train.lr=1e-3")  # fmt: skip
    launch_local(cfg, quiet=True)
    assert len(metrics(out)) == 3
    code, _, err = cli("export", str(out), "--merge", "--out", str(tmp_path / "merged"))
    assert code == 0, err


@pytest.mark.parametrize("core", ["distsft_varlen", "flex_attention"])
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_sequence_parallel_attention_runs_the_gpu_kernels_with_whole_row_lengths(core, name):
    """The Ulysses wrapper over a group of one (its exchanges are then the identity) hands the GPU kernels
    the whole rows' lengths (varlen) or document block mask (flex): the loss of packed rows equals the
    kernel's own within bf16 rounding. The CPU tests cover the exchanges; this covers the kernels."""
    import os
    import socket

    import torch.distributed as dist
    from families import family_model
    from sptest import rows_for

    from distsft.data.collate import collate
    from distsft.training import sequence_parallel
    from distsft.training.loss import token_loss_sum

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    sp = sequence_parallel.SequenceGroup(1, 0, dist.group.WORLD)
    shape = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "vocab_size": 211}
    rows = rows_for(211, 112)
    losses = []
    for attn in (core, sequence_parallel.register(sp, core)):
        model = family_model(name, attn=attn, **shape).to("cuda", torch.bfloat16).train()
        if attn == core:  # the kernel as distsft runs it without sequence parallelism
            batch = collate(rows, 0, varlen=core == "distsft_varlen")
        else:
            batch = sequence_parallel.shard_batch(collate(rows, 0, varlen=True), 1, 0)
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        losses.append(token_loss_sum(model, batch).loss_sum.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-2), losses
