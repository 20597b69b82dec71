"""Write the trained weights as a plain Hugging Face model directory (config, safetensors, tokenizer).

The directory is written under a temporary name and renamed into place, so a crash never leaves a
half-written ``final/`` that ``from_pretrained`` would half-load.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


def gathered_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Full fp32/bf16 state dict on rank 0 (None elsewhere); every rank must call it (ZeRO-3 gathers)."""
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        sd = engine._zero3_consolidated_16bit_state_dict()
        return sd if dist.get_rank() == 0 else None
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def save_hf(model: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any, out_dir: str | Path) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
