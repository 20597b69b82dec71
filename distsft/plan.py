"""``--dry-run``: what a launch would do, computed without a cluster, weights or data on this machine.

The model is built on the meta device from its config (no memory, no weights), which gives the exact
parameter count and largest layer for DeepSpeed's model-state memory estimators.
"""

from __future__ import annotations

from typing import NamedTuple

from distsft.cluster import ClusterConfig
from distsft.config import Config
from distsft.engine import ds_config_path

GiB = 1024**3


class ModelSize(NamedTuple):
    total: int
    largest: int
    """Parameters of the largest single module (what ZeRO-3 must gather at once)."""
    family: str
    """What the family is and runs with (attention, tied weights, windows, experts)."""
    trainable: int
    """Parameters that train: all of them, or the adapters (and ``modules_to_save``) of a LoRA run."""
    quantizable: int
    """Frozen parameters that bitsandbytes would hold in 4 or 8 bits (linear layers but the output layer)."""


def model_sizes(cfg: Config, device_type: str = "cuda") -> ModelSize | None:
    """The model's size and family, or None when the model config is out of reach."""
    import torch
    from transformers import AutoModelForCausalLM

    from distsft.model import load_model_config

    try:
        if cfg.model.config_path:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(cfg.model.config_path)
        else:
            config = load_model_config(cfg.model)
    except Exception:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    out_layer = model.get_output_embeddings()
    quantizable = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not out_layer
    )
    from distsft.errors import ConfigError
    from distsft.traits import choose_attention, read_traits

    traits = read_traits(config, type(model))
    try:
        family = traits.describe(choose_attention(cfg.model.attn_implementation, traits, torch.device(device_type)))
    except ConfigError as e:
        family = f"{traits.class_name}: {e}"
    base_total = sum(p.numel() for p in model.parameters())
    trainable = base_total
    if cfg.lora.r > 0:
        from distsft.lora import apply_lora, trainable_and_total

        with torch.device("meta"):
            model = apply_lora(model, cfg.lora, quantized=False, seed=0)
        trainable, _ = trainable_and_total(model)
    return ModelSize(base_total + (trainable if cfg.lora.r > 0 else 0), largest, family, trainable, quantizable)


