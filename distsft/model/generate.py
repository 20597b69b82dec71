"""Greedy chat generation from an exported model directory: the quickest check of what training taught."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distsft.errors import DistsftError, first_line


def greedy_reply(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int) -> str:
    """The greedy reply to prompt ``ids`` (the generation prompt included), up to a stop token."""
    import torch

    input_ids = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids(model, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def generate(
    model_dir: str,
    prompt: str,
    system: str | None = None,
    max_new_tokens: int = 128,
    trust_remote_code: bool = False,
) -> str:
    model, tokenizer = load_for_inference(model_dir, trust_remote_code)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ensure_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return greedy_reply(model, tokenizer, ids, max_new_tokens)


def check_model_dir(model_dir: str, flag: str = "--model") -> None:
    """A finished model directory or a LoRA adapter's: refused in one line before any work."""
    from distsft.model.lora import is_adapter_dir

    if not is_adapter_dir(model_dir) and not (Path(model_dir) / "config.json").is_file():
        raise DistsftError(f"{flag} {model_dir}: not a model directory (no config.json nor adapter_config.json)")


def load_for_inference(
    model_dir: str, trust_remote_code: bool = False, tokenizer_dir: str | None = None
) -> tuple[Any, Any]:
    """A finished model directory's model (in eval mode) and tokenizer (``tokenizer_dir``'s when given). An
    adapter directory (a LoRA run's export) loads on the base it names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from distsft.model.loading import NO_HUB_KERNELS
    from distsft.model.lora import adapter_base, is_adapter_dir, with_adapter

    adapter = is_adapter_dir(model_dir)
    check_model_dir(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir, trust_remote_code=trust_remote_code)
        base = adapter_base(model_dir) if adapter else model_dir
        model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=trust_remote_code, **NO_HUB_KERNELS)
    except (OSError, ValueError, KeyError) as e:  # a broken config.json, missing weights or tokenizer files
        raise DistsftError(f"--model {model_dir}: cannot be loaded ({first_line(e)})") from None
    return (with_adapter(model, model_dir) if adapter else model).eval(), tokenizer


def ensure_chat_template(tokenizer: Any) -> None:
    """A tokenizer without a chat template gets the one distsft trains such models with."""
    if not tokenizer.chat_template:
        from distsft.data.tokenize import DEFAULT_CHAT_TEMPLATE

        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS, the model's own stop tokens, and the chat template's end-of-turn token."""
    from distsft.model.loading import end_of_turn_id

    gen = getattr(model, "generation_config", None)
    own = getattr(gen, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(own if isinstance(own, list) else [own]), end_of_turn_id(tokenizer)]
    return list(dict.fromkeys(i for i in ids if i is not None))
