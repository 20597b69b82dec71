"""DeepSpeed: render a ``ds_configs/`` file with its ``"auto"`` values filled from our config, and build
the engine around the model.

The JSON files stay the user-facing knob for everything DeepSpeed-specific (buckets, overlap, offload);
the values that must agree with our own config (batch sizes, lr, clipping, precision) are ``"auto"`` and
filled here, so the two can never disagree.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distsft.config import BatchPlan, Config
from distsft.errors import ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
STAGE_FILES = {0: "zero0.json", 1: "zero1.json", 2: "zero2.json", 3: "zero3.json", "3_offload": "zero3_offload.json"}


def ds_config_path(zero_stage: int | str) -> Path:
    """The JSON file of ``train.zero_stage``: a shipped one, or the user's (checked at config load)."""
    if zero_stage in STAGE_FILES:
        return DS_CONFIG_DIR / STAGE_FILES[zero_stage]
    return Path(str(zero_stage)).expanduser()


@dataclass(frozen=True)
class DeepSpeedPlan:
    """What the DeepSpeed engine will be, decided once from the config and the worker count, and read
    wherever the stage matters: the engine's JSON, who clips, the loss kernel, checkpoints, the dry run.

    A world of one partitions nothing: ZeRO stages 1 and 2 then run as DeepSpeed without ZeRO, which
    spares the gradient hooks, buckets and flat fp32 copies that cost a one-GPU step as much as its forward
    and backward (measured on an H100: 218 ms vs 174 ms per step, 1.5B model)."""

    stage: int
    """The ZeRO stage the engine really runs: 0 (no ZeRO), 1, 2 or 3."""
    layout: int | str
    """What checkpoints record as the engine's layout (``engine_stage``): 0 where one worker runs without
    ZeRO, else ``train.zero_stage`` as written (old checkpoints recorded the same values)."""
    template: dict[str, Any] = field(repr=False)
    """The JSON file's content, ``"auto"`` values still to fill (``render_ds_config``)."""
    source: Path
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def loop_clips(self) -> bool:
        """Without ZeRO the loop clips (foreach, no host sync) and keeps the norm it logs; ZeRO clips itself."""
        return self.stage == 0

    def describe(self) -> str:
        """For the dry run and the engine line."""
        zero = "without ZeRO" if self.stage == 0 else f"ZeRO stage {self.stage}"
        where = [x for x, on in (("optimizer", self.offload_optimizer), ("parameter", self.offload_params)) if on]
        offload = f", {' and '.join(where)} offload to CPU" if where else ""
        return f"{zero}{offload}"


def deepspeed_plan(cfg: Config, world_size: int) -> DeepSpeedPlan:
    path = ds_config_path(cfg.train.zero_stage)
    try:
        ds = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"train.zero_stage: {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    single = world_size == 1 and stage in (1, 2)
    return DeepSpeedPlan(
        stage=0 if single else stage,
        layout=0 if single else cfg.train.zero_stage,
        template=ds,
        source=path,
        offload_optimizer=_offloads(zero, "offload_optimizer"),
        offload_params=_offloads(zero, "offload_param"),
    )


def _offloads(zero: dict[str, Any], key: str) -> bool:
    return zero.get(key, {}).get("device", "none") not in ("none", None)


@dataclass(frozen=True)
class Precision:
    """What the weights are held in, and what the matmuls run in."""

    weights: torch.dtype
    """What the model is loaded in: the trained weights, or with LoRA the frozen base."""
    compute: torch.dtype
    autocast: bool = False
    """Matmuls in ``compute`` through torch.autocast (PyTorch's AMP); what trains is then held in fp32 and
    DeepSpeed runs no precision wrapper (its bf16 optimizer's master copies and overflow checks)."""

    @property
    def engine_dtype(self) -> torch.dtype:
        """The dtype DeepSpeed is told the trained weights have (its ``bf16``/``fp16`` sections)."""
        return torch.float32 if self.autocast else self.weights


def choose_precision(cfg: Config, device: torch.device, dtype: torch.dtype, ds: DeepSpeedPlan) -> Precision:
    """``model.dtype: auto`` on a GPU without ZeRO: bf16 autocast, the mixed precision of PyTorch's AMP,
    which needs no fp32 master copy beside bf16 weights and no conversions between them at every step.
    Full fine-tuning then holds fp32 weights and optimizer; LoRA holds the frozen base in bf16 (2 bytes a
    parameter, as the dry run counts it: fp32 would cost 4, and autocast would re-cast every frozen layer
    at every micro-batch) and its adapters in fp32. Otherwise the weights are ``dtype`` (DeepSpeed keeps
    fp32 master weights for bf16 ones under ZeRO)."""
    amp = (
        cfg.model.dtype == "auto"
        and device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and cfg.model.quantization == "none"
        and ds.stage == 0
    )
    if not amp:
        return Precision(dtype, dtype)
    return Precision(dtype if cfg.lora.r > 0 else torch.float32, dtype, autocast=True)


