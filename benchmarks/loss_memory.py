"""What the loss kernels cost beyond the hidden states: peak memory and time of loss + backward alone.

    .venv/bin/python benchmarks/loss_memory.py [--vocab 128256] [--hidden 2048] [--tokens 8192] [--weights fp32]

The output layer's weight is fp32 under autocast (``model.dtype: auto`` on one GPU) or bf16; the hidden
states are bf16 under autocast. ``fused`` never holds a whole micro-batch's logits: its extra memory is a
chunk's logits (``loss.FUSED_CHUNK_LOGITS``), the weight's fp32 gradient and one bf16 copy of the weight.
On a GPU the peak is the CUDA allocator's; on a CPU only the time is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from distsft.training import loss as loss_mod  # noqa: E402


def measure(mode: str, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(seconds, peak MiB above what was allocated before) of one loss + backward."""
    cuda = hidden.is_cuda
    weight.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    h = hidden.detach().requires_grad_()
    if mode == "fused":
        loss = loss_mod.fused_linear_cross_entropy(h, weight, target, compute_dtype=torch.bfloat16)
    else:
        with torch.autocast(h.device.type, dtype=torch.bfloat16):
            logits = h @ weight.T
        loss = loss_mod.chunked_cross_entropy(logits, target) if mode == "chunked" else loss_mod._ce(logits, target)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    ap.add_argument("--vocab", type=int, default=128256 if gpu else 16384)
    ap.add_argument("--hidden", type=int, default=2048 if gpu else 256)
    ap.add_argument("--tokens", type=int, default=8192 if gpu else 1024, help="supervised tokens of a micro-batch")
    ap.add_argument("--weights", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.float32 if args.weights == "fp32" else torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
    hidden = torch.randn(args.tokens, args.hidden, generator=g).to(device, torch.bfloat16)
    target = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    weight_mib = args.vocab * args.hidden * weight.element_size() / 2**20
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"{name}: vocab {args.vocab}, hidden {args.hidden}, {args.tokens} supervised tokens, {args.weights} "
          f"output weight ({weight_mib:.0f} MiB); a micro-batch's fp32 logits: {logits_mib:.0f} MiB")  # fmt: skip
    print(f"{'loss':<10}{'ms':>10}{'peak MiB':>12}")
    for mode in ("fused", "chunked", "plain"):
        runs = [measure(mode, hidden, weight, target) for _ in range(args.repeats)]
        seconds = sorted(r[0] for r in runs)[len(runs) // 2]
        print(f"{mode:<10}{seconds * 1e3:>10.1f}{max(r[1] for r in runs):>12.0f}", flush=True)


if __name__ == "__main__":
    main()