def memory_estimate(stage: int, offload_opt: bool, offload_param: bool, sizes: ModelSize, cluster: ClusterConfig):
    """DeepSpeed's own estimate of model-state memory (params, grads, optimizer) per GPU and per node."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = sizes.total, sizes.largest
    per_node = cluster.workers_per_node
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total,
            largest,
            per_node,
            cluster.num_nodes,
            cpu_offload=offload_opt,
            cpu_offload_params=offload_param,
            zero_init=True,
            additional_buffer_factor=1.5,
        )
    else:  # DeepSpeed estimates stage 2; stage 1 keeps full fp16 gradients too, so it needs a little more
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, per_node, cluster.num_nodes, cpu_offload=offload_opt)
    return cpu, gpu


def adapter_memory(cfg: Config, stage: int, sizes: ModelSize, workers_per_node: int, world: int) -> tuple[float, float]:
    """(base bytes, adapter + gradient + optimizer bytes) per GPU for a LoRA run: the frozen base in the
    model's dtype, or 4/8 bits for its linear layers (NF4 with double quantisation is about 4.13 bits a
    weight); what trains needs bf16 weights and gradients and fp32 master weights plus Adam's two moments,
    each partitioned over the workers as the ZeRO stage says."""
    dtype_bytes = 4 if cfg.model.dtype == "float32" else 2
    base = sizes.total - sizes.trainable
    quantized = min(sizes.quantizable, base) if cfg.model.quantization != "none" else 0
    bits = {"none": 8 * dtype_bytes, "4bit": 4.13, "8bit": 8.0}[cfg.model.quantization]
    base_bytes = quantized * bits / 8 + (base - quantized) * dtype_bytes
    if stage == 3:
        base_bytes /= world
    t = sizes.trainable
    states = t * 2 / (world if stage == 3 else 1) + t * 2 / (world if stage >= 2 else 1) + t * 12 / world
    return base_bytes, states


def _params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def dry_run(cfg: Config, cluster: ClusterConfig, local: bool = False) -> list[str]:
    import json

    plan = cfg.batch_plan(cluster.num_workers)
    ds = json.loads(ds_config_path(cfg.train.zero_stage).read_text())
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    offload_param = zero.get("offload_param", {}).get("device", "none") == "cpu"
    r = cluster.resources_per_worker
    where = cluster.address or "a new local Ray instance (dashboard on " + cluster.dashboard_host + ")"
    if local:
        where = "none: --local runs the loop in this process"
    lines = [
        f"ray:            {where}",
        f"nodes:          {cluster.num_nodes}",
        f"workers:        {cluster.num_workers} ({cluster.workers_per_node} per node), "
        f"placement {cluster.placement_strategy}, backend "
        f"{cluster.backend if cluster.backend != 'auto' else ('nccl' if cluster.use_gpu else 'gloo')}",
        f"per worker:     {r.cpus:g} CPU, {r.gpus:g} GPU"
        + (f", {r.memory_gb:g} GiB" if r.memory_gb else "")
        + (f", {r.accelerator_type}" if r.accelerator_type else ""),
        f"env for workers: {', '.join(sorted(cluster.env)) or 'none'} (values not shown)",
        f"zero:           stage {stage} ({ds_config_path(cfg.train.zero_stage).name})"
        + (", optimizer offload to CPU" if offload_opt else "")
        + (", parameter offload to CPU" if offload_param else ""),
        f"batch:          micro {plan.micro_batch_size} x grad accum {plan.grad_accum_steps} x workers "
        f"{plan.world_size} = global batch {plan.global_batch} rows",
        f"tokens/step:    up to {plan.global_batch * cfg.data.max_seq_len:,} "
        f"({plan.global_batch} rows x max_seq_len {cfg.data.max_seq_len}, "
        f"packing {'on' if cfg.data.packing else 'off'})",
        "steps:          "
        + (
            f"{cfg.train.max_steps}"
            if cfg.train.max_steps > 0
            else f"{cfg.train.epochs:g} epoch(s) of the prepared data"
        ),
        f"warmup/lr:      {cfg.train.warmup_steps} steps to {cfg.train.lr:g}, "
        f"cosine to {cfg.train.lr * cfg.train.min_lr_ratio:g}",
        "checkpoints:    "
        + (f"every {cfg.checkpoint.every_steps} steps" if cfg.checkpoint.every_steps else "at the end")
        + f", keep {cfg.checkpoint.keep_last}, to {cluster.storage_path or cfg.output_dir}",
        f"output:         {cfg.output_dir}/final "
        + ("(PEFT adapter directory; --merge on export for one model)" if cfg.lora.r else "(Hugging Face directory)"),
    ]
    sizes = model_sizes(cfg, "cuda" if cluster.use_gpu else "cpu")
    if sizes is None:
        lines.append(f"model:          {cfg.model.path} (config not reachable from here: no memory estimate)")
    else:
        lines.append(
            f"model:          {cfg.model.path}: {sizes.total / 1e9:.2f}B parameters "
            f"(largest layer {sizes.largest / 1e6:.0f}M)"
        )
        lines.append(f"family:         {sizes.family}")
        if cfg.lora.r > 0:
            base, states = adapter_memory(cfg, stage, sizes, cluster.workers_per_node, cluster.num_workers)
            kind = {"none": "LoRA", "4bit": "QLoRA (4-bit NF4 base)", "8bit": "LoRA on an 8-bit base"}
            lines.append(
                f"adapters:       {kind[cfg.model.quantization]}, r {cfg.lora.r}, targets {cfg.lora.target_modules}: "
                f"{_params(sizes.trainable)} trainable ({sizes.trainable / sizes.total:.2%} of the parameters)"
            )
            per_gpu = base + states
            lines.append(
                f"model states:   {_bytes(per_gpu)} per GPU = base {_bytes(base)} + adapters, gradients and "
                f"optimizer {_bytes(states)}; {_bytes(per_gpu * cluster.workers_per_node)} per node of "
                f"{cluster.workers_per_node} (activations come on top)"
            )
        else:
            cpu, gpu = memory_estimate(stage, offload_opt, offload_param, sizes, cluster)
            lines.append(
                f"model states:   {gpu / GiB:.1f} GiB per GPU, {cpu / GiB:.1f} GiB CPU per node "
                "(DeepSpeed estimate: params, grads, optimizer; activations come on top)"
            )
    return lines