def render_ds_config(
    cfg: Config,
    ds_plan: DeepSpeedPlan,
    plan: BatchPlan,
    precision: Precision,
    device: torch.device,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """The engine's JSON: the plan's template with its ``"auto"`` values filled from our config."""
    ds = copy.deepcopy(ds_plan.template)
    dtype = precision.engine_dtype
    offload_opt = ds_plan.offload_optimizer
    h = hidden_size or 0
    values = {
        # DeepSpeed counts every worker as data-parallel (a sequence-parallel group's workers each add their
        # slice's gradients, which its all-reduce sums); the rows per step are ``plan.global_batch``.
        "train_batch_size": plan.micro_batch_size * plan.grad_accum_steps * plan.world_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": cfg.train.max_grad_norm,
        "bf16.enabled": dtype == torch.bfloat16,
        "fp16.enabled": dtype == torch.float16,
        "optimizer.params.lr": cfg.train.lr,
        "optimizer.params.betas": list(cfg.train.adam_betas),
        "optimizer.params.eps": cfg.train.adam_eps,
        "optimizer.params.weight_decay": cfg.train.weight_decay,
        # torch's AdamW everywhere but CPU offload (DeepSpeedCPUAdam, compiled on first use): fused on a
        # GPU, nothing for DeepSpeed to compile, where its FusedAdam needs nvcc and a matching toolkit.
        "optimizer.params.torch_adam": not offload_opt,
        "optimizer.params.fused": device.type == "cuda" and not offload_opt,
        "zero_optimization.offload_optimizer.pin_memory": device.type == "cuda",
        "zero_optimization.offload_param.pin_memory": device.type == "cuda",
        # The sizes Hugging Face's Trainer derives from the hidden size.
        "zero_optimization.reduce_bucket_size": h * h or int(5e8),
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * h * h) or int(5e7),
        "zero_optimization.stage3_param_persistence_threshold": 10 * h or int(1e5),
    }
    _fill_auto(ds, values, "", ds_plan.source)
    # DeepSpeed's throughput timer defaults to on and synchronised: a device sync in every forward and step.
    # distsft times steps with CUDA events instead; a DeepSpeed file that configures the timer keeps it.
    ds.setdefault("timers", {"throughput": {"enabled": False, "synchronized": False}})
    if ds_plan.stage == 0:
        ds["zero_optimization"] = {"stage": 0}
    if ds_plan.loop_clips:
        ds["gradient_clipping"] = 0.0  # the loop clips (foreach, no host sync) and keeps the norm it logs
    if precision.autocast:
        ds["torch_autocast"] = {"enabled": True, "dtype": str(precision.compute).removeprefix("torch.")}
    params = ds.get("optimizer", {}).get("params", {})
    if not params.get("torch_adam", False):
        params.pop("fused", None)  # only torch's AdamW takes it; DeepSpeed's own optimizers would refuse it
    return ds


def _fill_auto(node: dict[str, Any], values: dict[str, Any], prefix: str, path: Path) -> None:
    for key, val in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(val, dict):
            _fill_auto(val, values, dotted + ".", path)
        elif val == "auto":
            if dotted not in values:
                raise ConfigError(f'{path}: {dotted} is "auto", but distsft has no value for it; set it explicitly')
            node[key] = values[dotted]


# What avoids each DeepSpeed op that distsft may make DeepSpeed compile.
OP_REMEDIES = {
    "fused_adam": 'leave "torch_adam" at "auto" in the DeepSpeed config (torch\'s fused AdamW, nothing to compile)',
    "cpu_adam": "CPU offload needs it: install a CUDA toolkit (nvcc) matching torch, or use a stage without offload",
}


def op_build_failure(error: BaseException) -> str | None:
    """One line for a DeepSpeed op that failed to build: which op, why, and the setting that avoids it;
    None when ``error`` did not come from DeepSpeed's op builder."""
    tb, name = error.__traceback__, None
    while tb is not None:
        if "op_builder" in tb.tb_frame.f_code.co_filename:
            builder = tb.tb_frame.f_locals.get("self")
            name = getattr(builder, "NAME", name)
        tb = tb.tb_next
    if name is None:
        return None
    why = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if any(c.isalpha() for c in arch.replace("PTX", "").replace("+", "")):
        why += (
            f" (TORCH_CUDA_ARCH_LIST={arch}: DeepSpeed's op builder cannot parse suffixed archs such as 9.0a; set 9.0)"
        )
    remedy = OP_REMEDIES.get(name, "see DeepSpeed's ds_report for what it needs")
    return f"DeepSpeed could not build its {name} op ({type(error).__name__}: {why}); {remedy}"


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float, shape: str = "cosine"):
    """Linear warmup to the peak, then ``shape``: cosine or linear decay to ``min_ratio`` of it at the last
    step, or constant."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if shape == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps - 1)
        progress = min(1.0, (step - warmup_steps) / span)
        left = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * left

    return f


def warmup_steps(cfg: Config, total_steps: int) -> int:
    """``train.warmup_steps``, or ``train.warmup_ratio`` of the run's steps (rounded up, as Hugging Face does)."""
    return cfg.train.warmup_steps or math.ceil(total_steps * cfg.train.warmup_ratio)


def build_engine(
    cfg: Config, ds: DeepSpeedPlan, ds_config: dict[str, Any], build_model: Callable[[], Any], total_steps: int
) -> tuple[Any, Any]:
    """``build_model()`` runs while ``HfDeepSpeedConfig`` is alive, so ZeRO-3 builds a partitioned model;
    the caller keeps the returned config referenced for as long as the engine lives (transformers asks it
    whether ZeRO-3 is on, through a weak reference)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay referenced while the model is built
    model = build_model()
    if ds.stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        from distsft.model.traits import expert_blocks

        blocks = expert_blocks(model)
        if blocks:  # fetched whole, so ranks whose tokens chose different experts still run the same gathers
            set_z3_leaf_modules(model, blocks)
    schedule = lr_lambda(total_steps, warmup_steps(cfg, total_steps), cfg.train.min_lr_ratio, cfg.train.lr_scheduler)
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
    except Exception as e:
        failed = op_build_failure(e)
        if failed is None:
            raise
        raise ConfigError(failed) from None
    if cfg.train.compile:
        # DeepSpeed's own entry point: it compiles the wrapped module so ZeRO's hooks stay outside the graph.
        engine.compile(compile_kwargs={"dynamic": True})
    return engine, hf_ds
