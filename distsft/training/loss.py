"""The SFT objective, shared by training and evaluation.

Three ways to the same number, fastest first:

- ``fused``: the output projection and the cross-entropy in one pass over chunks of the supervised
  positions (the idea of Liger's fused linear cross-entropy, in plain PyTorch): a chunk's logits exist
  only while its loss and its gradients are computed, in the forward pass. With a 128k vocabulary the
  fp32 logits of a batch are the largest activation of a step (10k supervised tokens: 5 GB); here they
  never exist whole. It needs the whole output weight on the rank (ZeRO stages 0-2).
- ``chunked``: the model's own logits at the supervised positions (what ZeRO-3 can gather), with the
  fp32 upcast, softmax and gradient done chunk by chunk, recomputed in the backward pass.
- ``plain``: the model's logits at the supervised positions and one cross-entropy call.

All of them compute logits only where the next token is supervised: prompt tokens need hidden states
(later tokens attend to them) but no logits. ``train.cross_entropy: auto`` picks one before the run from
what is known then (``choose_loss_kernel``); no forward pass is spent on trying them.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from distsft.data.tokenize import IGNORE_INDEX

CHUNK_TOKENS = 2048
"""Supervised positions per chunk: 2048 x 128k fp32 logits is 1 GiB at a time."""

LossKernel = Literal["fused", "chunked", "plain"]

PLAIN_LOGITS_SHARE = 1 / 32
"""``auto`` keeps the plain loss while a micro-batch's fp32 logits and their gradient stay under this share
of the device's memory: there the one cross-entropy call is the fastest (CPU, vocabulary 3k, 8 x 512
tokens: plain 1.07 s per step, fused 1.19 s); above it the logits would be the largest activation."""


@dataclass(frozen=True)
class LossChoice:
    kernel: LossKernel
    why: str
    """Said on the engine line, so a run shows what it chose and on what grounds."""


def choose_loss_kernel(
    requested: str,
    *,
    zero_stage: int,
    compiled: bool,
    tokens_per_micro_batch: int,
    vocab_size: int,
    device_memory: int,
    head_fusable: bool,
) -> LossChoice:
    """``train.cross_entropy``, or for ``auto`` the kernel that fits what is known before the first step:
    ZeRO-3 shards the output layer (the fused loss needs it whole) and compiled graphs take the model's own
    logits, so both get ``chunked``; logits that are small against the memory at hand get ``plain``; large
    ones ``fused`` where the output layer is a plain bias-free projection whose output the model does not
    rescale, else ``chunked``."""
    if requested != "auto":
        return LossChoice(requested, "as configured")  # type: ignore[arg-type]
    if zero_stage == 3:
        return LossChoice("chunked", "ZeRO-3 shards the output layer")
    if compiled:
        return LossChoice("chunked", "train.compile")
    logits = tokens_per_micro_batch * vocab_size * 4 * 2  # fp32 logits and their gradient
    if logits <= device_memory * PLAIN_LOGITS_SHARE:
        return LossChoice("plain", f"logits of a micro-batch {_mib(logits)} of {_mib(device_memory)}")
    if head_fusable:
        return LossChoice("fused", f"logits of a micro-batch would be {_mib(logits)}")
    return LossChoice("chunked", "the model rescales or biases its logits after the output layer")


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def head_fusable(model: Any, rescales_logits: bool) -> bool:
    """Whether the fused loss computes this model's loss: its logits are exactly a bias-free output layer's
    (plus the final soft-capping the fused loss applies itself)."""
    head = output_head(model)
    return head is not None and getattr(head, "bias", None) is None and not rescales_logits


class LossParts(NamedTuple):
    loss_sum: torch.Tensor
    """Summed next-token cross-entropy over the supervised tokens (fp32)."""
    tokens: torch.Tensor
    """How many tokens it sums over (a device tensor: reading it is the caller's choice of host sync)."""
    aux: torch.Tensor | None
    """The router's load-balancing loss of this forward (a mean over its tokens), when asked for."""


def token_loss_sum(
    model: Any,
    batch: dict[str, Any],
    router_loss: bool = False,
    mode: str = "plain",
    compute_dtype: torch.dtype | None = None,
) -> LossParts:
    """Summed next-token cross-entropy over supervised tokens, their count, and the router loss if asked.

    A sum, not a mean: the caller divides by the supervised-token count of the whole optimizer step (or
    eval set), which is what makes the loss independent of how rows are packed, batched or sharded.
    Labels are shifted here (Hugging Face convention: ``labels`` align with ``input_ids``), unless the batch
    brings ``shift_labels`` (already shifted, aligned with the logits). A model's
    final-logit soft-capping (Gemma-2) applies to exactly the logits computed. ``compute_dtype`` is what the
    fused loss's matmuls run in (bf16 under autocast, where the weights are fp32); default: the weights'.
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    if router_loss:
        inputs["output_router_logits"] = True
    shifted = batch.get("shift_labels")  # a sequence-parallel slice comes with its labels already shifted
    if shifted is None:
        shifted = torch.full_like(batch["labels"], IGNORE_INDEX)
        shifted[:, :-1] = batch["labels"][:, 1:]
    positions = shifted != IGNORE_INDEX  # where the next token is supervised
    if not selects_logits(model):
        out = model(**inputs, use_cache=False)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), shifted.flatten(), reduction="sum")
        return LossParts(loss, positions.sum(), getattr(out, "aux_loss", None) if router_loss else None)
    target = shifted[positions]
    if mode == "fused":
        head = output_head(model)
        with _capture_head_input(head) as hidden:
            out = model(**inputs, use_cache=False, logits_to_keep=positions)
        softcap = getattr(_text_config(model), "final_logit_softcapping", None)
        loss = fused_linear_cross_entropy(hidden[0], head.weight, target, softcap=softcap, compute_dtype=compute_dtype)
    else:
        out = model(**inputs, use_cache=False, logits_to_keep=positions)  # (supervised, vocab)
        loss = chunked_cross_entropy(out.logits, target) if mode == "chunked" else _ce(out.logits, target)
    return LossParts(loss, positions.sum(), getattr(out, "aux_loss", None) if router_loss else None)


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, reduction="sum")


def chunked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """The fp32 upcast, log-softmax and its gradient for ``chunk`` rows at a time, recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    if logits.shape[0] == 0:  # nothing supervised here (a sequence-parallel slice of prompt): still a graph
        return _ce(logits, target)
    total = logits.new_zeros((), dtype=torch.float32)
    for s in range(0, logits.shape[0], chunk):
        total = total + checkpoint(_ce, logits[s : s + chunk], target[s : s + chunk], use_reentrant=False)
    return total


class _FusedLinearCE(torch.autograd.Function):
    """loss = sum CE(softcap(hidden @ weight.T), target); gradients are computed in the forward pass,
    chunk by chunk, so no chunk's logits outlive it (the backward only scales them)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk, softcap, compute_dtype):  # noqa: D401 - autograd signature
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(compute_dtype)  # once per call: the weights are fp32 under autocast
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk].to(compute_dtype), target[s : s + chunk]
            z = (h @ w.T).float()
            if softcap:
                capped = torch.tanh(z / softcap)
                z = capped * softcap
            lse = torch.logsumexp(z, dim=-1)
            loss += (lse - z.gather(1, t[:, None]).squeeze(1)).sum()
            g = torch.exp(z - lse[:, None])  # softmax: d loss / d logits, less the one-hot below
            g[torch.arange(len(t), device=g.device), t] -= 1.0
            if softcap:
                g *= 1.0 - capped * capped
            if grad_h is not None:
                grad_h[s : s + chunk] = (g.to(compute_dtype) @ w).to(hidden.dtype)
            if grad_w is not None:  # accumulated in fp32 across chunks, like one matmul's accumulator
                if compute_dtype == torch.float32:
                    grad_w.addmm_(g.T, h)
                else:
                    grad_w += (g.T.to(compute_dtype) @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    softcap: float | None = None,
    chunk: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    dtype = compute_dtype or weight.dtype
    return _FusedLinearCE.apply(hidden, weight, target, chunk or CHUNK_TOKENS, softcap, dtype)


def output_head(model: Any) -> Any:
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return module.get_output_embeddings()


def _text_config(model: Any) -> Any:
    from distsft.model.traits import text_config

    return text_config(getattr(model, "module", model).config)


class _capture_head_input:
    """While active, the output layer hands its input (the hidden states at the selected positions) to the
    caller and computes logits for none of them, so the fused loss can take over."""

    def __init__(self, head: Any) -> None:
        self.head, self.hidden, self.handle = head, [], None

    def __enter__(self) -> list[torch.Tensor]:
        def take(module, args):
            self.hidden.append(args[0])
            return (args[0][..., :0, :],)

        self.handle = self.head.register_forward_pre_hook(take)
        return self.hidden

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def selects_logits(model: Any) -> bool:
    """Whether the model takes a boolean ``logits_to_keep`` mask (transformers models that slice through
    ``slice_logits_to_keep``, which recent releases use for nearly every causal LM)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return _selects_logits(type(module))


@functools.cache
def _selects_logits(cls: type) -> bool:
    if "logits_to_keep" not in inspect.signature(cls.forward).parameters:
        return False
    # Older releases (and a few models) slice with ``hidden[:, slice]``, which takes no boolean mask.
    return hasattr(inspect.getmodule(cls), "slice_logits_to_keep")
