"""Load the tokenizer and the causal LM: a local HF directory, a hub id, or the bundled demo.

Nothing here knows about ranks or engines: under ZeRO-3 the caller keeps an ``HfDeepSpeedConfig``
alive before calling :func:`load_model`, which makes ``from_pretrained`` / ``from_config`` build the
model partitioned (``deepspeed.zero.Init``) instead of materialising a full copy per worker.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from distsft.config import DEMO_DIR, LoraConfig, ModelConfig, cache_home
from distsft.errors import ConfigError, first_line
from distsft.host import private_dir
from distsft.model import hub
from distsft.model.hub import ModelSource
from distsft.model.traits import ModelTraits, choose_attention, model_class, read_traits

DEMO_MODEL = DEMO_DIR / "model"
DEMO_TOKENIZER = DEMO_DIR / "tokenizer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NO_HUB_KERNELS = {"use_kernels": False}
"""For every ``from_pretrained`` of a model: transformers 5.2x swaps layers for kernels it downloads from the
Hub on a GPU by default (``use_kernels=None`` means yes): code from the network at load time, which fails
offline ("kernels-community/rotary is not available in the local cache") and runs what nobody chose."""


def resolve_dtype(cfg: ModelConfig, device: torch.device, probe: bool = True) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it natively (a V100 or T4 only emulates it: fp32 there), else fp32.
    Without ``probe`` (the Ray driver, which must not create a CUDA context beside a worker's) or without a
    GPU here (planning for the workers' GPUs), bf16 is assumed."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if device.type == "cuda" and (
        not probe or not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        return torch.bfloat16
    return torch.float32


def source(cfg: ModelConfig, tokenizer: bool = False) -> ModelSource:
    """Where the model (or its tokenizer) comes from; a hub id is checked in seconds (``distsft/hub.py``)."""
    if tokenizer and cfg.tokenizer:
        spec, key = cfg.tokenizer, "model.tokenizer"
    else:
        spec, key = cfg.path, "model.path"
    if spec == "demo":
        return ModelSource(str(DEMO_TOKENIZER if tokenizer else DEMO_MODEL))
    probe = "tokenizer_config.json" if tokenizer else "config.json"
    return hub.resolve(spec, key, cfg.revision, probe_file=probe)


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    src = source(cfg, tokenizer=True)
    tok = AutoTokenizer.from_pretrained(
        src.path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, **src.kwargs()
    )
    prepare_chat_tokenizer(tok, chat_template_text(cfg.chat_template) if cfg.chat_template else None)
    return tok


def prepare_chat_tokenizer(tok: Any, template: str | None = None) -> list[str]:
    """Make ``tok`` ready to train a chat: ``template`` (or, for a base model's tokenizer without one,
    ChatML), and, where a template is chosen for it, its markers (``<|im_start|>``, ``<|im_end|>``, ...) as
    real tokens rather than strings split into pieces, so the model learns one end-of-turn token; a pad
    token where there is none. Returns the tokens added (the model's embeddings grow to match). Saved with
    the tokenizer, so the exported model chats as it was trained."""
    from distsft.data.tokenize import DEFAULT_CHAT_TEMPLATE

    chosen = template is not None or not getattr(tok, "chat_template", None)
    if chosen:
        tok.chat_template = template or DEFAULT_CHAT_TEMPLATE
    added = add_marker_tokens(tok, tok.chat_template) if chosen else []
    if tok.pad_token_id is None:
        # Padding never reaches the loss or attention (labels -100, its own segment), so EOS is a safe pad.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else added[-1] if added else None
    return added


MARKER = re.compile(r"<\|[^\s|<>'\"]{1,40}\|>|<｜[^\s<>'\"]{1,40}｜>")
"""Literal markers of chat templates: ``<|im_end|>``, ``<|eot_id|>``, ``<｜Assistant｜>``."""


def add_marker_tokens(tok: Any, template: str) -> list[str]:
    """The template's markers that ``tok`` would split into pieces, added as special tokens."""
    missing = sorted(m for m in set(MARKER.findall(template)) if len(tok.encode(m, add_special_tokens=False)) != 1)
    if missing:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(m, special=True, normalized=False) for m in missing], special_tokens=True)
    return missing


