"""Typed run configuration: YAML + ``--set`` overrides -> frozen dataclasses, validated once at load.

Every error a user can make in a config file is caught here, before any model, data or process group
exists, and the message names the file, the line (when the key came from a file), the key, and what is
allowed. The rest of the code can then trust its config.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distsft.errors import ConfigError

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_CONFIG = DEMO_DIR / "config.yaml"


def cache_home() -> Path:
    """Where distsft caches prepared data and the demo's initial weights (``$DISTSFT_CACHE``)."""
    return Path(os.environ.get("DISTSFT_CACHE", Path.home() / ".cache" / "distsft")).expanduser()


AttnImplementation = Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"]


@dataclass(frozen=True)
class ModelConfig:
    path: str = "demo"
    """A local Hugging Face model directory, a hub id, or ``demo`` (the bundled tiny Llama, random init)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; defaults to ``path`` (the bundled tokenizer for ``demo``)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bf16 on GPUs that support it, fp32 on CPU."""
    attn_implementation: AttnImplementation = "auto"
    """``auto``: the fastest implementation the model class declares and the device runs (flash-attention
    on GPU when installed, then sdpa, flex_attention, eager); see ``distsft/traits.py``."""
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    revision: str | None = None
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Hold the frozen base in 4 bits (NF4, double quantisation: QLoRA) or 8 bits; needs ``lora.r > 0``."""
    tiled_mlp: bool = False
    """Run each layer's MLP over tiles of ``hidden_size`` tokens, recomputed in the backward pass (DeepSpeed
    ALST's TiledMLP): the MLP's intermediate activations exist for one tile at a time, not the whole row,
    which is what bounds the activation peak of long sequences. Costs one extra MLP forward per layer."""
    config_path: str | None = None
    """A ``config.json`` of the architecture for ``--dry-run`` planning when the driver cannot read
    ``model.path`` (weights only on the nodes, or no hub access); training always uses ``model.path``."""


@dataclass(frozen=True)
class DataSource:
    """One entry of ``data.path`` when it needs its own format: ``{path: x.jsonl, format: alpaca}``."""

    path: str
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = "auto"
    split: str = "train"
    """For hub datasets and saved ``DatasetDict`` directories: which split to read."""


@dataclass(frozen=True)
class DataConfig:
    path: str | list[str | DataSource] = "demo"
    """A file, a directory, a dataset saved with ``save_to_disk``, a hub dataset id, ``demo``, or a list of
    these (entries may be ``{path, format, split}`` mappings)."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = "auto"
    max_seq_len: int = 1024
    packing: bool = True
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """Which tokens carry labels: every assistant turn, only the last one, or the whole conversation."""
    too_long: Literal["drop", "truncate"] = "drop"
    on_error: Literal["fail", "skip"] = "fail"
    eval_path: str | list[str | DataSource] | None = None
    eval_fraction: float = 0.0
    num_proc: int = 1
    """Processes that prepare the data with the ``local`` engine."""
    engine: Literal["auto", "local", "ray"] = "auto"
    """Where the data is prepared: ``local`` (this machine, ``num_proc`` processes) or ``ray`` (Ray Data over
    every node's CPUs; JSONL, Parquet and saved datasets). ``auto``: ``ray`` for a Ray launch on several nodes or
    over ``RAY_ENGINE_BYTES`` of data, else ``local``. Both give the same rows."""
    cache_dir: str | None = None
    """Where prepared data is cached; defaults to ``~/.cache/distsft``. With several nodes and the ``ray``
    engine (or workers reading the rows from it), a directory every node sees."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = -1
    """Optimizer steps to run; -1 means ``epochs`` full passes over the data."""
    epochs: float = 1.0
    micro_batch_size: int = 1
    """Rows per worker per forward pass (a row is one packed sequence of up to ``max_seq_len`` tokens)."""
    grad_accum_steps: int = 1
    lr: float = 2e-5
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to ``lr * min_lr_ratio``."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    seed: int = 42
    zero_stage: int | str = 2
    """0, 1, 2, 3, ``3_offload``, or a path to a DeepSpeed JSON config (``"auto"`` values are filled in)."""
    eval_every: int = 0
    log_every: int = 1
    router_aux_loss_coef: float | None = None
    """Mixture-of-experts models: weight of the router's load-balancing loss, added to the language-model
    loss for training only (logged as ``aux_loss``, never part of ``loss`` or ``eval_loss``). ``null``: the
    model config's own value; 0 turns it off."""
    cross_entropy: Literal["auto", "fused", "chunked", "plain"] = "auto"
    """How the loss meets the output layer (``distsft/loss.py``): ``fused`` never materialises the logits
    of a batch (ZeRO 0-2), ``chunked`` upcasts them chunk by chunk; ``auto``: fused where it applies."""
    sequence_parallel: int = 1
    """Workers that share one sequence (Ulysses sequence parallelism, ``distsft/sequence_parallel.py``):
    each holds ``1/sequence_parallel`` of every row's tokens, and attention exchanges heads for tokens
    across the group. Workers = data-parallel groups x this; 1 is off."""
    compile: bool = False
    """``torch.compile`` the model through DeepSpeed (``engine.compile``); packed rows vary in width, so the
    graph is compiled with dynamic shapes. Measure before turning it on: see benchmarks/throughput.py."""


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (peft) on a frozen base; ``r: 0`` is full fine-tuning."""

    r: int = 0
    alpha: float | None = None
    """Scale ``alpha / r`` of the adapters' output; default ``2 * r``."""
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    """``all-linear`` (every linear layer but the output layer) or a list of module names (``q_proj``, ...)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Whole modules trained and saved with the adapter, e.g. ``[embed_tokens, lm_head]`` after adding tokens."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps; 0 saves only at the end (and on SIGTERM/SIGINT)."""
    keep_last: int = 2
    resume: str = "auto"
    """``auto``: continue from the latest complete checkpoint if there is one; ``never``; or a path to a
    checkpoint (``.../checkpoints/step-00000100``) or a run directory, which must exist and be complete."""
    allow_changes: bool = False
    """Resume even when the config differs from the checkpoint's in ways that change the continuation."""
    final: bool = True
    """Save a checkpoint at the end and export it to ``output_dir/final``; ``false`` for throughput
    measurements and sweeps that keep nothing (checkpoints every ``every_steps`` are still saved)."""


