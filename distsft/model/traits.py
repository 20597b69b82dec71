"""What a model family asks of the trainer, read from its config and class, never from its weights.

transformers declares on each model class which attention implementations it supports (``_supports_sdpa``,
``_supports_flex_attn``, ``_supports_flash_attn``), and in each config the features that change how it
must be trained: tied input/output embeddings, sliding-window layers, logit soft-capping, experts behind a
router, recurrent (state-space or linear-attention) layers. distsft reads them once, here, and decides:
which attention runs, whether packed rows can be isolated, which blocks ZeRO-3 must fetch whole, and
whether a router loss exists. Nothing here loads weights or knows about ranks.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from dataclasses import dataclass
from typing import Any

from distsft.errors import ConfigError

# The attention implementations distsft can run, fastest first for each device. Varlen kernels run a
# packed row's examples as separate sequences (no mask): flash-attention when installed, else PyTorch's
# own varlen kernel (``distsft_varlen``, distsft/attention.py); flex_attention gets a block-sparse
# document mask; sdpa and eager get a dense mask. flex_attention has no backward on CPU.
PREFERENCE = {
    "cuda": ["flash_attention_3", "flash_attention_2", "distsft_varlen", "sdpa", "flex_attention", "eager"],
    "cpu": ["sdpa", "eager"],
}
ATTENTION_KINDS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "distsft_varlen")
# Layer kinds whose masks transformers builds from packed position ids (one example never sees another).
ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "moe_k")


@dataclass(frozen=True)
class ModelTraits:
    model_type: str
    class_name: str
    supports: tuple[str, ...]
    """Attention implementations the class declares (any device)."""
    tied_embeddings: bool
    sliding_window: int | None
    sliding_layers: int
    """How many layers use the window (all of them for Mistral; every other for Gemma-2)."""
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    final_logit_softcapping: float | None
    attn_logit_softcapping: float | None
    experts: int
    """Routed experts per MoE layer; 0 for a dense model."""
    router_loss: bool
    """The model computes a load-balancing loss when asked for ``output_router_logits``."""
    router_aux_loss_coef: float
    packs: bool
    """Packed examples can be isolated: the model builds its masks through transformers' masking
    utilities, which read example boundaries from restarting position ids, and has no recurrent layers
    whose state would flow from one example into the next."""
    why_not_packs: str = ""
    vocab_size: int = 0
    max_positions: int = 0
    """The positions the model was built for (``max_position_embeddings``); 0 where the config says none."""
    rescales_logits: bool = False
    """The class changes its logits after the output layer, beyond final soft-capping (Granite divides by
    ``logits_scaling``, Cohere multiplies by ``logit_scale``): a loss fused with the output layer would miss it."""

    def describe(self, attn: str) -> str:
        parts = [f"{self.class_name} ({self.model_type})", f"attention {attn}"]
        if self.tied_embeddings:
            parts.append("tied embeddings")
        if self.sliding_window:
            parts.append(f"sliding window {self.sliding_window} on {self.sliding_layers}/{self.layers} layers")
        caps = [
            f"{name} {v:g}"
            for name, v in (("attention", self.attn_logit_softcapping), ("final", self.final_logit_softcapping))
            if v
        ]
        if caps:
            parts.append("logit soft-capping: " + ", ".join(caps))
        if self.experts:
            aux = f", router loss coef {self.router_aux_loss_coef:g}" if self.router_loss else ", no router loss"
            parts.append(f"{self.experts} experts{aux}")
        return "; ".join(parts)


def model_class(config: Any, trust_remote_code: bool = False) -> type:
    """The causal-LM class ``AutoModelForCausalLM`` would build for ``config``."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], config._name_or_path)
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        hint = " (it ships its own code: set model.trust_remote_code=true)" if auto_map else ""
        raise ConfigError(
            f"model.path: model type {config.model_type!r} has no causal-LM class in this transformers{hint}"
        ) from None


def check_context(traits: ModelTraits, max_seq_len: int) -> None:
    """Rows no longer than the positions the model was built for (a 1M-token row passed unnoticed, and the
    dry run priced its activations at 867,843 GiB)."""
    if traits.max_positions and max_seq_len > traits.max_positions:
        raise ConfigError(
            f"data.max_seq_len = {max_seq_len} is beyond the {traits.max_positions} positions {traits.class_name} "
            "was built for (max_position_embeddings); lower it, or extend the model's context first (rope "
            "scaling in its config.json)"
        )


def text_config(config: Any) -> Any:
    """The language model's part of a config (multimodal configs nest it), or the config itself."""
    try:
        return config.get_text_config()
    except (AttributeError, ValueError):  # not a transformers config, or several text parts
        return config


