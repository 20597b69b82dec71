"""The fixture MoE with its own code (``fixtures/toymoe``): one module per expert, only routed ones run."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import torch
from conftest import FIXTURES
from families import SHAPE


def save_toymoe(out: Path, experts: int = 16, top_k: int = 1, seed: int = 0) -> Path:
    """A model directory with ``auto_map`` and the modeling file beside the weights, as on the hub."""
    if (out / "config.json").is_file():
        return out
    src = FIXTURES / "toymoe" / "modeling_toymoe.py"
    spec = importlib.util.spec_from_file_location("modeling_toymoe", src)
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_toymoe"] = module
    spec.loader.exec_module(module)
    module.ToyMoeConfig.register_for_auto_class()
    module.ToyMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    cfg = module.ToyMoeConfig(num_local_experts=experts, num_experts_per_tok=top_k, **SHAPE)
    torch.manual_seed(seed)
    module.ToyMoeForCausalLM(cfg).save_pretrained(out)
    shutil.copy(src, out / src.name)
    return out
