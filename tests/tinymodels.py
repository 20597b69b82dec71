"""A tiny random-init Llama for tests that run a real model forward and backward."""

from __future__ import annotations

import torch


def tiny_llama(attn: str = "eager", tied: bool = False, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {
        "vocab_size": 101,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    cfg = LlamaConfig(**{**shape, **overrides}, tie_word_embeddings=tied, attn_implementation=attn)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()