def end_of_turn_id(tok: Any) -> int | None:
    """The token the chat template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``), which
    generation stops at as well as EOS; None where it is not one token."""
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        text = tok.apply_chat_template(turns, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that wants another conversation: no marker learnt here
        return None
    after = text[text.rfind("y") + 1 :].strip()
    from distsft.data.tokenize import special_tokens

    ids = tok.encode(after, add_special_tokens=False) if after else []
    return ids[0] if ids and tok.convert_ids_to_tokens(ids[0]) in special_tokens(tok) else None


def chat_template_text(value: str) -> str:
    """``model.chat_template``: the template inline, or the file that holds it."""
    from distsft.config.schema import is_inline_template

    return value if is_inline_template(value) else Path(value).expanduser().read_text(encoding="utf-8")


def load_model_config(cfg: ModelConfig) -> Any:
    from transformers import AutoConfig

    src = source(cfg)
    try:
        return AutoConfig.from_pretrained(
            src.path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, **src.kwargs()
        )
    except (OSError, ValueError) as e:  # no config.json, a broken one, an unknown model type
        raise ConfigError(
            f"model.path {src.path}: not a model directory transformers can read ({first_line(e)})"
        ) from None


def traits_and_attention(
    cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype | None = None, probe: bool = True
) -> tuple[ModelTraits, str]:
    """The family's traits and the attention implementation to run on ``device`` in ``dtype`` (an explicit
    choice that the class or the device cannot run is a config error). ``probe=False`` decides without
    touching the GPU (the Ray driver: workers probe their own)."""
    from distsft.model import attention

    attention.register()
    config = load_model_config(cfg)
    traits = read_traits(config, model_class(config, cfg.trust_remote_code))
    device = torch.device(device)
    if dtype is None:
        dtype = resolve_dtype(cfg, device, probe)
    return traits, choose_attention(cfg.attn_implementation, traits, device, dtype, probe)


def materialize_demo(seed: int) -> Path:
    """The demo's seeded random init, written once as an HF directory and then loaded like any model.

    Building the weights outside ZeRO-3 partitioning (the model is a few MB) makes the initial weights
    identical whatever the ZeRO stage or worker count, which the equivalence tests rely on; and workers
    then go through the same ``from_pretrained`` path as real models.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    out = cache_home() / f"demo-init-seed{seed}"
    if (out / "config.json").is_file():
        return out
    config = load_model_config(ModelConfig(path="demo"))
    torch.manual_seed(seed)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)  # plain construction: never partitioned
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    private_dir(tmp)
    # Written by hand, not with save_pretrained: inside a process group transformers saves only on the
    # main process, and every worker (on any node) must be able to materialise its own copy.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors", {"format": "pt"})
    (tmp / "config.json").write_text(config.to_json_string())
    try:
        tmp.rename(out)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def base_path(cfg: ModelConfig, seed: int) -> str:
    """Where the base weights load from (the demo's seeded init is materialised first)."""
    return str(materialize_demo(seed)) if cfg.path == "demo" else source(cfg).path


def load_model(
    cfg: ModelConfig,
    dtype: torch.dtype,
    attn_implementation: str,
    seed: int,
    lora: LoraConfig | None = None,
    vocab_size: int | None = None,
) -> Any:
    """The demo is a seeded random init (see :func:`materialize_demo`); everything else is pretrained. With
    ``lora.r > 0`` the base is frozen (and quantised per ``model.quantization``) under seeded adapters.
    ``vocab_size``: the tokenizer's length; a tokenizer that gained tokens (a chat template's markers)
    grows the embeddings to it, the new rows initialised from the mean of the old ones, and with LoRA the
    embedding and output layers then train and are saved with the adapter."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from distsft.model.lora import apply_lora, bnb_config

    hf_logging.disable_progress_bar()

    src = ModelSource(str(materialize_demo(seed))) if cfg.path == "demo" else source(cfg)
    quantization = bnb_config(cfg.quantization, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        src.path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        revision=None if cfg.path == "demo" else cfg.revision,
        **NO_HUB_KERNELS,
        **({"quantization_config": quantization} if quantization is not None else {}),
        **src.kwargs(),
    )
    from distsft.model import packed_masks

    packed_masks.install(model)  # the few models that build masks without position ids (gpt-oss)
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # under zero.Init the local shape is 0: partitioned
    grown = bool(vocab_size) and vocab_size > rows
    if grown:
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    if lora is not None and lora.r > 0:
        model = apply_lora(model, lora, quantized=quantization is not None, seed=seed, train_embeddings=grown)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing, which passes the 4D packing mask through unchanged."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(numel(p) for p in model.parameters())


def numel(p: torch.Tensor) -> int:
    """A parameter's logical size: ZeRO-3 partitions keep it in ``ds_numel``, and a bitsandbytes 4-bit
    weight packs two values per byte (its ``quant_state`` keeps the shape it stands for)."""
    quant = getattr(p, "quant_state", None)
    if quant is not None and getattr(quant, "shape", None) is not None:
        return int(torch.Size(quant.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))
