"""The run configuration's schema: frozen dataclasses, one per section, each field's range check beside it
(``checked``), and the checks of keys that are valid alone but not together (``combination_problems``).

Reading YAML into these classes, with file:line errors, is ``distsft/config/loader.py``'s job.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distsft.errors import ConfigError

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
DEMO_CONFIG = DEMO_DIR / "config.yaml"


Check = tuple[typing.Callable[[Any], bool], str]
"""A field's range check: (predicate on the coerced value, what is allowed, for the error)."""


def checked(default: Any, predicate: typing.Callable[[Any], bool], allowed: str) -> Any:
    """A dataclass field whose value must satisfy ``predicate``, checked when a config is loaded."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"check": (predicate, allowed)})
    return field(default=default, metadata={"check": (predicate, allowed)})


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
    """Run Python code shipped with a hub model or directory (its ``auto_map``): needed for a model whose class
    transformers does not have; that code runs with your permissions."""
    gradient_checkpointing: bool = False
    """Activation checkpointing: keep each layer's input and recompute the rest in the backward pass (non-reentrant, so
    the packing mask passes through): less memory for one more forward pass per step. Off by default, as in Hugging
    Face's TrainingArguments; TRL's SFTConfig turns it on by default."""
    revision: str | None = None
    """A branch, tag or commit of a hub ``path`` (and ``tokenizer``); checked before the run starts, so a missing
    revision fails in seconds. ``null``: the default branch."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Hold the frozen base in 4 bits (NF4, double quantisation: QLoRA) or 8 bits; needs ``lora.r > 0``."""
    tiled_mlp: bool = False
    """Run each layer's MLP over tiles of ``hidden_size`` tokens, recomputed in the backward pass (DeepSpeed
    ALST's TiledMLP): the MLP's intermediate activations exist for one tile at a time, not the whole row,
    which is what bounds the activation peak of long sequences. Costs one extra MLP forward per layer."""
    chat_template: str | None = None
    """The chat template to train with (and to save into the exported tokenizer): a Jinja file, or the
    template itself inline. Default: the tokenizer's own. A template with ``{% generation %}`` markers is
    masked by exactly those markers."""
    config_path: str | None = None
    """A ``config.json`` of the architecture for ``--dry-run`` planning when the driver cannot read
    ``model.path`` (weights only on the nodes, or no hub access); training always uses ``model.path``."""


@dataclass(frozen=True)
class DataSource:
    """One entry of ``data.path`` when it needs its own format: ``{path: x.jsonl, format: alpaca}``."""

    path: str
    """What this entry reads: a file, a directory, a dataset saved with ``save_to_disk``, a hub dataset
    ``hf://owner/name`` or ``demo``, as for ``data.path``."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = "auto"
    """This entry's row format, instead of ``data.format``; ``auto`` recognises each row by its keys."""
    split: str = "train"
    """For hub datasets and saved ``DatasetDict`` directories: which split to read."""
    weight: float | None = checked(None, lambda v: v is None or v > 0, "a number > 0 (a share of tokens)")
    """This entry's share of the training tokens, against the other entries' weights (all entries then
    need one): a source is sampled down, or repeated, until it holds that share of the mixture, whose
    size is the sources' own total. Deterministic from ``train.seed``."""
    epochs: float | None = checked(None, lambda v: v is None or v > 0, "a number > 0")
    """Use every example this many times (1.5: each once, and half of them, chosen by the seed, twice)."""
    max_examples: int | None = checked(None, lambda v: v is None or v >= 1, "an integer >= 1")
    """Use at most this many of the entry's examples (a seeded choice)."""
    tools: str | None = None
    """A JSON file holding one list of tool schemas for the entry's rows that offer none of their own."""