@dataclass(frozen=True)
class LoggingConfig:
    """What the driver shows and writes while a run goes; ``metrics.jsonl`` is always written."""

    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    """``auto``: a progress bar on a terminal, plain lines (every ``train.log_every`` steps) otherwise."""
    tensorboard: bool = True
    """Event files in ``output_dir`` (``tensorboard --logdir output_dir``)."""
    wandb_project: str | None = None
    """Log to Weights & Biases under this project (needs ``pip install wandb``; the key comes from the
    environment or ``wandb login``, never from this file)."""
    wandb_entity: str | None = None
    mlflow_experiment: str | None = None
    """Log to MLflow under this experiment (needs ``pip install mlflow``)."""
    mlflow_tracking_uri: str | None = None
    """Default: ``$MLFLOW_TRACKING_URI``, else MLflow's local ``./mlruns``."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU; default from the GPU's name (A100 312, H100 989, ...).
    Unknown devices (and CPUs) report no MFU unless this is set."""
    plot: bool = True
    """Draw ``output_dir/loss.png`` (train and eval loss) at the end."""
    profile_steps: tuple[int, int] | None = None
    """``[first, last]``: profile these optimizer steps on rank 0 with torch.profiler (CPU and GPU): a
    Chrome trace and a table of where the time went in ``output_dir/profile/``."""


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def batch_plan(self, world_size: int) -> BatchPlan:
        return BatchPlan(
            self.train.micro_batch_size, self.train.grad_accum_steps, world_size, self.train.sequence_parallel
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"]["adam_betas"] = list(d["train"]["adam_betas"])
        if d["logging"]["profile_steps"] is not None:
            d["logging"]["profile_steps"] = list(d["logging"]["profile_steps"])
        return d


@dataclass(frozen=True)
class BatchPlan:
    """The one place where batch arithmetic lives: global batch = micro batch x grad accumulation x
    data-parallel groups, where workers = data-parallel groups x sequence-parallel size (the workers of one
    sequence-parallel group share every row, each holding a slice of its tokens)."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        if self.world_size % self.sequence_parallel:
            raise ConfigError(
                f"train.sequence_parallel = {self.sequence_parallel} does not divide the {self.world_size} "
                f"worker(s): workers = data-parallel groups x sequence_parallel"
            )

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.sequence_parallel

    def data_rank(self, rank: int) -> int:
        """Which data-parallel group a worker belongs to (a sequence-parallel group is consecutive ranks)."""
        return rank // self.sequence_parallel

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.data_parallel

    @property
    def rows_per_rank(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps


# --- range checks: key -> (predicate, what is allowed) -------------------------------------------------
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "data.max_seq_len": (lambda v: v >= 8, "an integer >= 8"),
    "data.eval_fraction": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "data.num_proc": (lambda v: v >= 1, "an integer >= 1"),
    "train.max_steps": (lambda v: v == -1 or v >= 1, "-1 (use epochs) or an integer >= 1"),
    "train.epochs": (lambda v: v > 0, "a number > 0"),
    "train.micro_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.grad_accum_steps": (lambda v: v >= 1, "an integer >= 1"),
    "train.lr": (lambda v: v > 0, "a number > 0"),
    "train.min_lr_ratio": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "train.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "train.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "train.adam_betas": (lambda v: all(0.0 <= b < 1.0 for b in v), "two numbers in [0, 1)"),
    "train.max_grad_norm": (lambda v: v >= 0, "a number >= 0 (0 disables clipping)"),
    "train.zero_stage": (
        lambda v: v in (0, 1, 2, 3, "3_offload") or (isinstance(v, str) and v.endswith(".json")),
        "0, 1, 2, 3, 3_offload, or a path to a DeepSpeed .json config",
    ),
    "train.eval_every": (lambda v: v >= 0, "an integer >= 0"),
    "train.sequence_parallel": (lambda v: v >= 1, "an integer >= 1 (1: off)"),
    "train.router_aux_loss_coef": (lambda v: v is None or v >= 0, "a number >= 0, or null for the model's own"),
    "train.log_every": (lambda v: v >= 1, "an integer >= 1"),
    "lora.r": (lambda v: v >= 0, "an integer >= 0 (0: full fine-tuning)"),
    "lora.alpha": (lambda v: v is None or v > 0, "a number > 0, or null for 2 * r"),
    "lora.dropout": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "checkpoint.every_steps": (lambda v: v >= 0, "an integer >= 0"),
    "checkpoint.keep_last": (lambda v: v >= 1, "an integer >= 1"),
    "logging.peak_tflops": (lambda v: v is None or v > 0, "a number > 0 (TFLOP/s of one device)"),
    "logging.profile_steps": (lambda v: v is None or 1 <= v[0] <= v[1], "[first, last] steps, 1 <= first <= last"),
}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (the bundled demo config when None), apply ``key=value`` overrides, validate."""
    return load_typed(Config, path if path is not None else DEMO_CONFIG, overrides, combined=_combinations)


def _combinations(cfg: Config) -> tuple[str, str] | None:
    """Keys that are valid alone but not together: (the key to name, what is wrong), checked at load."""
    q, stage = cfg.model.quantization, cfg.train.zero_stage
    if q != "none" and cfg.lora.r == 0:
        return "model.quantization", f"{q} quantises a base that LoRA adapters train on: set lora.r > 0 (QLoRA)"
    if q == "8bit" and stage in (3, "3_offload"):
        return "model.quantization", "8-bit weights cannot be sharded by ZeRO-3: use 4bit, or zero_stage 1 or 2"
    if q != "none" and stage == "3_offload":
        return "model.quantization", "quantised weights cannot be offloaded to CPU: use zero_stage 3 without offload"
    sp = cfg.train.sequence_parallel
    if sp > 1 and cfg.data.max_seq_len % sp:
        return "train.sequence_parallel", (
            f"{sp} does not divide data.max_seq_len = {cfg.data.max_seq_len}: each worker holds an equal slice of a row"
        )
    if sp > 1 and cfg.train.compile:
        return "train.sequence_parallel", "does not combine with train.compile yet: set train.compile=false"
    if cfg.lora.modules_to_save and cfg.lora.r == 0:
        return "lora.modules_to_save", "only means something with adapters: set lora.r > 0"
    return None


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=c`` -> ("a.b", c) with YAML typing, so ``1e-5`` is a float and ``[a, b]`` a list."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set train.lr=1e-5")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: the key is empty")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def build_config(raw: dict[str, Any], source: str = "<dict>", lines: dict[str, int | None] | None = None) -> Config:
    return _build(Config, raw, prefix="", source=source, lines=lines or {})


