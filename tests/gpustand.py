"""What a CPU can stand in for on the GPU path: PyTorch's varlen flash kernel (its contract: one 16-bit
dtype for q, k and v, cumulative lengths, a causal window) and a count of the operations that wait for a
CUDA device when they run there."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operations that, on a CUDA tensor, make the host wait for the device: reading a value back, or an
# output whose size depends on the data (a boolean mask, nonzero, unique).
SYNCING = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


class HostSyncs(TorchDispatchMode):
    """Counts the operations in ``SYNCING`` (and indexing by a boolean mask) that run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and (func in SYNCING or _bool_index(func, args)):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def pause(self):
        self.paused, was = True, self.paused
        try:
            yield
        finally:
            self.paused = was


def _bool_index(func, args) -> bool:
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))


class ReferenceVarlen:
    """``torch.nn.attention.varlen.varlen_attn`` on a CPU (sdpa per sequence), refusing what the flash kernel
    refuses; it records the dtypes it was given. ``syncs``: a ``HostSyncs`` not to count its own host reads
    (the real kernel takes the lengths on the device)."""

    def __init__(self, syncs: HostSyncs | None = None) -> None:
        self.dtypes: list[tuple[torch.dtype, ...]] = []
        self.syncs = syncs

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        self.dtypes.append((q.dtype, k.dtype, v.dtype))
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(
                f"varlen_attn: q, k, v must share one 16-bit dtype (got {q.dtype}, {k.dtype}, {v.dtype})"
            )
        with self.syncs.pause() if self.syncs else contextlib.nullcontext():
            bounds = cu_q.tolist()
            out = torch.empty_like(q)
            groups = q.shape[1] // k.shape[1]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
                ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
                n = b - a
                i = torch.arange(n)
                mask = i[None, :] <= i[:, None]
                if window_size[0] >= 0:
                    mask &= i[:, None] - i[None, :] <= window_size[0]
                out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1)
        return out
