"""``--dry-run``: what a launch would do, computed without a cluster, weights or data on this machine.

The model is built on the meta device from its config (no memory, no weights), which gives the exact
parameter count and largest layer for DeepSpeed's model-state memory estimators.
"""

from __future__ import annotations

from typing import NamedTuple

from distsft.config import Config
from distsft.config.cluster import ClusterConfig
from distsft.training.engine import deepspeed_plan

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
    shape: Shape | None = None


class Shape(NamedTuple):
    """What activation memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    kv_dim: int
    """Key/value heads x head size: each of k and v is this wide per token."""
    vocab: int
    heads: int
    kv_heads: int


def model_sizes(cfg: Config, device_type: str = "cuda") -> ModelSize | None:
    """The model's size and family, or None when the model config is out of reach."""
    import torch
    from transformers import AutoModelForCausalLM

    from distsft.model.loading import load_model_config

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
    from distsft.model.traits import check_context, choose_attention, read_traits

    traits = read_traits(config, type(model))
    check_context(traits, cfg.data.max_seq_len)
    try:
        family = traits.describe(
            choose_attention(cfg.model.attn_implementation, traits, torch.device(device_type), probe=False)
        )
    except ConfigError as e:
        family = f"{traits.class_name}: {e}"
    base_total = sum(p.numel() for p in model.parameters())
    trainable = base_total
    if cfg.lora.r > 0:
        from distsft.model.lora import apply_lora, trainable_and_total

        with torch.device("meta"):
            model = apply_lora(model, cfg.lora, quantized=False, seed=0)
        trainable, _ = trainable_and_total(model)
    text = config.get_text_config()
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size)
    shape = Shape(
        text.hidden_size, intermediate, text.num_hidden_layers, kv_heads * head_dim, text.vocab_size, heads, kv_heads
    )
    total = base_total + (trainable if cfg.lora.r > 0 else 0)
    return ModelSize(total, largest, family, trainable, quantizable, shape)


# Memory of one accelerator by the names cluster files use (``resources_per_worker.accelerator_type``).
ACCELERATOR_GIB = {"A100-40G": 40, "A100-80G": 80, "A100": 80, "H100": 80, "H200": 141, "GH200": 96, "B200": 180,
                   "L40S": 48, "L40": 48, "L4": 24, "A10G": 24, "MI300X": 192, "MI250X": 128}  # fmt: skip


def activation_memory(cfg: Config, shape: Shape, sequence_parallel: int) -> float:
    """Bytes of activations one worker holds at its peak, for a micro-batch of full rows.

    An estimate, per token of the worker's slice (``micro_batch_size x max_seq_len / sequence_parallel``):
    a decoder layer keeps its inputs for the backward pass: 9 hidden-wide tensors (norm inputs and outputs,
    q, rotated q, attention output, projection input, residual), 3 key/value-wide ones, and 4 of the MLP's
    intermediate width (gate, up, activation, product), which a tiled MLP does not keep. Activation
    checkpointing keeps one hidden-wide tensor per layer and recomputes one layer at a time (that layer's
    activations and their gradients). The attention kernel (flash or varlen) adds nothing that grows with
    the square of the length; a dense mask (sdpa, eager) would. The loss holds one chunk of fp32 logits
    and their gradient (``distsft/loss.py``)."""
    b = 4 if cfg.model.dtype == "float32" else 2
    tokens = cfg.train.micro_batch_size * cfg.data.max_seq_len / sequence_parallel
    h, i = shape.hidden, shape.intermediate
    mlp = 0 if cfg.model.tiled_mlp else 4 * i
    layer = b * tokens * (9 * h + 3 * shape.kv_dim + mlp)
    if cfg.model.gradient_checkpointing:
        kept = shape.layers * b * tokens * h + 2 * layer
    else:
        kept = shape.layers * layer
    tile = b * 4 * i * min(tokens, h) * 2 if cfg.model.tiled_mlp else 0  # one tile and its gradient
    loss = min(tokens, 2048) * shape.vocab * 4 * 2
    return kept + tile + loss


def sequence_plan(cfg: Config, cluster: ClusterConfig, sizes: ModelSize, states: float) -> list[str]:
    """Activations per GPU, whether model states + activations fit, and the sequence-parallel size needed."""
    sp = cfg.train.sequence_parallel
    shape = sizes.shape
    if shape is None:
        return []
    name = cluster.resources_per_worker.accelerator_type or ""
    gib = ACCELERATOR_GIB.get(name) or ACCELERATOR_GIB.get(name.split("-")[0])
    act = activation_memory(cfg, shape, sp)
    tokens = cfg.train.micro_batch_size * cfg.data.max_seq_len // sp
    how = ", ".join(
        x
        for x, on in (
            ("activation checkpointing", cfg.model.gradient_checkpointing),
            ("tiled MLP", cfg.model.tiled_mlp),
        )
        if on
    )
    lines = [
        f"sequence:       {cfg.data.max_seq_len:,} tokens per row"
        + (
            f" over sequence_parallel {sp} = {cfg.data.max_seq_len // sp:,} per worker; "
            f"{cluster.num_workers // sp} data-parallel group(s)"
            if sp > 1
            else "; no sequence parallelism"
        ),
        f"activations:    {_bytes(act)} per GPU ({tokens:,} tokens per micro-batch"
        + (f"; {how}" if how else "; no activation checkpointing, no tiled MLP")
        + ")",
    ]
    if not cluster.use_gpu:
        return lines
    if gib is None:
        lines.append(f"fits:           unknown: no memory figure for accelerator {name or '(none given)'}")
        return lines
    budget = gib * GiB * 0.9  # the CUDA context, the allocator's fragmentation and communication buffers
    total = states + act
    verdict = "yes" if total <= budget else "no"
    lines.append(
        f"fits:           {verdict}: model states {_bytes(states)} + activations {_bytes(act)} = {_bytes(total)} "
        f"of {gib} GiB ({name}, 90% usable)"
    )
    if total > budget:
        need = [
            n
            for n in range(sp + 1, cluster.num_workers + 1)
            if cluster.num_workers % n == 0
            and cfg.data.max_seq_len % n == 0
            and shape.heads % n == 0
            and (shape.kv_heads % n == 0 or n % shape.kv_heads == 0)
            and states + activation_memory(cfg, shape, n) <= budget
        ]
        lines.append(
            f"needs:          train.sequence_parallel={need[0]}"
            if need
            else "needs:          more than sequence parallelism over these workers can give: "
            "turn on model.gradient_checkpointing and model.tiled_mlp, or a smaller max_seq_len"
        )
    return lines


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


