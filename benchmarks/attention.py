"""Attention over packed rows vs the same examples one by one, for each implementation distsft can pick.

    .venv/bin/python benchmarks/attention.py                       # CPU: sdpa and eager, short rows
    python benchmarks/attention.py --row 8192 --rows 2             # GPU: sdpa, flex_attention, varlen kernels

Packing is only worth it if attending within a packed row costs about what the examples cost alone. A
dense block-diagonal mask (sdpa, eager) computes the whole row x row square and throws most of it away;
a block-sparse mask (flex_attention) skips the empty blocks; varlen kernels (flash-attention, or
PyTorch's own ``varlen_attn``) never see anything but each example. The masks and kernels are the ones
training uses: transformers' masking utilities build them from the packed position ids, and the
attention functions are called through transformers' attention interface with a Llama attention layer's
shapes. Timed: forward + backward of one attention call (median of ``--repeats``), and its peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def example_lengths(total: int, seed: int, median: int) -> list[int]:
    """A long-tailed (log-normal) mix of example lengths that fills ``total`` tokens exactly."""
    rng = random.Random(seed)
    out: list[int] = []
    while sum(out) < total:
        out.append(max(8, min(total, int(rng.lognormvariate(math.log(median), 0.9)))))
    out[-1] -= sum(out) - total
    if out[-1] < 1:
        out.pop()
        out[-1] += total - sum(out)
    return out


def main() -> None:
    import torch
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from distsft.data.collate import collate
    from distsft.model.attention import register as register_varlen
    from distsft.model.traits import varlen

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", type=int, help="tokens per packed row (default 8192 on GPU, 1024 on CPU)")
    ap.add_argument("--rows", type=int, default=1, help="packed rows per batch")
    ap.add_argument("--median", type=int, help="median example length (default: row / 16)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--impl", nargs="*", help="implementations to time (default: every one this device runs)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    row = args.row or (8192 if cuda else 1024)
    median = args.median or row // 16
    register_varlen()
    impls = args.impl or (
        ["sdpa", "flex_attention", "distsft_varlen"] + (["flash_attention_2"] if _has("flash_attn") else [])
        if cuda
        else ["sdpa", "eager"]
    )
    rows = [example_lengths(row, seed=r, median=median) for r in range(args.rows)]
    all_lens = [n for lens in rows for n in lens]
    config = LlamaConfig(
        hidden_size=args.heads * args.head_dim,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_hidden_layers=1,
        vocab_size=8,
    )
    print(
        f"{device.type}: {args.rows} row(s) of {row} tokens holding {len(all_lens)} examples (median "
        f"{statistics.median(all_lens):.0f}, max {max(all_lens)}); {args.heads}/{args.kv_heads} heads x "
        f"{args.head_dim}, {str(dtype).removeprefix('torch.')}",
        flush=True,
    )

    class Layer(torch.nn.Module):  # what the attention functions read from the module
        def __init__(self) -> None:
            super().__init__()
            self.config, self.layer_idx, self.is_causal = config, 0, True
            self.num_key_value_groups = args.heads // args.kv_heads
            self.head_dim = args.head_dim

    layer = Layer()
    scaling = args.head_dim**-0.5

    def attend(impl: str, lengths_rows: list[list[int]]) -> float:
        """Median seconds of forward + backward of one attention call over these rows."""
        config._attn_implementation = impl
        width = sum(lengths_rows[0])
        batch_rows = [
            {"input_ids": [1] * sum(x), "labels": [1] * sum(x), "position_ids": [p for n in x for p in range(n)]}
            | {"seq_lens": x}
            for x in lengths_rows
        ]
        batch = collate(batch_rows, pad_id=0, varlen=varlen(impl))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        b = len(lengths_rows)
        embeds = torch.empty(b, width, 1, device=device, dtype=dtype)
        mask = create_causal_mask(config, embeds, None, None, position_ids=batch["position_ids"])
        fn = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        extra = {k: batch[k] for k in batch if k.startswith(("cu_seq", "max_length"))}
        q = torch.randn(b, args.heads, width, args.head_dim, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, args.kv_heads, width, args.head_dim, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(b, args.kv_heads, width, args.head_dim, device=device, dtype=dtype, requires_grad=True)
        times = []
        for i in range(args.repeats + 2):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out, _ = fn(layer, q, k, v, mask, scaling=scaling, dropout=0.0, **extra)
            out.float().sum().backward()
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:  # two warm-ups (compilation, autotuning)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    # The baseline: every example alone through sdpa's plain causal kernel (no mask: flash on a GPU).
    alone = sum(attend("sdpa", [[n]]) for n in all_lens)
    print(f"{'alone (sdpa)':>16}: {alone * 1e3:8.2f} ms for the {len(all_lens)} examples one by one", flush=True)
    results = {"alone_ms": alone * 1e3}
    for impl in impls:
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            packed = attend(impl, rows)
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        except Exception as e:  # noqa: BLE001 - one implementation failing must not hide the others
            print(f"{impl:>16}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            results[impl] = {"error": f"{type(e).__name__}: {e}"[:500]}
            continue
        results[impl] = {"packed_ms": packed * 1e3, "ratio": packed / alone, "peak_mb": peak}
        mem = f", peak {peak:,.0f} MiB" if peak is not None else ""
        print(f"{impl:>16}: {packed * 1e3:8.2f} ms packed, {packed / alone:5.2f}x the examples alone{mem}", flush=True)
    print(json.dumps({"device": device.type, "row": row, "rows": args.rows, "results": results}))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
