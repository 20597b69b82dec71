"""The one-GPU default path, checked where a CPU can check it: fp32 weights under bf16 autocast into the
varlen kernel, a step without host syncs, LoRA's frozen base in bf16, the store's timeout after joining,
a driver that never touches the GPU, a diverging step. benchmarks/gpu_check.sh runs the rest on a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO
from gpustand import HostSyncs, ReferenceVarlen
from raytest import free_port, metrics, run_cfg

from distsft.config import load_config


def test_the_default_one_gpu_step_casts_for_the_varlen_kernel_and_never_waits_for_the_device(tmp_path, monkeypatch):
    """What ``model.dtype: auto`` runs on one GPU (fp32 weights, bf16 autocast, distsft_varlen, ZeRO off, the
    loop clipping), run on a CPU with a stand-in for the flash kernel. Rotary embeddings hand the attention
    function fp32 q/k beside a bf16 v; the kernel must get one 16-bit dtype. And no operation inside a step
    waits for the device (no boolean masks, no mask-building checks, no DeepSpeed timer syncs)."""
    from deepspeed.accelerator import get_accelerator

    from distsft.launcher.run import launch_local
    from distsft.model import attention
    from distsft.training import loop
    from distsft.training.engine import Precision

    syncs = HostSyncs()
    kernel = ReferenceVarlen(syncs)
    seen = []
    real_forward, real_traits, real_step = (
        attention.varlen_attention_forward,
        loop.traits_and_attention,
        loop.train_step,
    )

    def boundary(module, query, key, value, *args, **kwargs):  # what transformers hands the attention function
        seen.append((query.dtype, key.dtype, value.dtype))
        return real_forward(module, query, key, value, *args, **kwargs)

    per_step, ds_syncs = [], []

    def counted_step(*args, **kwargs):
        syncs.seen.clear()
        with syncs:
            out = real_step(*args, **kwargs)
        per_step.append(list(syncs.seen))
        return out

    accelerator = get_accelerator()
    monkeypatch.setattr(accelerator, "synchronize", lambda *a, **k: ds_syncs.append(1))
    monkeypatch.setattr(attention, "_kernel", lambda: kernel)
    monkeypatch.setattr(attention, "varlen_attention_forward", boundary)
    monkeypatch.setattr(loop, "choose_precision", lambda *a: Precision(torch.float32, torch.bfloat16, autocast=True))
    monkeypatch.setattr(loop, "traits_and_attention", lambda *a: (real_traits(*a)[0], attention.NAME))
    monkeypatch.setattr(loop, "train_step", counted_step)
    real_render = loop.render_ds_config

    def as_on_a_gpu(*args, **kwargs):  # torch's fused AdamW, as a GPU gets (its step counts stay on the device)
        ds = real_render(*args, **kwargs)
        ds["optimizer"]["params"]["fused"] = True
        return ds

    monkeypatch.setattr(loop, "render_ds_config", as_on_a_gpu)
    cfg = run_cfg(tmp_path, "train.max_steps=3", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                  "train.log_every=3", "train.cross_entropy=fused")  # fmt: skip
    summary = launch_local(cfg, quiet=True)

    assert summary["attention"] == attention.NAME and summary["loss_kernel"] == "fused"
    assert (torch.float32, torch.float32, torch.bfloat16) in seen  # the finding: fp32 q/k, bf16 v
    assert kernel.dtypes and set(kernel.dtypes) == {(torch.bfloat16,) * 3}  # the fix: one dtype in
    assert per_step == [[], [], []], per_step  # no host sync in any step
    assert ds_syncs == []  # DeepSpeed's throughput timer is off
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["grad_norm"] > 0 for r in rows)


def test_lora_on_one_gpu_keeps_the_frozen_base_in_bf16_as_the_dry_run_counts_it():
    """LoRA with ``dtype: auto`` on a GPU: bf16 base (2 bytes a parameter, what the dry run counts), fp32
    adapters under bf16 autocast, and no DeepSpeed bf16 wrapper; full fine-tuning keeps fp32 weights."""
    from distsft.launcher.dry_run import adapter_memory, model_sizes
    from distsft.model.loading import load_model, resolve_dtype
    from distsft.training.engine import choose_precision, deepspeed_plan, render_ds_config

    cuda = torch.device("cuda")
    cfg = load_config(None, ["lora.r=8"])
    ds = deepspeed_plan(cfg, 1)
    precision = choose_precision(cfg, cuda, resolve_dtype(cfg.model, cuda), ds)
    assert (precision.weights, precision.compute, precision.autocast) == (torch.bfloat16, torch.bfloat16, True)
    full = choose_precision(load_config(None, []), cuda, torch.bfloat16, ds)
    assert (full.weights, full.autocast) == (torch.float32, True)

    rendered = render_ds_config(cfg, ds, cfg.batch_plan(1), precision, cuda)
    assert rendered["bf16"]["enabled"] is False and rendered["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert rendered["timers"]["throughput"]["enabled"] is False

    model = load_model(cfg.model, precision.weights, "sdpa", cfg.train.seed, cfg.lora)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16} and {p.dtype for p in trained} == {torch.float32}
    frozen_bytes = sum(p.numel() * p.element_size() for p in frozen)
    base, states = adapter_memory(cfg, ds.stage, model_sizes(cfg), workers_per_node=1, world=1)
    assert base == frozen_bytes  # 2 bytes per frozen parameter, as the dry run says
    assert states == 16 * sum(p.numel() for p in trained)  # fp32 adapters, gradients, Adam's two moments


def test_the_store_waits_as_long_as_a_collective_once_the_group_is_formed():
    """NCCL exchanges its communicators' ids through the rendezvous store at a group's first collective
    (after model loading); the store must then be bounded by the collective timeout, not the rendezvous one."""
    code = f"""