def read_traits(config: Any, cls: type) -> ModelTraits:
    text = text_config(config)
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    layer_types = list(getattr(text, "layer_types", None) or [])
    window = getattr(text, "sliding_window", None) or None
    if layer_types:
        sliding = sum(1 for t in layer_types if t == "sliding_attention")
    else:
        sliding = layers if window else 0
    if not sliding:
        window = None
    experts = expert_count(text)
    forward = inspect.signature(cls.forward).parameters
    router_loss = experts > 0 and "output_router_logits" in forward
    why = _why_not_packs(cls, text, layer_types)
    heads = _global_int(text, "num_attention_heads")
    return ModelTraits(
        model_type=getattr(config, "model_type", "?"),
        class_name=cls.__name__,
        supports=tuple(k for k in ATTENTION_KINDS if _declares(cls, k)),
        tied_embeddings=bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))),
        sliding_window=window,
        sliding_layers=sliding,
        layers=layers,
        hidden_size=int(getattr(text, "hidden_size", 0) or 0),
        heads=heads,
        kv_heads=_global_int(text, "num_key_value_heads") or heads,
        final_logit_softcapping=getattr(text, "final_logit_softcapping", None),
        attn_logit_softcapping=getattr(text, "attn_logit_softcapping", None),
        experts=experts,
        router_loss=router_loss,
        router_aux_loss_coef=float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0) if router_loss else 0.0,
        packs=not why,
        why_not_packs=why,
        vocab_size=int(getattr(text, "vocab_size", 0) or 0),
        max_positions=int(getattr(text, "max_position_embeddings", 0) or 0),
        rescales_logits=_rescales_logits(cls),
    )


_RESCALE = re.compile(r"^\s*logits\s*(?:[*/]=|=\s*(?:logits|self\.lm_head\([^)]*\))\s*[*/])")


def _rescales_logits(cls: type) -> bool:
    """Read from the class's ``forward``: a line that multiplies or divides ``logits`` after the output layer
    (soft-capping, which the fused loss applies itself, aside). Unreadable source counts as rescaling."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True
    return any(_RESCALE.match(line) and "softcap" not in line for line in source.splitlines())


def _global_int(config: Any, key: str) -> int:
    """A model-wide integer; 0 where the config has none, or one per layer (heterogeneous models refuse
    to give a global value)."""
    try:
        return int(getattr(config, key, 0) or 0)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError, and kin
        return 0


def expert_count(config: Any) -> int:
    """Routed experts per MoE layer (0 for a dense model)."""
    text = text_config(config)
    if getattr(text, "is_moe", True) is False:  # families with an optional MoE (Doge) say so
        return 0
    for key in EXPERT_COUNT_KEYS:
        n = getattr(text, key, None)
        if isinstance(n, int) and n > 1:
            return n
    ffn = getattr(text, "ffn_config", None)  # DBRX keeps its MoE settings in a sub-config
    n = getattr(ffn, "moe_num_experts", None) if ffn is not None else None
    return n if isinstance(n, int) and n > 1 else 0


def _why_not_packs(cls: type, text: Any, layer_types: list[str]) -> str:
    # The class or one it builds on (models with their own code often subclass a transformers family).
    modules = {inspect.getmodule(k) for k in cls.__mro__}
    builders = ("create_causal_mask", "create_sliding_window_causal_mask")
    if not any(hasattr(m, f) for m in modules for f in builders):
        return f"{cls.__name__} does not build its attention masks from position ids"
    recurrent = sorted({t for t in layer_types if t not in ATTENTION_LAYERS})
    block_types = [str(t) for t in (getattr(text, "layers_block_type", None) or [])]
    recurrent += sorted({t for t in block_types if "attention" not in t})
    if recurrent:
        return f"{cls.__name__} has {', '.join(recurrent)} layers, whose state would run from one example into the next"
    return ""


def _declares(cls: type, kind: str) -> bool:
    if kind == "eager":
        return True
    if kind == "distsft_varlen":  # the flash-attention contract; soft-capped scores are excluded at choice
        return _declares(cls, "flash_attention_2")
    if kind == "sdpa":
        return bool(getattr(cls, "_supports_sdpa", False))
    if kind == "flex_attention":
        return bool(getattr(cls, "_supports_flex_attn", False))
    return bool(getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False))


def _runnable(kind: str, traits: ModelTraits, device: Any, dtype: Any, probe: bool = True) -> str:
    """Why ``kind`` cannot run here, or '' when it can."""
    import torch

    if kind in ("flash_attention_2", "flash_attention_3", "flex_attention", "distsft_varlen") and device.type != "cuda":
        return "needs a CUDA GPU" + (" (it has no backward pass on CPU)" if kind == "flex_attention" else "")
    if kind == "distsft_varlen":
        from distsft.model import attention

        if traits.attn_logit_softcapping:
            return "cannot soft-cap attention scores"
        if not probe or not torch.cuda.is_available():  # planning on a driver: the workers probe their GPUs
            return "" if dtype in (torch.float16, torch.bfloat16) else "needs bf16 or fp16 weights"
        index = device.index if device.index is not None else torch.cuda.current_device()
        return attention.usable(index, dtype, bool(traits.sliding_window))
    if kind == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "needs the flash-attn package"
    if kind == "flash_attention_3" and importlib.util.find_spec("flash_attn_interface") is None:
        return "needs flash-attention 3 (flash_attn_interface)"
    return ""


def choose_attention(requested: str, traits: ModelTraits, device: Any, dtype: Any = None, probe: bool = True) -> str:
    """``auto``: the fastest implementation the class declares and this device can run; an explicit choice
    the class or the device cannot run is a one-line config error naming the ones that can. ``probe=False``
    runs nothing on a GPU of this process (a driver planning for its workers)."""
    import torch

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    usable = [k for k in PREFERENCE.get(device.type, PREFERENCE["cpu"]) if k in traits.supports]
    usable = [k for k in usable if not _runnable(k, traits, device, dtype, probe)]
    if requested == "auto":
        return usable[0] if usable else "eager"
    if requested not in traits.supports:
        raise ConfigError(
            f"model.attn_implementation = {requested}: {traits.class_name} does not support it; "
            f"it supports {', '.join(traits.supports)} (usable here: {', '.join(usable) or 'eager'})"
        )
    why = _runnable(requested, traits, device, dtype, probe)
    if why:
        raise ConfigError(
            f"model.attn_implementation = {requested} {why}; usable here for {traits.class_name}: {', '.join(usable)}"
        )
    return requested


def varlen(attn: str) -> bool:
    """Whether the implementation runs packed rows as variable-length sequences (no mask), which needs the
    examples' cumulative lengths from the collator."""
    return attn.startswith("flash_attention") or attn == "distsft_varlen"


