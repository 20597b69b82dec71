"""Model FLOPs and MFU, counted the way torchtitan and nanoGPT (after PaLM, appendix B) count them.

A token costs ``6 * N`` FLOPs for forward plus backward through the dense weights (``N`` = parameters
that take part in a matmul: everything but the input embedding lookup, with a tied output projection
counted once as the matmul it is) plus ``12 * layers * heads * head_dim * context`` for attention scores
and their weighted sum. ``context`` is the length of the example the token belongs to: in a packed row
a token attends only within its own example, so the row's length would overstate the work; in a
sliding-window layer it is at most the window. A mixture-of-experts token counts only the experts it is
routed to. Padding tokens are never counted. Peak FLOP/s are dense bf16 figures from vendor data sheets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distsft.model.loading import numel
from distsft.model.traits import experts_per_token, read_traits, routed_experts, text_config

# Dense (no sparsity) bf16 tensor-core peak per device, FLOP/s. More specific names come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("H800", 989e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the config's override, else the table entry the device name contains.

    None when neither applies (a CPU, an unknown GPU): MFU is then not reported rather than made up.
    """
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    # "GH200" contains "H200"; check longer names first so the most specific entry wins.
    for key, flops in sorted(PEAK_BF16_FLOPS, key=lambda kv: -len(kv[0])):
        if key.lower() in device_name.lower():
            return flops
    return None


@dataclass(frozen=True)
class FlopsModel:
    dense_params: int
    """Parameters in matmuls per token: all but the input embedding (a lookup, not a matmul)."""
    full_attention: int
    """Sum over full-attention layers of heads x head_dim (the width of their score and value matmuls)."""
    frozen_params: int = 0
    """Of ``dense_params``, those that get no weight gradient (a LoRA base): 4 FLOPs per token, not 6."""
    sliding_attention: int = 0
    """The same over sliding-window layers, whose context is at most ``window``."""
    window: int | None = None

    def flops(self, example_lengths: Iterable[int]) -> float:
        """Training FLOPs (forward + backward) for examples of these real lengths."""
        return float(self.per_example(np.fromiter(example_lengths, dtype=np.float64)).sum())

    def per_example(self, n: np.ndarray) -> np.ndarray:
        """The same, one figure per example length (vectorised: a data set's worth at once)."""
        n = np.asarray(n, dtype=np.float64)
        context = self.full_attention * n + self.sliding_attention * np.minimum(n, self.window or n)
        return n * (6 * self.dense_params - 2 * self.frozen_params + 12 * context)


def flops_model(model: Any, total_params: int) -> FlopsModel:
    """Read the shape from the model's Hugging Face config; ``total_params`` must count ZeRO-3 partitioned
    parameters at full size (``count_parameters`` does)."""
    emb = model.get_input_embeddings().weight
    emb_numel = numel(emb)
    dense = total_params - emb_numel
    out = model.get_output_embeddings()
    if out is not None and out.weight is emb:  # tied: the output matmul reuses the embedding matrix
        dense += emb_numel
    top_k, n_experts = experts_per_token(model)
    if n_experts:  # a token runs through top_k of each layer's routed experts, not all of them
        routed = sum(numel(p) for _, experts in routed_experts(model) for p in experts.parameters())
        dense -= round(routed * (1 - top_k / n_experts))
    base = getattr(model, "get_base_model", lambda: model)()  # a PEFT model's architecture is its base's
    traits = read_traits(base.config, type(base))
    full, sliding = attention_widths(text_config(base.config), traits.sliding_window)
    # forward (2N) and the gradient of the activations (2N) for every weight; the weight gradient (2N)
    # only for weights that train
    frozen = sum(numel(p) for p in model.parameters() if not p.requires_grad and p is not emb)
    return FlopsModel(
        dense_params=dense,
        full_attention=full,
        frozen_params=frozen,
        sliding_attention=sliding,
        window=traits.sliding_window,
    )


def attention_widths(cfg: Any, window: int | None) -> tuple[int, int]:
    """(full, sliding) sums of heads x head_dim over the layers with softmax attention; recurrent and
    linear-attention layers of hybrid models cost no quadratic term. Configs whose layers differ in
    shape (``per_layer_config``) are read layer by layer."""
    layers = int(cfg.num_hidden_layers)
    kinds = list(getattr(cfg, "layer_types", None) or [])
    if len(kinds) != layers:
        kinds = ["sliding_attention" if window else "full_attention"] * layers
    per_layer = getattr(cfg, "per_layer_config", None)
    full = sliding = 0
    for i, kind in enumerate(kinds):
        c = per_layer[i] if per_layer else cfg
        heads = int(c.num_attention_heads)
        width = heads * int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        if kind == "sliding_attention" and window:
            sliding += width
        elif kind in ("full_attention", "chunked_attention", "sliding_attention"):
            full += width
    return full, sliding


def rows_flops(fm: FlopsModel, rows: Sequence[dict[str, Any]]) -> float:
    """FLOPs of packed rows: each row's ``seq_lens`` lists its examples' real lengths."""
    return sum(fm.flops(r["seq_lens"]) for r in rows)