def checkpoint_bytes(cfg: Config, sizes: ModelSize, gpu: bool) -> tuple[float, float]:
    """One checkpoint's bytes on storage, and the most that exist at once (``keep_last`` plus the one being
    written before the oldest goes). A checkpoint holds the module's weights in the training dtype (only
    the adapters of a LoRA run) and, for what trains, fp32 master weights and Adam's two moments."""
    width = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.model.dtype, 2 if gpu else 4)
    module = sizes.trainable if cfg.lora.r > 0 else sizes.total
    one = module * width + sizes.trainable * 12
    return one, one * (cfg.checkpoint.keep_last + 1)


def dry_run(cfg: Config, cluster: ClusterConfig, local: bool = False) -> list[str]:
    plan = cfg.batch_plan(cluster.num_workers)
    ds = deepspeed_plan(cfg, cluster.num_workers)
    stage, offload_opt, offload_param = ds.stage, ds.offload_optimizer, ds.offload_params
    r = cluster.resources_per_worker
    where = cluster.address or "a new local Ray instance (dashboard on " + cluster.dashboard_host + ")"
    if local:
        where = "none: --local runs the loop in this process"
    lines = [
        f"ray:            {where}",
        f"nodes:          {cluster.num_nodes}",
        f"workers:        {cluster.num_workers} ({cluster.workers_per_node} per node), "
        f"placement {cluster.placement_strategy}, backend "
        f"{cluster.process_group_backend}",
        f"per worker:     {r.cpus:g} CPU, {r.gpus:g} GPU"
        + (f", {r.memory_gb:g} GiB" if r.memory_gb else "")
        + (f", {r.accelerator_type}" if r.accelerator_type else ""),
        f"env for workers: {', '.join(sorted(cluster.env)) or 'none'} (values not shown)",
        f"zero:           {ds.describe()} ({ds.source.name}"
        + (
            f"; one worker partitions nothing: stage {cfg.train.zero_stage} runs without ZeRO"
            if ds.layout == 0 and cfg.train.zero_stage != 0
            else ""
        )
        + ")",
        f"batch:          micro {plan.micro_batch_size} x grad accum {plan.grad_accum_steps} x data-parallel "
        f"groups {plan.data_parallel} = global batch {plan.global_batch} rows"
        + (
            f" (workers {plan.world_size} = {plan.data_parallel} x sequence_parallel {plan.sequence_parallel})"
            if plan.sequence_parallel > 1
            else ""
        ),
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
        one, most = checkpoint_bytes(cfg, sizes, cluster.use_gpu)
        lines.append(
            f"checkpoint:     {_bytes(one)} each, up to {_bytes(most)} at once (keep_last + the one being written)"
        )
        if cfg.lora.r > 0:
            base, states = adapter_memory(cfg, stage, sizes, cluster.workers_per_node, cluster.num_workers)
            kind = {"none": "LoRA", "4bit": "QLoRA (4-bit NF4 base)", "8bit": "LoRA on an 8-bit base"}
            lines.append(
                f"adapters:       {kind[cfg.model.quantization]}, r {cfg.lora.r}, targets {cfg.lora.target_modules}: "
                f"{_params(sizes.trainable)} trainable ({sizes.trainable / sizes.total:.2%} of the parameters)"
            )
            per_gpu = base + states
            states_per_gpu = per_gpu
            lines.append(
                f"model states:   {_bytes(per_gpu)} per GPU = base {_bytes(base)} + adapters, gradients and "
                f"optimizer {_bytes(states)}; {_bytes(per_gpu * cluster.workers_per_node)} per node of "
                f"{cluster.workers_per_node} (activations come on top)"
            )
        else:
            cpu, gpu = memory_estimate(stage, offload_opt, offload_param, sizes, cluster)
            states_per_gpu = gpu
            lines.append(
                f"model states:   {gpu / GiB:.1f} GiB per GPU, {cpu / GiB:.1f} GiB CPU per node "
                "(DeepSpeed estimate: params, grads, optimizer; activations come on top)"
            )
        lines += sequence_plan(cfg, cluster, sizes, states_per_gpu)
    return lines
