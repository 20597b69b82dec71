"""LoRA and QLoRA: low-rank adapters trained on a frozen base, the base optionally held in 4 or 8 bits.

peft builds the adapters and bitsandbytes the quantised layers; what is distsft's own is only what they
do not do: one-line errors for targets that match nothing, the adapter's export from ZeRO shards (a
PEFT directory that peft, ``distsft generate`` and ``distsft eval`` load), the merged export, and the
counts the planner and the MFU need. Nothing here knows about ranks: under ZeRO-3 the caller keeps an
``HfDeepSpeedConfig`` alive, so the frozen base is built partitioned and only the adapters are added
whole (DeepSpeed partitions them at ``initialize``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from distsft.config import LoraConfig
from distsft.errors import ConfigError
from distsft.host import publish_dir, scratch_beside

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def bnb_config(quantization: str, dtype: torch.dtype) -> Any:
    """NF4 with double quantisation, computing and storing in the model's dtype (so ZeRO-3 can shard the
    packed weights like any other tensor of that dtype); or 8-bit. None for ``none``."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(
            f"model.quantization = {quantization} needs bitsandbytes: pip install 'distsft[qlora]'"
        ) from None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def peft_config(cfg: LoraConfig, extra_modules: list[str] = (), tied: bool = False) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    modules = list(dict.fromkeys([*cfg.modules_to_save, *extra_modules]))
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.r,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=modules or None,
        ensure_weight_tying=tied and bool(modules),
        task_type="CAUSAL_LM",
        bias="none",
    )


def embedding_modules(model: Any) -> list[str]:
    """The last names of the input and output embedding modules (``embed_tokens``, ``lm_head``; GPT-2's
    ``wte``), what ``modules_to_save`` names to train them whole beside the adapters."""
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if id(m) in wanted))


def apply_lora(model: Any, cfg: LoraConfig, quantized: bool, seed: int, train_embeddings: bool = False) -> Any:
    """The PEFT model: adapters (seeded, so every worker count starts from the same ones) on a frozen base;
    with ``train_embeddings`` (new tokens were added) the embedding and output layers train whole too.
    Activation checkpointing, if any, is enabled afterwards by the caller (non-reentrant, which needs no
    input that requires grad)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:  # the base's norms and other non-quantised weights upcast to fp32, as QLoRA does
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for module in model.modules():
            # bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel the first time the
            # layer runs in eval mode: the weight changes shape under DeepSpeed (and fails for widths that
            # are not multiples of 32). Training and evaluation both use the plain dequantising path.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    torch.manual_seed(seed)
    try:
        extra = embedding_modules(model) if train_embeddings else []
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        peft_model = get_peft_model(model, peft_config(cfg, extra, tied))
    except ValueError as e:
        if "not found in the base model" not in str(e) and "Target modules" not in str(e):
            raise
        raise ConfigError(
            f"lora.target_modules = {cfg.target_modules!r} matches no module of {type(model).__name__}; its linear "
            f"modules are: {', '.join(linear_module_names(model))}"
        ) from None
    return peft_model


def linear_module_names(model: Any) -> list[str]:
    """The distinct last names of the model's linear layers (what ``target_modules`` lists)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            last = name.rsplit(".", 1)[-1]
            if last not in names:
                names.append(last)
    return names


def trainable_and_total(model: Any) -> tuple[int, int]:
    """Parameters that train, and all of them (partitioned ZeRO-3 ones counted at full size)."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory was trained on."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def with_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """``model`` (the base) with the adapter of ``adapter_dir`` loaded on it, for inference. A base whose
    tokenizer gained tokens in training grows its embeddings to the adapter's tokenizer first."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(adapter_dir)))
    if vocab > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab, mean_resizing=False)  # the adapter brings the trained rows
    return PeftModel.from_pretrained(model, str(adapter_dir))


# --- export ---------------------------------------------------------------------------------------------
def save_adapter_config(model: Any, out: Path, base: str) -> None:
    """What a checkpoint keeps besides the weights: the adapter's config, naming the base it was trained on."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = base
    config.save_pretrained(str(out))


def write_adapter(trainable: dict[str, torch.Tensor], hf_dir: Path, out: Path, dtype: torch.dtype) -> None:
    """The adapter directory peft writes (adapter config, adapter safetensors), from the consolidated
    trainable weights; peft itself names the keys, on a model built on the meta device (no memory)."""
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = PeftConfig.from_pretrained(str(hf_dir))
    base_config = AutoConfig.from_pretrained(str(hf_dir))
    base_config._name_or_path = config.base_model_name_or_path
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(base_config)
        embeddings = embedding_modules(plain)
        model = get_peft_model(plain, config)
    state = get_peft_model_state_dict(model, state_dict=trainable, save_embedding_layers=False)
    saved = json.loads((hf_dir / ADAPTER_CONFIG).read_text())
    if saved.get("ensure_weight_tying") and saved.get("modules_to_save") and base_config.tie_word_embeddings:
        # peft writes the trained input embedding alone and, loading it, ties the output layer to it only
        # when it knows one of the names (embed_tokens, lm_head): GPT-2's wte it does not, and the loaded
        # model's output layer would keep the base's rows. The output layer named too, with its (tied)
        # rows, loads right everywhere.
        names = {id(m): n for n, m in plain.named_modules()}
        key = "base_model.model.{}.weight".format
        tied_in, tied_out = key(names[id(plain.get_input_embeddings())]), key(names[id(plain.get_output_embeddings())])
        if tied_in in state and tied_out not in state:
            state[tied_out] = state[tied_in].clone()
            saved["modules_to_save"] = list(dict.fromkeys([*saved["modules_to_save"], *embeddings]))
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous().to(dtype) if v.is_floating_point() else v for k, v in state.items()},
        str(out / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    (out / ADAPTER_CONFIG).write_text(json.dumps(saved, indent=2) + "\n")


def merge(
    adapter_dir: Path,
    out: Path,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    extra: dict[str, str] | None = None,
) -> Path:
    """A plain Hugging Face model whose weights are base + scaled BA (the base loaded unquantised), with
    ``extra`` files (name -> text) beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distsft.model.loading import NO_HUB_KERNELS

    base = AutoModelForCausalLM.from_pretrained(
        adapter_base(adapter_dir), dtype=dtype, trust_remote_code=trust_remote_code, **NO_HUB_KERNELS
    )
    merged = with_adapter(base, adapter_dir).merge_and_unload()
    tmp = scratch_beside(out)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(tmp))
    if (Path(adapter_dir) / "generation_config.json").is_file():  # the run's stops, not the base's
        shutil.copy(Path(adapter_dir) / "generation_config.json", tmp / "generation_config.json")
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    publish_dir(tmp, out)
    return out