@dataclass(frozen=True)
class DataConfig:
    path: str | list[str | DataSource] = "demo"
    """A file, a directory, a dataset saved with ``save_to_disk``, a hub dataset ``hf://owner/name``, ``demo``,
    or a list of these (entries may be ``{path, format, split}`` mappings)."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = "auto"
    """The row format of every source that names none: ``messages`` (OpenAI chat), ``sharegpt`` (``conversations`` with
    ``from``/``value``), ``alpaca`` (``instruction``/``input``/``output``), ``prompt_completion``, ``text`` (raw text);
    ``auto`` recognises each row by its keys."""
    max_seq_len: int = checked(1024, lambda v: v >= 8, "an integer >= 8")
    """Tokens per packed row, hence the longest example (longer ones follow ``too_long``); it may not exceed the model's
    ``max_position_embeddings``. The same 1024 as TRL's ``max_length``."""
    packing: bool = True
    """Pack several examples into each row (best-fit decreasing), with position ids restarting at every example and
    attention kept inside it, so a packed step's loss and gradients equal the unpacked step's. On by default, unlike TRL
    (``packing=False``). Models with recurrent layers must train with ``false``."""
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """Which tokens carry labels: every assistant turn, only the last one, or the whole conversation."""
    template: Literal["chat", "none"] = "chat"
    """``none``: string ``prompt``/``completion`` rows are raw text (``prompt + completion``, the completion
    and an EOS learnt), as TRL treats them, instead of a user and an assistant turn of the chat template.
    ``text`` rows are always raw."""
    response_marker: str | None = None
    """``text`` rows: learn only what follows the first occurrence of this string (TRL's response template);
    by default every token of a ``text`` row is learnt."""
    train_on_reasoning: bool = True
    """Learn an assistant turn's reasoning (``reasoning_content``, rendered by the template as a thinking
    block) with its answer; ``false`` keeps it in the sequence as context only."""
    too_long: Literal["drop", "truncate"] = "drop"
    """An example longer than ``max_seq_len``: ``drop`` it (counted, and reported by ``distsft prepare``), or
    ``truncate`` it to its first ``max_seq_len`` tokens (dropped if nothing learnt is left). TRL truncates by default;
    here nothing is cut unless asked."""
    on_error: Literal["fail", "skip"] = "fail"
    """A bad row (invalid JSON, no assistant turn, a role the template refuses, ...): ``fail`` reports every one as
    ``file:line: reason`` and trains nothing; ``skip`` writes them with their reasons to ``output_dir/rejected.jsonl``
    and goes on."""
    eval_path: str | list[str | DataSource] | None = None
    """Held-out data for ``eval_loss``, in the same forms as ``path``; when set, ``eval_fraction`` is not used."""
    evals: dict[str, str | list[str | DataSource]] = field(default_factory=dict)
    """Named held-out sets, ``{name: path or list of sources}`` (the forms of ``path``), each evaluated beside
    ``eval_path`` / ``eval_fraction`` and logged as ``eval_loss/<name>``, so one run says how it does on several
    kinds of data. ``eval_loss`` stays the loss of the default set (``eval_path`` or the ``eval_fraction``
    hold-out), or, without one, of the first named set. Each set is prepared and cached on its own."""
    eval_fraction: float = checked(0.0, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
    """Share of the training examples held out for ``eval_loss`` (a seeded choice) when there is no ``eval_path``; 0: no
    evaluation."""
    num_proc: int = checked(1, lambda v: v >= 1, "an integer >= 1")
    """Processes that prepare the data with the ``local`` engine."""
    engine: Literal["auto", "local", "ray"] = "auto"
    """Where the data is prepared: ``local`` (this machine, ``num_proc`` processes) or ``ray`` (Ray Data over
    every node's CPUs; JSONL, Parquet and saved datasets). ``auto``: ``ray`` for a Ray launch on several nodes or
    over ``RAY_DATA_BYTES`` of data, else ``local``. Both give the same rows."""
    cache_dir: str | None = None
    """Where prepared data is cached; defaults to ``~/.cache/distsft``. With several nodes and the ``ray``
    engine (or workers reading the rows from it), a directory every node sees."""


@dataclass(frozen=True)
class SamplesConfig:
    """``train.samples``: greedy replies written at eval steps (``train.eval_every`` and the last step)."""

    count: int = checked(2, lambda v: v >= 0, "an integer >= 0 (0: off)")
    """Prompts answered at each eval; 0 turns samples off. 2 by default: enough to see what the model says,
    and cheap (each reply is up to ``max_new_tokens`` forward passes of the model on every worker)."""
    path: str | None = None
    """A JSONL file of prompts: ``{"prompt": "..."}`` or ``{"messages": [...]}`` (chat messages; a trailing
    assistant turn is dropped). Default: the first ``count`` conversations of the eval data, up to their last
    assistant turn."""
    max_new_tokens: int = checked(64, lambda v: v >= 1, "an integer >= 1")
    """The longest reply, in tokens; a reply also ends at the chat template's end-of-turn token or EOS."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = checked(-1, lambda v: v == -1 or v >= 1, "-1 (use epochs) or an integer >= 1")
    """Optimizer steps to run; -1 means ``epochs`` full passes over the data."""
    epochs: float = checked(1.0, lambda v: v > 0, "a number > 0")
    """Passes over the data when ``max_steps`` is -1; a fraction runs part of a pass. 1, where Hugging Face's
    TrainingArguments and TRL default to 3."""
    micro_batch_size: int = checked(1, lambda v: v >= 1, "an integer >= 1")
    """Rows per worker per forward pass (a row is one packed sequence of up to ``max_seq_len`` tokens)."""
    grad_accum_steps: int = checked(1, lambda v: v >= 1, "an integer >= 1")
    """Micro-batches per worker per optimizer step. With ``global_batch_size`` set it is derived from the worker count:
    leave it at 1."""
    global_batch_size: int | None = checked(None, lambda v: v is None or v >= 1, "an integer >= 1, or null")
    """Rows per optimizer step whatever the worker count: gradient accumulation is derived from the workers
    present (``global_batch_size / (micro_batch_size x data-parallel workers)``), so a run resumed or
    restarted on another number of workers goes on as the same run. ``null``: ``micro_batch_size x
    grad_accum_steps x data-parallel workers``."""
    lr: float = checked(2e-5, lambda v: v > 0, "a number > 0")
    """Peak AdamW learning rate, reached after the warmup, then ``lr_scheduler``'s decay (cosine by default) to
    ``lr * min_lr_ratio`` (0.1 x lr by default, where Hugging Face's default schedule decays linearly to 0).
    The same 2e-5 as TRL's SFTConfig (Hugging Face's TrainingArguments: 5e-5)."""
    min_lr_ratio: float = checked(0.1, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
    """The cosine and linear schedules decay to ``lr * min_lr_ratio``; 0 gives Hugging Face's (to 0)."""
    warmup_steps: int = checked(0, lambda v: v >= 0, "an integer >= 0")
    """Steps of linear warmup from ``lr / warmup_steps`` to ``lr``, before the decay; 0: start at ``lr``."""
    warmup_ratio: float = checked(0.0, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
    """Warmup as a share of the run's optimizer steps (``ceil(steps x ratio)``, as Hugging Face's
    ``warmup_ratio``); set it or ``warmup_steps``, not both."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """After the warmup: ``cosine`` or ``linear`` decay to ``lr x min_lr_ratio`` at the last step, or
    ``constant``. Hugging Face's cosine and linear decay to 0: set ``min_lr_ratio: 0`` for theirs. Its
    ``constant`` skips warmup and ``constant_with_warmup`` does not; here ``constant`` warms up when a
    warmup is set."""
    weight_decay: float = checked(0.0, lambda v: v >= 0, "a number >= 0")
    """AdamW's decoupled weight decay, applied to every trainable parameter, biases and norm weights included (Hugging
    Face's Trainer exempts those); 0, as there."""
    adam_betas: tuple[float, float] = checked(
        (0.9, 0.95), lambda v: all(0.0 <= b < 1.0 for b in v), "two numbers in [0, 1)"
    )
    """AdamW's (beta1, beta2). The default beta2 0.95 (what Llama was trained with) differs from Hugging
    Face's and TRL's (0.9, 0.999)."""
    adam_eps: float = checked(1e-8, lambda v: v > 0, "a number > 0")
    """AdamW's epsilon (Hugging Face's ``adam_epsilon``, the same default)."""
    max_grad_norm: float = checked(1.0, lambda v: v >= 0, "a number >= 0 (0 disables clipping)")
    """Clip the global gradient norm to this; 0: no clipping (the norm is still measured and logged as ``grad_norm``).
    The same 1.0 as Hugging Face's TrainingArguments."""
    seed: int = 42
    """Seeds the data order, the eval hold-out, a weighted mixture's sampling, the LoRA adapters' initialisation and the
    demo model's weights; the same rows and starting point on any worker count."""
    zero_stage: int | str = checked(
        2,
        lambda v: v in (0, 1, 2, 3, "3_offload") or (isinstance(v, str) and v.endswith(".json")),
        "0, 1, 2, 3, 3_offload, or a path to a DeepSpeed .json config",
    )
    """0, 1, 2, 3, ``3_offload``, or a path to a DeepSpeed JSON config (``"auto"`` values are filled in)."""
    eval_every: int = checked(0, lambda v: v >= 0, "an integer >= 0")
    """Compute ``eval_loss`` every N optimizer steps; 0: only at the last step. Either way only when there is held-out
    data (``data.eval_path``, ``data.eval_fraction`` or ``data.evals``)."""
    log_every: int = checked(1, lambda v: v >= 1, "an integer >= 1")
    """Read the steps' figures from the device (one host sync) and print a plain progress line every N steps;
    ``metrics.jsonl`` still gets every step. 1, where Hugging Face's ``logging_steps`` is 500 and TRL's 10."""
    router_aux_loss_coef: float | None = checked(
        None, lambda v: v is None or v >= 0, "a number >= 0, or null for the model's own"
    )
    """Mixture-of-experts models: weight of the router's load-balancing loss, added to the language-model
    loss for training only (logged as ``aux_loss``, never part of ``loss`` or ``eval_loss``). ``null``: the
    model config's own value; 0 turns it off."""
    cross_entropy: Literal["auto", "fused", "chunked", "plain"] = "auto"
    """How the loss meets the output layer (``distsft/loss.py``): ``fused`` never materialises the logits
    of a batch (ZeRO 0-2), ``chunked`` upcasts them chunk by chunk; ``auto``: fused where it applies."""
    sequence_parallel: int = checked(1, lambda v: v >= 1, "an integer >= 1 (1: off)")
    """Workers that share one sequence (Ulysses sequence parallelism, ``distsft/sequence_parallel.py``):
    each holds ``1/sequence_parallel`` of every row's tokens, and attention exchanges heads for tokens
    across the group. Workers = data-parallel groups x this; 1 is off."""
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    """Greedy replies to a few prompts at every eval (``samples.jsonl``, TensorBoard, W&B, MLflow, the console):
    what the model says, beside what its loss says."""
    compile: bool = False
    """``torch.compile`` the model through DeepSpeed (``engine.compile``); packed rows vary in width, so the
    graph is compiled with dynamic shapes. Measure before turning it on: see benchmarks/throughput.py."""


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (peft) on a frozen base; ``r: 0`` is full fine-tuning."""

    r: int = checked(0, lambda v: v >= 0, "an integer >= 0 (0: full fine-tuning)")
    """Adapter rank; 0 (the default) is full fine-tuning, with no adapters: LoRA is on only when ``r`` is set. peft's
    ``LoraConfig`` defaults to r 8 and alpha 8 (scale 1); here ``alpha`` defaults to ``2 * r`` (scale 2)."""
    alpha: float | None = checked(None, lambda v: v is None or v > 0, "a number > 0, or null for 2 * r")
    """Scale ``alpha / r`` of the adapters' output; default ``2 * r``."""
    dropout: float = checked(0.0, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
    """Dropout on the adapters' input (peft's ``lora_dropout``); 0, as in peft."""
    target_modules: str | list[str] = "all-linear"
    """``all-linear`` (every linear layer but the output layer) or a list of module names (``q_proj``, ...)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Whole modules trained and saved with the adapter, e.g. ``[embed_tokens, lm_head]`` after adding tokens."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = checked(0, lambda v: v >= 0, "an integer >= 0")
    """Save every N optimizer steps; 0 saves only at the end (and on SIGTERM/SIGINT)."""
    keep_last: int = checked(2, lambda v: v >= 1, "an integer >= 1")
    """Complete checkpoints kept; an older one is deleted only after a newer one is complete. Hugging Face's Trainer
    keeps every checkpoint by default (``save_total_limit=None``)."""
    resume: str = "auto"
    """``auto``: continue from the latest complete checkpoint if there is one; ``never``; or a path to a
    checkpoint (``.../checkpoints/step-00000100``) or a run directory, which must exist and be complete."""
    allow_changes: bool = False
    """Resume even when the config differs from the checkpoint's in ways that change the continuation."""
    final: bool = True
    """Save a checkpoint at the end and export it to ``output_dir/final``; ``false`` for throughput
    measurements and sweeps that keep nothing (checkpoints every ``every_steps`` are still saved)."""
    verify_export: bool = True
    """After the final export, load it as a server would and compare its logits with the checkpoint's
    (``distsft verify --export``); broken weights or logits fail the launch. ``false`` skips it."""
    best_by: str | None = None
    """Keep the checkpoint with the lowest loss on this eval set (``eval_loss``, or a name of ``data.evals``)
    beyond ``keep_last``; ``distsft export RUN_DIR --best`` exports it. An eval that sets a new best saves a
    checkpoint at that step, so the best step always has one. ``null``: no best is kept."""
    authenticate: bool = True
    """Sign every manifest with a key only you hold (``$DISTSFT_CHECKPOINT_KEY``, else
    ``~/.config/distsft/checkpoint.key``, made at first use) and use no checkpoint it did not sign: one
    rewritten by someone who can write to the storage is refused. ``false`` neither signs nor checks."""


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
    """The Weights & Biases team or user to log under (default: your W&B default entity); used with
    ``wandb_project``."""
    mlflow_experiment: str | None = None
    """Log to MLflow under this experiment (needs ``pip install mlflow``)."""
    mlflow_tracking_uri: str | None = None
    """Default: ``$MLFLOW_TRACKING_URI``, else MLflow's local ``./mlruns``."""
    peak_tflops: float | None = checked(None, lambda v: v is None or v > 0, "a number > 0 (TFLOP/s of one device)")
    """Peak dense TFLOP/s of one device for MFU; default from the GPU's name (A100 312, H100 989, ...).
    Unknown devices (and CPUs) report no MFU unless this is set."""
    plot: bool = True
    """Draw ``output_dir/loss.png`` (train and eval loss) at the end."""
    profile_steps: tuple[int, int] | None = checked(
        None, lambda v: v is None or 1 <= v[0] <= v[1], "[first, last] steps, 1 <= first <= last"
    )
    """``[first, last]``: profile these optimizer steps on rank 0 with torch.profiler (CPU and GPU): a
    Chrome trace and a table of where the time went in ``output_dir/profile/``."""


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/demo"
    """The run's directory: ``config.yaml`` (the resolved config), ``metrics.jsonl``, ``summary.json``, ``loss.png``,
    ``logs/``, ``checkpoints/`` (unless the cluster file's ``storage_path`` holds them) and ``final/``, the exported
    model. One launch at a time: a second one into a busy directory is refused. A config file that does not set
    it gets ``runs/<the file's name>`` (``configs/qwen3-8b.yaml``: ``runs/qwen3-8b``), never the demo's."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """What to fine-tune: the model and tokenizer, chat template, precision, attention, quantisation and memory
    savers."""
    data: DataConfig = field(default_factory=DataConfig)
    """What to train on: sources and their formats, what is learnt (masking), packing, length and error policies,
    held-out data, and where the data is prepared and cached."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """How to train: length, batch, optimizer and schedule, ZeRO stage, evaluation and logging cadence, loss kernel,
    sequence parallelism."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (LoRA, and QLoRA with ``model.quantization``); off while ``lora.r`` is 0."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When checkpoints are saved and kept, how a run resumes, and whether checkpoints are signed."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """What the driver shows and writes beyond ``metrics.jsonl``: progress, TensorBoard, W&B, MLflow, MFU's peak, the
    loss plot, profiling."""

    def batch_plan(self, world_size: int) -> BatchPlan:
        t = self.train
        accum = t.grad_accum_steps
        if t.global_batch_size is not None:
            dp = max(1, world_size // t.sequence_parallel)
            per = t.micro_batch_size * dp
            if t.global_batch_size % per:
                raise ConfigError(
                    f"train.global_batch_size = {t.global_batch_size} is not a multiple of micro_batch_size "
                    f"{t.micro_batch_size} x {dp} data-parallel worker(s) = {per}: choose a multiple of {per}, "
                    "or another worker count"
                )
            accum = t.global_batch_size // per
        return BatchPlan(t.micro_batch_size, accum, world_size, t.sequence_parallel)

    def fits_workers(self, world_size: int) -> bool:
        """Whether this many workers can run the configured batch (elastic restarts pick such a count)."""
        try:
            self.batch_plan(world_size)
        except ConfigError:
            return False
        return True

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


def combination_problems(cfg: Config) -> list[tuple[str, str]]:
    """Keys that are valid alone but not together, every one of them: (the key to name, what is wrong)."""
    problems: list[tuple[str, str]] = []
    q, stage = cfg.model.quantization, cfg.train.zero_stage
    if q != "none" and cfg.lora.r == 0:
        problems.append(
            ("model.quantization", f"{q} quantises a base that LoRA adapters train on: set lora.r > 0 (QLoRA)")
        )
    if q == "8bit" and stage in (3, "3_offload"):
        problems.append(
            ("model.quantization", "8-bit weights cannot be sharded by ZeRO-3: use 4bit, or zero_stage 1 or 2")
        )
    if q != "none" and stage == "3_offload":
        problems.append(
            ("model.quantization", "quantised weights cannot be offloaded to CPU: use zero_stage 3 without offload")
        )
    if cfg.train.warmup_ratio and cfg.train.warmup_steps:
        problems.append(("train.warmup_ratio", "set together with train.warmup_steps: say the warmup one way"))
    if cfg.train.global_batch_size is not None and cfg.train.grad_accum_steps != 1:
        problems.append(
            (
                "train.grad_accum_steps",
                "is derived from train.global_batch_size (rows per step / (micro_batch_size x workers)): leave "
                "it at 1, or unset global_batch_size",
            )
        )
    sp = cfg.train.sequence_parallel
    if sp > 1 and cfg.data.max_seq_len % sp:
        problems.append(
            (
                "train.sequence_parallel",
                f"{sp} does not divide data.max_seq_len = {cfg.data.max_seq_len}: each worker holds an equal slice "
                "of a row",
            )
        )
    if sp > 1 and cfg.train.compile:
        problems.append(("train.sequence_parallel", "does not combine with train.compile yet: set train.compile=false"))
    if cfg.lora.modules_to_save and cfg.lora.r == 0:
        problems.append(("lora.modules_to_save", "only means something with adapters: set lora.r > 0"))
    problems += mixture_problems(cfg.data.path)
    problems += eval_problems(cfg)
    for entry in cfg.data.path if isinstance(cfg.data.path, list) else []:
        if isinstance(entry, DataSource) and entry.tools and not Path(entry.tools).expanduser().is_file():
            problems.append(("data.path", f"{entry.path}: tools {entry.tools}: no such file"))
    why = ds_config_problem(stage)
    if why:
        problems.append(("train.zero_stage", why))
    template = cfg.model.chat_template
    if template is not None and not is_inline_template(template) and not Path(template).expanduser().is_file():
        problems.append(
            ("model.chat_template", f"{template}: no such file (give a Jinja file, or the template inline)")
        )
    return problems


def eval_problems(cfg: Config) -> list[tuple[str, str]]:
    """Named eval sets need names that read as a metric's suffix; ``checkpoint.best_by`` names an eval
    that runs; a samples file exists."""
    problems = []
    for name in cfg.data.evals:
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            problems.append(("data.evals", f"{name!r}: a name of letters, digits, '-', '_' or '.' (it names a metric)"))
    path = cfg.train.samples.path
    if path and not Path(path).expanduser().is_file():
        problems.append(("train.samples.path", f"{path}: no such file (a JSONL file of prompts)"))
    by = cfg.checkpoint.best_by
    has_default = cfg.data.eval_path is not None or cfg.data.eval_fraction > 0
    if by == "eval_loss" and not (has_default or cfg.data.evals):
        problems.append(("checkpoint.best_by", "eval_loss needs held-out data: data.eval_path, eval_fraction or evals"))
    elif by is not None and by != "eval_loss" and by not in cfg.data.evals:
        names = ", ".join(["eval_loss", *cfg.data.evals])
        problems.append(("checkpoint.best_by", f"{by!r} is not an eval of this run; one of: {names}"))
    return problems


def is_inline_template(text: str) -> bool:
    """``model.chat_template`` holds Jinja itself (rather than naming a file)."""
    return "{%" in text or "{{" in text


def mixture_problems(path: Any) -> list[tuple[str, str]]:
    """``weight`` is a share against the other entries' weights: every entry needs one, and an entry is
    weighed or counted (``epochs``, ``max_examples``), not both."""
    entries = path if isinstance(path, list) else [path]
    sources = [e for e in entries if isinstance(e, DataSource)]
    problems = []
    if any(e.weight is not None for e in sources) and (
        len(sources) < len(entries) or any(e.weight is None for e in sources)
    ):
        problems.append(("data.path", "weight is a share against the other entries' weights: give every entry one"))
    if any(e.weight is not None and (e.epochs is not None or e.max_examples is not None) for e in sources):
        problems.append(("data.path", "an entry is weighed (weight) or counted (epochs, max_examples), not both"))
    return problems


def ds_config_problem(zero_stage: int | str) -> str:
    """Why a ``train.zero_stage`` path cannot be used ('' when it can, or for a named stage): the file must
    exist and hold a JSON object whose ``zero_optimization.stage`` is 0 to 3."""
    if not isinstance(zero_stage, str) or not zero_stage.endswith(".json"):
        return ""
    import json

    path = Path(zero_stage).expanduser()
    if not path.is_file():
        return f"{zero_stage}: DeepSpeed config file not found"
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return f"{path}:{e.lineno}: invalid JSON: {e.msg}"
    stage = ds.get("zero_optimization", {}).get("stage", 0) if isinstance(ds, dict) else None
    if stage not in (0, 1, 2, 3):
        return f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, not {stage!r}"
    return ""