def load_typed(
    cls: type, path: str | Path, overrides: list[str] | tuple[str, ...] = (), checks=None, combined=None
) -> Any:
    """Load any of our YAML files (run configs, cluster files) into the frozen dataclass ``cls``;
    ``combined(obj)`` names a key whose value does not fit with the others, and why."""
    raw, lines = _read_yaml(Path(path))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
        lines[key] = None
    obj = _build(cls, raw, prefix="", source=str(path), lines=lines, checks=checks)
    problem = combined(obj) if combined else None
    if problem:
        key, why = problem
        raise ConfigError(f"{_where(str(path), lines, key)}: {key}: {why}")
    return obj


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


# --- internals -----------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int | None]]:
    """safe_load the file, and remember the line of every key so errors can point at it."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, train, ...)")
    lines: dict[str, int | None] = {}

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return data, lines


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    d = raw
    for p in parts[:-1]:
        nxt = d.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            d[p] = nxt
        d = nxt
    d[parts[-1]] = value


def _where(source: str, lines: dict[str, int | None], key: str) -> str:
    line = lines.get(key)
    if line is None and key in lines:
        return "--set"
    return f"{source}:{line}" if line else source


def _build(cls: type, raw: Any, prefix: str, source: str, lines: dict[str, int | None], checks=None) -> Any:
    checks = _CHECKS if checks is None else checks
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{_where(source, lines, prefix.rstrip('.'))}: {prefix.rstrip('.')} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            valid = [f"{prefix}{n}" for n in fields]
            near = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]}?" if near else f"; valid keys here: {', '.join(valid)}"
            raise ConfigError(f"{_where(source, lines, dotted)}: unknown key {dotted!r}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, dotted + ".", source, lines, checks)
            continue
        try:
            coerced = _coerce(value, hint)
        except ValueError as e:
            raise ConfigError(f"{_where(source, lines, dotted)}: {dotted} = {value!r} is invalid: {e}") from None
        check = checks.get(dotted)
        if check and not check[0](coerced):
            raise ConfigError(
                f"{_where(source, lines, dotted)}: {dotted} = {value!r} is out of range; allowed: {check[1]}"
            )
        kwargs[key] = coerced
    return cls(**kwargs)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping (" + ", ".join(f.name for f in dataclasses.fields(tp)) + ")"
    if tp is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Check ``value`` against the field's annotation, converting only where no meaning is lost."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"expected {_describe(tp)}{extra}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        specific = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except ValueError as e:
                # Keep the detailed reason of the branch whose shape the value has (a list, a mapping).
                shaped = (isinstance(value, list) and typing.get_origin(arg) is list) or (
                    isinstance(value, dict) and dataclasses.is_dataclass(arg)
                )
                specific = e if shaped else specific
        if specific is not None:
            raise specific
        raise ValueError(f"expected {_describe(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}")
        try:
            return _build(tp, value, prefix="", source="", lines={})
        except ConfigError as e:
            raise ValueError(str(e).lstrip(": ")) from None
        except TypeError:
            missing = [
                f.name
                for f in dataclasses.fields(tp)
                if f.name not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ]
            raise ValueError(f"missing key(s): {', '.join(missing)}") from None
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"expected {_describe(tp)}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, item))
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
        return out
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError("expected a mapping")
        return {_coerce(k, key_tp): _coerce(v, val_tp) for k, v in value.items()}
    if tp is Any:
        return value
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ValueError(f"expected a list of {len(items)} values")
        return tuple(_coerce(v, t) for v, t in zip(value, items, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError("expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError("expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError("expected a string")
    if tp is type(None):
        if value is None:
            return None
        raise ValueError("expected null")
    raise ValueError(f"unsupported type {tp}")