def check_training_fit(traits: ModelTraits, packing: bool, router_aux_loss_coef: float | None) -> None:
    """Refuse, before any heavy work, combinations the model cannot train correctly."""
    if packing and not traits.packs:
        raise ConfigError(
            f"data.packing = true: {traits.why_not_packs}, so packed examples would not be isolated; "
            "set data.packing=false for this model"
        )
    if router_aux_loss_coef and not traits.router_loss:
        what = "has no experts" if not traits.experts else "computes no router load-balancing loss"
        raise ConfigError(f"train.router_aux_loss_coef = {router_aux_loss_coef:g}: {traits.class_name} {what}")


def routed_experts(model: Any) -> list[tuple[Any, Any]]:
    """(block, experts) pairs: each MoE block and the child that holds its routed experts, either stacked
    tensors (every built-in transformers family, a child named ``experts``) or a ``ModuleList`` with one
    module per expert (common in models that ship their own code)."""
    import torch

    n = expert_count(text_config(model.config))
    if not n:
        return []
    pairs = []
    for module in model.modules():
        for name, child in module.named_children():
            if name in ("layers", "h", "blocks"):  # the decoder stack can have as many layers as experts
                continue
            if name == "experts" or (isinstance(child, torch.nn.ModuleList) and len(child) == n):
                pairs.append((module, child))
    return pairs


def expert_blocks(model: Any) -> list[type]:
    """Classes of the blocks that hold a layer's experts, for ZeRO-3 to fetch as one leaf.

    ZeRO-3 gathers a module's parameters when the module runs; a block that calls only the experts its
    tokens were routed to would make ranks call different modules and wait on each other for ever.
    Built-in transformers families keep experts as stacked tensors (always called); models with their
    own code often keep a ``ModuleList`` of experts, called selectively. The owner of either is a leaf.
    """
    found: list[type] = []
    for block, _ in routed_experts(model):
        if type(block) not in found:
            found.append(type(block))
    return found


def experts_per_token(model: Any) -> tuple[int, int]:
    """(experts each token is routed to, routed experts per layer); (0, 0) for a dense model."""
    text = text_config(model.config)
    n = expert_count(text)
    k = next((getattr(text, key) for key in TOP_K_KEYS if getattr(text, key, None)), None)
    k = k or getattr(getattr(text, "ffn_config", None), "moe_top_k", None)
    return (int(k or 1), n) if n else (0, 0)
