"""Tiny random-init copies of the model families people fine-tune most, built from transformers' config
classes with the demo tokenizer's vocabulary: nothing comes from a hub."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distsft.config import DEMO_DIR

DEMO = json.loads((DEMO_DIR / "model" / "config.json").read_text())
SHAPE = {
    "vocab_size": DEMO["vocab_size"],
    "pad_token_id": DEMO["pad_token_id"],
    "eos_token_id": DEMO["eos_token_id"],
    "bos_token_id": DEMO["bos_token_id"],
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 1024,
}
WINDOW = 16  # small, so packed examples are longer than the window
MOE = {"moe_intermediate_size": 32, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.01}

# name -> (config class name, extra config); the tiny shape above applies to all of them
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "qwen2-swa": (
        "Qwen2Config",
        {"tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}),
    "gemma": ("GemmaConfig", {"tie_word_embeddings": True}),
    "gemma2": (
        "Gemma2Config",
        {"sliding_window": WINDOW, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 3.0},
    ),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": WINDOW, "sliding_window_pattern": 2}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),
    "olmo2": ("Olmo2Config", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.01}),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        {**MOE, "num_experts": 4, "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1},
    ),
    "qwen3-moe": ("Qwen3MoeConfig", {**MOE, "num_experts": 4, "decoder_sparse_step": 1}),
}
SLIDING = ["qwen2-swa", "mistral", "gemma2", "gemma3"]
MOES = ["mixtral", "qwen2-moe", "qwen3-moe"]


def family_config(name: str, **overrides):
    import transformers

    cls_name, extra = FAMILIES[name]
    cfg = getattr(transformers, cls_name)(**{**SHAPE, **extra, **overrides})
    if name == "gemma3" and not getattr(cfg, "layer_types", None):
        cfg.layer_types = ["sliding_attention", "full_attention"]
    return cfg


def family_model(name: str, seed: int = 0, attn: str = "eager", **overrides):
    from transformers import AutoModelForCausalLM

    cfg = family_config(name, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).float()


def save_family(name: str, out: Path, seed: int = 0, **overrides) -> Path:
    """An HF model directory (config + safetensors) that ``model.path`` can point at."""
    if not (out / "config.json").is_file():
        family_model(name, seed, **overrides).save_pretrained(out)
    return out
