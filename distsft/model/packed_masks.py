"""Packed-example masks for the few models whose code builds its attention masks without the position ids.

transformers' mask builders find where packed examples begin from ``position_ids`` (a position that
does not follow its predecessor starts a new example), and most models pass them along. A few build the
masks from the shapes alone (gpt-oss, AFMoE, GraniteMoeHybrid in transformers 5): their packed examples
would attend to one another. Those models accept a mask mapping prepared by the caller (what ``generate``
hands them), so here a hook on the model's decoder builds that mapping with the position ids, with the
very same builders, one mask per layer type; the model then runs as the others do.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

_KWARGS = re.compile(r"mask_kwargs\s*=\s*\{(.*?)\}", re.S)


def needs_position_masks(decoder_cls: type) -> bool:
    """The decoder builds its masks with transformers' builders, without position ids, and takes a
    prepared mapping (``isinstance(attention_mask, dict)``)."""
    try:
        source = inspect.getsource(decoder_cls.forward)
    except (OSError, TypeError):
        return False
    kwargs = _KWARGS.search(source)
    return bool(kwargs) and "position_ids" not in kwargs.group(1) and "attention_mask, dict)" in source


def install(model: Any) -> bool:
    """Hook the decoder of ``model`` when it needs it; returns whether it did."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not needs_position_masks(type(decoder)):
        return False
    decoder.register_forward_pre_hook(_with_position_masks, with_kwargs=True)
    return True


def _with_position_masks(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    import torch
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    positions, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    if positions is None or mask is not None or kwargs.get("past_key_values") is not None:
        return None  # nothing packed to tell apart (generation, or a caller's own mask)
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    shape = (embeds if embeds is not None else ids).shape[:2]
    device = (embeds if embeds is not None else ids).device
    dtype = embeds.dtype if embeds is not None else module.dtype
    like = torch.empty((*shape, 1), dtype=dtype, device=device)  # what the builders read: batch, length, dtype
    common = {"config": module.config, "inputs_embeds": like, "attention_mask": None, "cache": None}
    builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    types = set(getattr(module.config, "layer_types", None) or ["full_attention"])
    kwargs = dict(kwargs)
    kwargs["attention_mask"] = {t: builders[t](**common, position_ids=positions) for t in types if t in builders}
    return args, kwargs
