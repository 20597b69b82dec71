"""Packed rows through PyTorch's own variable-length flash kernel, registered with transformers.

A packed row must never pay for the row x row square its examples do not use. flash-attention's varlen
kernel avoids it, but the flash-attn package is a long CUDA build that many machines lack; PyTorch (2.10
and later) ships the same kind of kernel as ``torch.nn.attention.varlen.varlen_attn``. This module
registers it with transformers' attention interface as ``distsft_varlen``: the model runs every example
of the flattened batch as its own causal sequence, from the cumulative lengths the collator computes
(``collate(..., varlen=True)``), with no mask at all, grouped-query heads and sliding windows included.

The kernel takes one 16-bit dtype for ``q``, ``k`` and ``v`` and has no autocast rule. Under autocast
(fp32 weights, bf16 matmuls: the default on one GPU) rotary embeddings multiply bf16 ``q``/``k`` by fp32
``cos``/``sin``, so they arrive in fp32 beside a bf16 ``v``; like transformers' own flash path, they are
cast to the autocast dtype here (to ``v``'s dtype without autocast).

No mask function is registered for it: transformers then builds no mask at all (the kernel never reads
one) and skips its packed-sequence check, whose ``.all()`` would wait for the device at every layer
call's mask.

Whether it can run is decided on the device itself (``usable``): a CUDA GPU, half precision, and a
tiny forward and backward that must succeed with exactly the arguments training will pass (fp32
``q``/``k`` beside 16-bit ``v`` under autocast included), because the function's signature has changed
between PyTorch releases. Nothing here knows about ranks.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

NAME = "distsft_varlen"


def _kernel():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


@functools.cache
def _params() -> frozenset[str]:
    return frozenset(inspect.signature(_kernel()).parameters)


def varlen_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query`` (batch, heads, seq, dim), ``key``/``value``
    (batch, kv heads, seq, dim); returns (batch, seq, heads, dim)."""
    if softcap:
        raise ValueError(f"{NAME} cannot soft-cap attention scores; use flex_attention or eager")
    if dropout and module.training:
        raise ValueError(f"{NAME} has no attention dropout (the model's attention_dropout is {dropout})")
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    dtype = compute_dtype(query, value)
    query, key, value = (x if x.dtype == dtype else x.to(dtype) for x in (query, key, value))
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * seq, kv_heads, dim)
    if cu_seq_lens_q is None:  # one sequence per row (an unpacked batch without padding)
        cu_seq_lens_q = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=query.device)
        max_length_q = seq
    options: dict[str, Any] = {"scale": scaling}
    params = _params()
    if heads != kv_heads:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    if "window_size" in params:
        options["window_size"] = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    elif sliding_window:
        raise ValueError(f"{NAME}: this PyTorch's varlen_attn has no window_size; sliding windows need 2.11+")
    else:
        options["is_causal"] = True
    out = _kernel()(q, k, v, cu_seq_lens_q, cu_seq_lens_q, int(max_length_q), int(max_length_q), **options)
    return out.reshape(batch, seq, heads, dim), None


def compute_dtype(query: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    """The one 16-bit dtype the kernel runs in: autocast's where it is on (fp32 weights, as transformers'
    flash path casts), else ``value``'s (the projections' output, never touched by rotary embeddings)."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return value.dtype if value.dtype in (torch.float16, torch.bfloat16) else query.dtype


def register() -> None:
    """Make ``attn_implementation="distsft_varlen"`` known to transformers (idempotent). No mask function:
    transformers then makes no mask and runs no packed-sequence check (a host sync per forward)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)


@functools.cache
def usable(device_index: int, dtype: torch.dtype, sliding_window: bool) -> str:
    """'' when the kernel runs here with the arguments training passes, else why not."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs bf16 or fp16 weights (the model is {str(dtype).removeprefix('torch.')})"
    try:
        _kernel()
    except ImportError:
        return f"needs PyTorch 2.10 or later (this is {torch.__version__})"
    if sliding_window and "window_size" not in _params():
        return "this PyTorch's varlen_attn has no sliding windows"
    device = torch.device("cuda", device_index)
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "needs an Ampere or newer GPU"

    class Probe(torch.nn.Module):
        training = True

    try:  # two sequences of a flattened batch, grouped-query heads, forward and backward; under autocast
        # with fp32 q/k beside a 16-bit v, as rotary embeddings leave them when the weights are fp32
        q = torch.randn(1, 4, 24, 64, device=device, dtype=torch.float32, requires_grad=True)
        kv = torch.randn(1, 2, 24, 64, device=device, dtype=dtype, requires_grad=True)
        cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=device)
        with torch.autocast("cuda", dtype=dtype):
            out, _ = varlen_attention_forward(
                Probe(), q, kv.float(), kv, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=14,
                max_length_k=14, sliding_window=8 if sliding_window else None,
            )  # fmt: skip
        out.float().sum().backward()
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any failure means: choose another implementation
        return f"failed its check on this GPU ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return ""
