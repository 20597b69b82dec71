"""Ulysses sequence parallelism: the workers of a group share every row, each holding a slice of its tokens.

Everything in a transformer but attention works token by token, so a worker can run embeddings, norms,
MLPs and the loss on its own slice of a row. Attention needs every token of an example: before it, one
all-to-all trades "my tokens, all heads" for "all tokens, my heads" (heads / group size of them), the
ordinary attention kernel runs over the whole row for those heads, and a second all-to-all trades back.
This is DeepSpeed-Ulysses (and DeepSpeed's ``UlyssesSPAttentionHF``, whose design this follows: register
an attention function with transformers, replicate key/value heads when there are fewer of them than
workers). Where it differs, and why:

- Packed rows stay isolated. DeepSpeed's wrapper drops the attention mask and relies on causal masking
  (sdpa), position ids (flash-attention) or a plain causal block mask (flex), so examples packed into one
  row attend to each other on every path but flash-attention, and sliding windows are ignored. Here
  every worker knows the whole row's example lengths (the collator computes them on the host, for the
  whole row, before it is sliced), so the attention of the gathered row gets exactly the mask the
  unsplit row would get: varlen kernels take the lengths, flex_attention a document block mask, sdpa runs
  each example on its own (causal), eager gets a dense mask (made once per forward pass and shared by the
  layers), each with the layer's sliding window. eager (which DeepSpeed refuses) therefore works
  too, which soft-capped families (Gemma-2) need on CPU.
- Labels are shifted before the row is split (``shard_batch``), so the token at the end of one worker's
  slice is still trained to predict the first token of the next worker's slice.
- The loss needs no collective of its own: each worker sums its slice's token losses, the loop scales
  them by the global count of supervised tokens, and DeepSpeed's gradient all-reduce over all workers
  adds up the slices (the all-to-all's backward returns every token's gradient to the worker owning it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from distsft.data.tokenize import IGNORE_INDEX
from distsft.errors import ConfigError
from distsft.model.traits import ModelTraits

NAME = "distsft_ulysses"
CORES = ("flash_attention_3", "flash_attention_2", "distsft_varlen", "flex_attention", "sdpa", "eager")
"""Attention implementations that can run under sequence parallelism (all of distsft's)."""


@dataclass(frozen=True)
class SequenceGroup:
    size: int
    rank: int
    """This worker's place in its group: which slice of every row it holds."""
    group: Any


def new_groups(size: int) -> SequenceGroup | None:
    """Consecutive ranks form a group (every rank creates every group, in the same order)."""
    if size == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return SequenceGroup(size, rank % size, mine)


def check(size: int, traits: ModelTraits, attn: str) -> None:
    """Refuse, before any heavy work, a sequence-parallel size the model cannot be split by (the workers and
    the row length are checked with the batch plan and the config)."""
    if size == 1:
        return
    key = "train.sequence_parallel"
    if not traits.heads or not traits.kv_heads:
        raise ConfigError(f"{key} = {size}: {traits.class_name} has no model-wide attention head count to split")
    if traits.heads % size:
        raise ConfigError(f"{key} = {size} does not divide the model's {traits.heads} attention heads")
    if traits.kv_heads % size and size % traits.kv_heads:
        raise ConfigError(
            f"{key} = {size} and the model's {traits.kv_heads} key/value heads: one must divide the other"
        )
    if not traits.packs:
        raise ConfigError(f"{key} = {size}: {traits.why_not_packs}, so its sequences cannot be split")
    if attn not in CORES:
        raise ConfigError(f"{key} = {size}: attention {attn} cannot run split sequences; these can: {', '.join(CORES)}")


def shard_batch(batch: dict[str, Any], size: int, rank: int) -> dict[str, Any]:
    """This worker's slice of a collated micro-batch (host tensors, width a multiple of ``size``): the
    inputs and the already shifted labels of its tokens, and the whole rows' example lengths."""
    labels = batch["labels"]
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    width = labels.shape[1] // size
    part = slice(rank * width, (rank + 1) * width)
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "position_ids")}
    out.update(
        input_ids=batch["input_ids"][:, part],
        position_ids=batch["position_ids"][:, part],
        shift_labels=shifted[:, part],
    )
    return out


