"""The names a team moving from Hugging Face ``TrainingArguments``, TRL, axolotl, LLaMA-Factory or peft
already types, in one table: each is read as ours, with one notice naming ours, or refused with a line
saying what to write instead where its meaning has no equal here.

A name is taken for an alias only where it is not one of our keys (``micro_batch_size`` is ours under
``train``; at the top level, as axolotl writes it, it is read as ``train.micro_batch_size``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Alias:
    ours: str
    """The dotted key it is read as; ``train.adam_betas[1]`` sets one item of a pair."""
    origin: str
    convert: Callable[[Any], Any] | None = None
    """Their value to ours (a value ``convert`` maps to ``None`` sets nothing: ``bf16: false``)."""
    note: str = ""
    """What differs from their meaning, said in the notice."""


def _flag(value_if_true: str) -> Callable[[Any], Any]:
    return lambda v: value_if_true if v is True else None if v is False else v


HF, TRL, AXOLOTL, FACTORY, PEFT = "TrainingArguments", "TRL", "axolotl", "LLaMA-Factory", "peft"
DECAY = "it decays to lr x train.min_lr_ratio, 0.1 unless set; theirs to 0"
ROWS = "a row is a packed sequence of up to data.max_seq_len tokens, several examples each"

ALIASES: dict[str, Alias] = {
    "learning_rate": Alias("train.lr", HF),
    "num_train_epochs": Alias("train.epochs", HF),
    "num_epochs": Alias("train.epochs", AXOLOTL),
    "max_steps": Alias("train.max_steps", HF),
    "per_device_train_batch_size": Alias("train.micro_batch_size", HF, note=ROWS),
    "micro_batch_size": Alias("train.micro_batch_size", AXOLOTL, note=ROWS),
    "gradient_accumulation_steps": Alias("train.grad_accum_steps", HF),
    "warmup_steps": Alias("train.warmup_steps", HF),
    "warmup_ratio": Alias("train.warmup_ratio", HF),
    "lr_scheduler_type": Alias(
        "train.lr_scheduler",
        HF,
        lambda v: "constant" if v == "constant_with_warmup" else v,
        DECAY,
    ),
    "lr_scheduler": Alias("train.lr_scheduler", AXOLOTL, note=DECAY),
    "weight_decay": Alias("train.weight_decay", HF),
    "adam_beta1": Alias("train.adam_betas[0]", HF),
    "adam_beta2": Alias("train.adam_betas[1]", HF),
    "adam_epsilon": Alias("train.adam_eps", HF),
    "max_grad_norm": Alias("train.max_grad_norm", HF),
    "seed": Alias("train.seed", HF),
    "logging_steps": Alias("train.log_every", HF),
    "eval_steps": Alias("train.eval_every", HF),
    "save_steps": Alias("checkpoint.every_steps", HF),
    "save_total_limit": Alias("checkpoint.keep_last", HF),
    "resume_from_checkpoint": Alias("checkpoint.resume", HF, lambda v: "auto" if v is True else v),
    "deepspeed": Alias("train.zero_stage", HF, note="a DeepSpeed JSON file; or write 0, 1, 2, 3, 3_offload"),
    "model_name_or_path": Alias("model.path", HF),
    "base_model": Alias("model.path", AXOLOTL),
    "tokenizer_name": Alias("model.tokenizer", HF),
    "tokenizer_config": Alias("model.tokenizer", AXOLOTL),
    "trust_remote_code": Alias("model.trust_remote_code", HF),
    "attn_implementation": Alias("model.attn_implementation", HF),
    "gradient_checkpointing": Alias("model.gradient_checkpointing", HF),
    "bf16": Alias("model.dtype", HF, _flag("bfloat16")),
    "fp16": Alias("model.dtype", HF, _flag("float16")),
    "load_in_4bit": Alias("model.quantization", AXOLOTL, _flag("4bit")),
    "load_in_8bit": Alias("model.quantization", AXOLOTL, _flag("8bit")),
    "chat_template": Alias("model.chat_template", TRL),
    "max_length": Alias("data.max_seq_len", TRL),
    "max_seq_length": Alias("data.max_seq_len", TRL),
    "sequence_len": Alias("data.max_seq_len", AXOLOTL),
    "cutoff_len": Alias("data.max_seq_len", FACTORY),
    "packing": Alias("data.packing", TRL),
    "sample_packing": Alias("data.packing", AXOLOTL),
    "assistant_only_loss": Alias("data.train_on", TRL, lambda v: {True: "assistant", False: "all"}.get(v, v)),
    "train_on_inputs": Alias("data.train_on", AXOLOTL, lambda v: {True: "all", False: "assistant"}.get(v, v)),
    "val_set_size": Alias("data.eval_fraction", AXOLOTL, note="a share of the examples, below 1"),
    "lora_r": Alias("lora.r", AXOLOTL),
    "lora_rank": Alias("lora.r", FACTORY),
    "lora_alpha": Alias("lora.alpha", PEFT, note="default here 2 x r (peft's: 8)"),
    "lora_dropout": Alias("lora.dropout", PEFT),
    "lora_target_modules": Alias("lora.target_modules", AXOLOTL),
    "lora_target": Alias("lora.target_modules", FACTORY),
    "wandb_project": Alias("logging.wandb_project", AXOLOTL),
    "wandb_entity": Alias("logging.wandb_entity", AXOLOTL),
}
"""Their name -> ours."""

ADAMW = "distsft trains with AdamW (torch's, fused on GPUs): train.adam_betas, train.adam_eps, train.weight_decay"
INSTEAD: dict[str, str] = {
    "optim": ADAMW,
    "optimizer": ADAMW,
    "eval_strategy": "evaluation runs every train.eval_every steps (0: never)",
    "evaluation_strategy": "evaluation runs every train.eval_every steps (0: never)",
    "save_strategy": "checkpoints are saved every checkpoint.every_steps steps (0: at the end)",
    "logging_strategy": "metrics are logged every train.log_every steps",
    "per_device_eval_batch_size": "evaluation uses train.micro_batch_size",
    "report_to": "logging.tensorboard, logging.wandb_project, logging.mlflow_experiment",
    "dataset_text_field": "data.format: text reads each row's 'text' field; other formats are named in data.format",
    "datasets": "data.path: a file, a directory or a list of {path, format, split, weight} entries",
    "dataset": "data.path: a file, a directory or a list of {path, format, split, weight} entries",
    "adapter": "LoRA is on when lora.r > 0; QLoRA adds model.quantization: 4bit",
    "use_peft": "LoRA is on when lora.r > 0",
    "torch_compile": "train.compile",
    "neftune_noise_alpha": "not offered",
}
"""Their names with no one-to-one equal here: what to write instead."""


@dataclass
class Renamed:
    """What ``apply`` did: notices to show, and problems that stop the load (as ``where: text`` lines)."""

    notices: list[str]
    problems: list[str]


def apply(
    raw: dict[str, Any], ours: dict[str, set[str]], where: Callable[[str], str], lines: dict[str, int | None]
) -> Renamed:
    """Rename their keys in ``raw`` (a config mapping; ``ours`` gives the keys of each section, "" for the
    top level) in place. ``where(dotted)`` says ``file:line`` of a key."""
    from distsft.config.schema import TrainConfig

    done, set_here = Renamed([], []), set()
    sections = [("", raw)] + [(f"{k}.", v) for k, v in raw.items() if k and k in ours and isinstance(v, dict)]
    for prefix, mapping in sections:
        known = ours.get(prefix.rstrip("."), set())
        for key in [k for k in mapping if k not in known]:
            dotted = f"{prefix}{key}"
            if key in INSTEAD:
                done.problems.append(f"{where(dotted)}: {dotted} has no equal in distsft: {INSTEAD[key]}")
                mapping.pop(key)  # said here, not again as an unknown key
                continue
            alias = ALIASES.get(key)
            if alias is None:
                continue
            value = mapping.pop(key)
            converted = alias.convert(value) if alias.convert else value
            note = f" ({alias.note})" if alias.note else ""
            if converted is None:
                done.notices.append(f"{where(dotted)}: {dotted} ({alias.origin}) = {value!r}: nothing to set{note}")
                continue
            target, index = alias.ours, None
            if target.endswith("]"):  # one item of a pair: train.adam_betas[1]
                target, index = target[:-3], int(target[-2])
            if get_dotted(raw, target) is not None and target not in set_here:
                done.problems.append(
                    f"{where(dotted)}: {dotted} ({alias.origin}'s name for {target}) and {target} are both set"
                )
                continue
            if index is not None:
                pair = list(get_dotted(raw, target) or TrainConfig().adam_betas)
                pair[index] = converted
                converted = pair
            set_dotted(raw, target, converted)
            set_here.add(target)
            lines.setdefault(target, lines.get(dotted))
            done.notices.append(f"{where(dotted)}: {dotted} ({alias.origin}) read as {alias.ours}{note}")
    return done


def get_dotted(raw: dict[str, Any], dotted: str) -> Any:
    d: Any = raw
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    d = raw
    for p in parts[:-1]:
        nxt = d.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            d[p] = nxt
        d = nxt
    d[parts[-1]] = value
