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
"""Supervised positions per chunk of the chunked loss: 2048 x 128k fp32 logits is 1 GiB at a time."""

FUSED_CHUNK_LOGITS = 2**27
"""Logits per chunk of the fused loss (512 MiB in fp32): its rows per chunk shrink as the vocabulary grows.
A chunk costs about 8 bytes per logit at its peak (the matmul's output, its fp32 copy turned into the
gradient in place, and that gradient in the compute dtype); beside it live the output layer's fp32
gradient and one compute-dtype copy of its weight (128k x 2048: 1 GiB and 0.5 GiB), and per chunk the
bf16 product that adds to that gradient with its fp32 copy. Measured on an H200 (vocabulary 128,256,
hidden 2048, fp32 weight, 8,192 supervised tokens; ``benchmarks/loss_memory.py``): fused 3.5 GiB above its
inputs, chunked 7.3 GiB, plain 14.2 GiB."""

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
    tokens: int
    """How many tokens it sums over (known on the host: the supervised positions are counted there)."""
    aux: torch.Tensor | None
    """The router's load-balancing loss of this forward (a mean over its tokens), when asked for."""


LOSS_INDEX, LOSS_TARGET = "loss_index", "loss_target"
"""Batch keys of ``add_loss_targets``: where the next token is supervised (flat positions) and that token."""


def add_loss_targets(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with the flat positions whose next token is supervised and those tokens, computed on the
    host (the input pipeline's thread), so the loss selects them on the device by ``index_select``: a
    boolean mask there has a data-dependent size, which waits for the device (a host sync per micro-batch)."""
    shifted = _shifted_labels(batch)
    index = (shifted.flatten() != IGNORE_INDEX).nonzero().flatten()
    return {**batch, LOSS_INDEX: index, LOSS_TARGET: shifted.flatten()[index]}


def _shifted_labels(batch: dict[str, Any]) -> torch.Tensor:
    """The next token of every position (Hugging Face convention: ``labels`` align with ``input_ids``), unless
    the batch brings ``shift_labels`` (a sequence-parallel slice: already shifted, aligned with the logits)."""
    shifted = batch.get("shift_labels")
    if shifted is None:
        shifted = torch.full_like(batch["labels"], IGNORE_INDEX)
        shifted[:, :-1] = batch["labels"][:, 1:]
    return shifted


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
    The supervised positions come from ``add_loss_targets`` (on the host, ahead of time; computed here,
    with a host sync, for a batch without them). A model's final-logit soft-capping (Gemma-2) applies to
    exactly the logits computed. ``compute_dtype`` is what the fused loss's matmuls run in (bf16 under
    autocast, where the weights are fp32); default: the weights'.
    """
    if LOSS_INDEX not in batch:
        batch = add_loss_targets(batch)
    index, target = batch[LOSS_INDEX], batch[LOSS_TARGET]
    skip = ("labels", "shift_labels", LOSS_INDEX, LOSS_TARGET)
    inputs = {k: v for k, v in batch.items() if k not in skip}
    if router_loss:
        inputs["output_router_logits"] = True
    tokens = index.numel()
    if not selects_logits(model):
        out = model(**inputs, use_cache=False)
        loss = _ce(out.logits.flatten(0, 1).index_select(0, index), target)
        return LossParts(loss, tokens, getattr(out, "aux_loss", None) if router_loss else None)
    head = output_head(model)
    # The output layer sees only the supervised positions' hidden states (prompt tokens need no logits);
    # logits_to_keep=0 keeps every position up to it, and the hook selects them with the host's index.
    with _select_head_input(head, index, take=mode == "fused") as hidden:
        out = model(**inputs, use_cache=False, logits_to_keep=0)
    if mode == "fused":
        softcap = getattr(_text_config(model), "final_logit_softcapping", None)
        loss = fused_linear_cross_entropy(hidden[0], head.weight, target, softcap=softcap, compute_dtype=compute_dtype)
    else:  # out.logits: (supervised, vocab)
        loss = chunked_cross_entropy(out.logits, target) if mode == "chunked" else _ce(out.logits, target)
    return LossParts(loss, tokens, getattr(out, "aux_loss", None) if router_loss else None)


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
            g = z.sub_(lse[:, None]).exp_()  # softmax, in place: d loss / d logits, less the one-hot below
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
    chunk = chunk or max(256, min(4 * CHUNK_TOKENS, FUSED_CHUNK_LOGITS // max(weight.shape[0], 1)))
    return _FusedLinearCE.apply(hidden, weight, target, chunk, softcap, dtype)


def output_head(model: Any) -> Any:
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return module.get_output_embeddings()


def _text_config(model: Any) -> Any:
    from distsft.model.traits import text_config

    return text_config(getattr(model, "module", model).config)


class _select_head_input:
    """While active, the output layer computes logits only for the hidden states at ``index`` (flat
    positions); with ``take``, it hands those hidden states to the caller and computes none (the fused
    loss takes over)."""

    def __init__(self, head: Any, index: torch.Tensor, take: bool) -> None:
        self.head, self.index, self.take, self.hidden, self.handle = head, index, take, [], None

    def __enter__(self) -> list[torch.Tensor]:
        def select(module, args):
            h = args[0].flatten(0, -2).index_select(0, self.index)
            if not self.take:
                return (h,)
            self.hidden.append(h)
            return (h[:0],)

        self.handle = self.head.register_forward_pre_hook(select)
        return self.hidden

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def selects_logits(model: Any) -> bool:
    """Whether the model's logits are its output layer applied to the hidden states it slices with
    ``logits_to_keep`` (``slice_logits_to_keep``, which recent releases use for nearly every causal LM), so
    the output layer may be handed only the supervised positions."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return _selects_logits(type(module))


@functools.cache
def _selects_logits(cls: type) -> bool:
    if "logits_to_keep" not in inspect.signature(cls.forward).parameters:
        return False
    # Models that slice through ``slice_logits_to_keep`` hand the output layer the (batch, seq, hidden) states
    # unchanged for ``logits_to_keep=0``; others (older releases, a few models) keep the full-logits path.
    return hasattr(inspect.getmodule(cls), "slice_logits_to_keep")