class _Exchange(torch.autograd.Function):
    """all-to-all of a ``(group size, ...)`` tensor: part i goes to worker i. Its own inverse, so the
    backward pass is the same exchange of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # noqa: D401 - autograd signature
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _Exchange.apply(grad.contiguous(), ctx.group), None


def tokens_to_heads(x: torch.Tensor, sp: SequenceGroup) -> torch.Tensor:
    """(batch, heads, my tokens, dim) -> (batch, my heads, all tokens, dim)."""
    b, h, t, d = x.shape
    parts = x.reshape(b, sp.size, h // sp.size, t, d).permute(1, 0, 2, 3, 4)
    out = _Exchange.apply(parts.contiguous(), sp.group)  # (source worker = token slice, b, h/sp, t, d)
    return out.permute(1, 2, 0, 3, 4).reshape(b, h // sp.size, sp.size * t, d)


def heads_to_tokens(x: torch.Tensor, sp: SequenceGroup) -> torch.Tensor:
    """(batch, all tokens, my heads, dim) -> (batch, my tokens, heads, dim)."""
    b, t, h, d = x.shape
    parts = x.reshape(b, sp.size, t // sp.size, h, d).permute(1, 0, 2, 3, 4)
    out = _Exchange.apply(parts.contiguous(), sp.group)  # (source worker = head group, b, t/sp, h, d)
    return out.permute(1, 2, 0, 3, 4).reshape(b, t // sp.size, sp.size * h, d)


class _Masks:
    """The whole rows' masks, built once per forward pass and layer kind (window) from the example
    lengths, and reused by every layer. Keyed by the lengths tensor itself (held, so never confused
    with a new tensor at a recycled address)."""

    def __init__(self) -> None:
        self.key: torch.Tensor | None = None
        self.made: dict[tuple[str, int | None], Any] = {}

    def get(self, kind: str, cu: torch.Tensor, batch: int, width: int, window: int | None, dtype) -> Any:
        if self.key is not cu:
            self.key, self.made = cu, {}
        if (kind, window) not in self.made:
            self.made[kind, window] = _mask(kind, cu, batch, width, window, dtype)
        return self.made[kind, window]


def _mask(kind: str, cu: torch.Tensor, batch: int, width: int, window: int | None, dtype) -> Any:
    if kind == "segments":  # (start, end) of every example in the flattened rows, read once per forward
        bounds = cu.tolist()
        return list(zip(bounds[:-1], bounds[1:], strict=True))
    flat = torch.arange(batch * width, device=cu.device)
    doc = torch.searchsorted(cu[1:].to(torch.long), flat, right=True).view(batch, width)
    if kind == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def allowed(b, h, q, k):
            keep = (doc[b, q] == doc[b, k]) & (k <= q)
            return keep & (q - k < window) if window else keep

        return create_block_mask(allowed, batch, None, width, width, device=cu.device)
    q = torch.arange(width, device=cu.device)
    keep = (doc[:, :, None] == doc[:, None, :]) & (q[None, None, :] <= q[None, :, None])
    if window:
        keep &= (q[:, None] - q[None, :] < window)[None]
    keep = keep[:, None]  # (batch, 1, width, width), additive for eager
    return torch.zeros(keep.shape, dtype=dtype, device=cu.device).masked_fill_(~keep, torch.finfo(dtype).min)


def register(sp: SequenceGroup, core: str) -> str:
    """Make ``attn_implementation=NAME`` run ``core`` over whole rows split across ``sp``; returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    masks = _Masks()

    def ulysses_attention(module, query, key, value, attention_mask, **kwargs):
        cu = kwargs.pop("cu_seq_lens_q", None)
        longest = kwargs.pop("max_length_q", None)
        for k in ("cu_seq_lens_k", "max_length_k", "position_ids"):
            kwargs.pop(k, None)
        if cu is None:
            raise RuntimeError(f"{NAME} needs the whole rows' example lengths (shard_batch) with every forward")
        kv_heads = key.shape[1]
        if kv_heads < sp.size:  # each worker needs a key/value head: replicate them (MQA, small GQA)
            key, value = (x.repeat_interleave(sp.size // kv_heads, dim=1) for x in (key, value))
        q, k, v = (tokens_to_heads(x, sp) for x in (query, key, value))
        groups = getattr(module, "num_key_value_groups", None)
        if groups is not None:
            module.num_key_value_groups = q.shape[1] // k.shape[1]
        try:
            batch, width = q.shape[0], q.shape[2]
            window = kwargs.get("sliding_window")
            if core in ("flash_attention_2", "flash_attention_3", "distsft_varlen"):
                lengths = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
                out, weights = ALL_ATTENTION_FUNCTIONS[core](module, q, k, v, None, **lengths, **kwargs)
            elif core == "sdpa":
                segments = masks.get("segments", cu, batch, width, None, None)
                out, weights = _sdpa_by_example(module, q, k, v, segments, width, kwargs), None
            else:
                mask = masks.get(core, cu, batch, width, window, q.dtype)
                run = _eager(module) if core == "eager" else ALL_ATTENTION_FUNCTIONS[core]
                out, weights = run(module, q, k, v, mask, **kwargs)
        finally:
            if groups is not None:
                module.num_key_value_groups = groups
        return heads_to_tokens(out, sp), weights

    AttentionInterface.register(NAME, ulysses_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)  # no mask: the lengths come as kwargs
    return NAME


def _sdpa_by_example(module: Any, q, k, v, segments: list[tuple[int, int]], width: int, kwargs: dict) -> torch.Tensor:
    """sdpa over each example of the gathered rows on its own: causal, with the layer's window where the
    example is longer than it. No mask of the row's square exists (at 128k tokens one would take 64 GiB),
    nothing is computed across examples, and a window's mask is cut into blocks."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = kwargs.pop("sliding_window", None)
    outs = []
    for start, end in segments:
        b, s, e = start // width, start % width, start % width + (end - start)
        if not window or e - s <= window:
            part = (x[b : b + 1, :, s:e] for x in (q, k, v))
            out, _ = sdpa_attention_forward(module, *part, None, is_causal=True, **kwargs)
            outs.append(out)  # (1, n, heads, dim)
            continue
        # Longer than the window: blocks of `window` queries, each over the keys its window reaches, so
        # no mask is bigger than window x 2 window (a 128k example with a 4k window: 32 MiB, not 32 GiB).
        for qs in range(s, e, window):
            qe, ks = min(qs + window, e), max(s, qs - window + 1)
            i, j = torch.arange(qs, qe, device=q.device), torch.arange(ks, qe, device=q.device)
            keep = (j[None, :] <= i[:, None]) & (i[:, None] - j[None, :] < window)
            mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, torch.finfo(q.dtype).min)
            out, _ = sdpa_attention_forward(
                module, q[b : b + 1, :, qs:qe], k[b : b + 1, :, ks:qe], v[b : b + 1, :, ks:qe], mask[None, None],
                is_causal=False, **kwargs,
            )  # fmt: skip
            outs.append(out)
    return torch.cat(outs, dim=1).view(q.shape[0], width, q.shape[1], -1)


def _eager(module: Any) -> Any:
    """The family's own eager attention (soft-capping and all), from the module that defines the layer."""
    for cls in type(module).__mro__:
        fn = getattr(inspect.getmodule(cls), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise ConfigError(f"{type(module).__name__} has no eager_attention_forward to run under sequence parallelism")
