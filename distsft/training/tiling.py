"""Tiled MLPs: a layer's MLP runs over a few thousand tokens at a time, and again in the backward pass.

At long sequence lengths the MLP's intermediate activations (gate, up, their product: three tensors of
``intermediate_size`` per token, 3.5x the hidden size in Llama) are the largest thing a layer keeps for
its backward pass. Tiled, the forward pass keeps only the MLP's input; the backward pass recomputes each
tile's MLP and back-propagates it before moving on, so one tile's intermediates exist at a time. This is
DeepSpeed ALST's ``TiledMLP`` (``deepspeed/runtime/sequence_parallel/ulysses_sp.py``), with one change:
the tokens are split into exactly ``tiles`` parts (``tensor_split``; ``torch.chunk`` may return fewer),
because under ZeRO-3 every rank must run the MLP's layers the same number of times (each run gathers
their weights in a collective), whatever its row width. Like DeepSpeed's, it tells ZeRO not to reduce a
weight's gradient until the last tile has added to it. The backward pass recomputes under the autocast
state of the forward pass (autograd runs it on its own thread, where autocast is off), as
``torch.utils.checkpoint`` does: the same bf16 forward, not an fp32 one.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward, x, tiles, params):  # noqa: D401 - autograd signature
        ctx.forward, ctx.tiles = forward, tiles
        ctx.params = [p for p in params if p.requires_grad]
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([forward(part) for part in flat.tensor_split(tiles)])
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        flat = x.detach().reshape(-1, x.shape[-1])
        grads = grad.reshape(-1, grad.shape[-1]).tensor_split(ctx.tiles)
        grad_x = torch.empty_like(flat) if x.requires_grad else None
        start = 0
        for i, (part, g) in enumerate(zip(flat.tensor_split(ctx.tiles), grads, strict=True)):
            for p in ctx.params:  # ZeRO reduces a gradient when this is True: only after the last tile
                p.ds_grad_is_ready = i == ctx.tiles - 1
            leaf = part.detach().requires_grad_(x.requires_grad)
            device, dtype, enabled = ctx.autocast
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = ctx.forward(leaf)
            torch.autograd.backward(out, g)
            if grad_x is not None:
                grad_x[start : start + len(part)] = leaf.grad
            start += len(part)
        return None, grad_x.view_as(x) if grad_x is not None else None, None, None


def tile_mlps(model: Any, tokens_per_pass: int, hidden_size: int) -> int:
    """Make every dense MLP of ``model`` tiled, in tiles of about ``hidden_size`` tokens (DeepSpeed's choice:
    then a tile's intermediates are about the size of the layer's weights) for micro-batches of up to
    ``tokens_per_pass`` tokens; returns how many MLPs were tiled. Mixture-of-experts blocks are left as
    they are: each expert already sees only its share of the tokens."""
    tiles = max(1, math.ceil(tokens_per_pass / max(hidden_size, 1)))
    count = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "mlp" or hasattr(module, "experts") or hasattr(module, "router"):
            continue
        module.forward = _tiled(module.forward, tiles, list(module.parameters()))
        count += 1
    return count


def _tiled(forward: Any, tiles: int, params: list[torch.nn.Parameter]) -> Any:
    def tiled_forward(x: torch.Tensor) -> torch.Tensor:
        return _TiledMLP.apply(forward, x, tiles, params)

    return tiled_forward