from torch.distributed import distributed_c10d as c10d
from distsft.training.distributed import Rendezvous, join_group
join_group(Rendezvous("gloo", 0, 1, "127.0.0.1", {free_port()}, "127.0.0.1", 7.0, 77.0))
print(c10d._get_default_store().timeout.total_seconds())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) == 77.0


def test_the_ray_driver_plans_for_gpus_without_touching_one(monkeypatch):
    """The Ray driver lives for the whole run: it must create no CUDA context (GPU 0 beside a worker, and a
    failure in exclusive-process mode). A local launch is its own worker and probes its GPU."""
    from distsft.launcher.run import check_model
    from distsft.model import attention
    from distsft.model.loading import resolve_dtype

    def touched(*a, **k):
        raise AssertionError("the driver touched the GPU")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("is_bf16_supported", "current_device", "get_device_capability", "init", "set_device"):
        monkeypatch.setattr(torch.cuda, name, touched)
    monkeypatch.setattr(attention, "usable", touched)
    cfg = load_config(None, [])
    assert "distsft_varlen" in check_model(cfg, "cuda", probe=False)
    with pytest.raises(AssertionError, match="touched"):
        check_model(cfg, "cuda")  # a local launch probes (and this test can fail)
    # emulated bf16 (V100, T4) is not bf16: auto is fp32 there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_dtype(cfg.model, torch.device("cuda")) == torch.float32


def test_allocator_settings_expandable_unless_the_user_chose():
    from distsft.training.distributed import EXPANDABLE, allocator_settings

    assert allocator_settings({}) == EXPANDABLE
    assert allocator_settings({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}) is None
    assert allocator_settings({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}) is None


def test_a_diverging_step_ends_the_run_before_any_checkpoint_of_its_weights(tmp_path, cli, monkeypatch):
    """Step 3's gradients are NaN: the run saves steps 1 and 2 (checkpoint.every_steps=1) and stops at the
    read of step 3 with one line and exit 2; no checkpoint or export holds non-finite weights."""
    monkeypatch.setenv("DISTSFT_NAN_AT", "0:3")
    out = tmp_path / "run"
    cfg = run_cfg(out, "train.max_steps=5", "checkpoint.every_steps=1", "checkpoint.keep_last=1")
    code, _, err = cli("launch", "--local", "--config", str(_save(cfg, tmp_path)))
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert "step 3: grad_norm nan" in line and "last checkpoint: step 2" in line, line
    steps = sorted(int(p.name[5:]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps == [2], steps  # keep_last rotated step 1 away, and nothing came after step 2
    assert not (out / "final").exists()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def _save(cfg, where) -> str:
    from distsft.config import save_config

    path = where / "config.yaml"
    save_config(cfg, path)
    return str(path)


def test_non_finite_records_are_named_by_step():
    from distsft.training.step import divergence

    assert divergence([{"step": 4, "loss": 1.0, "grad_norm": 2.0}], None) is None
    said = divergence([{"step": 4, "loss": float("inf"), "grad_norm": None}], "step 2")
    assert said.startswith("step 4: loss inf") and "step 2" in said


def test_models_load_without_hub_kernels(monkeypatch):
    """transformers 5.2x swaps layers for kernels downloaded from the Hub on a GPU unless told not to: code
    from the network at load time, which fails offline (seen on an H200: 'kernels-community/rotary is not
    available in the local cache'). Every model distsft loads says use_kernels=False."""
    from transformers import AutoModelForCausalLM

    from distsft.config import ModelConfig
    from distsft.model import loading

    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("use_kernels"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    loading.load_model(ModelConfig(path="demo"), torch.float32, "sdpa", 0)
    assert calls == [False], calls


def test_doctor_says_which_gpu_settings_the_workers_run_with():
    from distsft.config.cluster import ClusterConfig, WorkerResources
    from distsft.launcher.doctor import gpu_finding

    cluster = ClusterConfig(resources_per_worker=WorkerResources(cpus=1, gpus=1), collective_timeout_s=900)
    nodes = [{"NodeManagerAddress": "198.51.100.1", "Resources": {"GPU": 8}}]
    seen = {"ip": "198.51.100.1", "gpus": 8, "gpu_name": "NVIDIA H200", "native_bf16": True, "env": {}}
    ok = gpu_finding(cluster, nodes, [seen])
    assert ok.ok and "expandable_segments:True (distsft's)" in ok.text and "collective_timeout_s=900s" in ok.text
    mine = gpu_finding(cluster, nodes, [{**seen, "env": {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}}])
    assert "max_split_size_mb:512 (the cluster's)" in mine.text
    hangs = gpu_finding(cluster, nodes, [{**seen, "env": {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}}])
    assert not hangs.ok and "hangs" in hangs.text
    old = gpu_finding(cluster, nodes, [{**seen, "native_bf16": False, "gpu_name": "Tesla V100"}])
    assert not old.ok and "emulate bf16" in old.text
