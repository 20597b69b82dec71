"""Model FLOPs and MFU, counted the way torchtitan and nanoGPT (after PaLM, appendix B) count them.

A token costs ``6 * N`` FLOPs for forward plus backward through the dense weights (``N`` = parameters
that take part in a matmul: everything but the input embedding lookup, with a tied output projection
counted once as the matmul it is) plus ``12 * layers * heads * head_dim * context`` for attention scores
and their weighted sum. ``context`` is the length of the example the token belongs to: in a packed row
a token attends only within its own example, so the row's length would overstate the work. Padding
tokens are never counted. Peak FLOP/s are dense bf16 figures from vendor data sheets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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
    layers: int
    heads: int
    head_dim: int

    def flops(self, example_lengths: Iterable[int]) -> float:
        """Training FLOPs (forward + backward) for examples of these real lengths."""
        attn = 12 * self.layers * self.heads * self.head_dim
        return float(sum(n * (6 * self.dense_params + attn * n) for n in example_lengths))


def flops_model(model: Any, total_params: int) -> FlopsModel:
    """Read the shape from the model's Hugging Face config; ``total_params`` must count ZeRO-3 partitioned
    parameters at full size (``count_parameters`` does)."""
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    emb = model.get_input_embeddings().weight
    emb_numel = int(getattr(emb, "ds_numel", emb.numel()))
    dense = total_params - emb_numel
    out = model.get_output_embeddings()
    if out is not None and out.weight is emb:  # tied: the output matmul reuses the embedding matrix
        dense += emb_numel
    return FlopsModel(dense_params=dense, layers=layers, heads=heads, head_dim=head_dim)


def rows_flops(fm: FlopsModel, rows: Sequence[dict[str, Any]]) -> float:
    """FLOPs of packed rows: each row's ``seq_lens`` lists its examples' real lengths."""
    return sum(fm.flops(r["seq_lens"]) for r in rows)
