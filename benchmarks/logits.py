"""What computing logits only at supervised positions saves: one forward + backward, full vs selected.

    .venv/bin/python benchmarks/logits.py [--vocab 128256] [--hidden 256] [--seq 1024] [--supervised 0.4]

The output projection and the fp32 cross-entropy cost ``tokens x vocab``; prompt tokens need hidden
states but no logits. The gain grows with the vocabulary (Llama 3: 128k) and the prompt share of the data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from distsft.data.tokenize import IGNORE_INDEX  # noqa: E402
from distsft.training import loss as loss_mod  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--supervised", type=float, default=0.4, help="share of tokens with a label")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device)
    ids = torch.randint(0, args.vocab, (1, args.seq), device=device)
    labels = ids.clone()
    # examples of 128 tokens whose first (1 - supervised) share is prompt
    for start in range(0, args.seq, 128):
        labels[0, start : start + int(128 * (1 - args.supervised))] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}

    def run(select: bool) -> tuple[float, float, float]:
        loss_mod.selects_logits = (lambda m: True) if select else (lambda m: False)
        times = []
        for i in range(args.repeats + 1):
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = loss_mod.token_loss_sum(model, batch).loss_sum
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first run warms up
                times.append(time.perf_counter() - t0)
        mem = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
        return sorted(times)[len(times) // 2], loss.item(), mem

    full = run(False)
    sel = run(True)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{device}: Llama {n_params / 1e6:.0f}M params, vocab {args.vocab}, {args.seq} tokens, "
        f"{args.supervised:.0%} supervised"
    )
    for name, (sec, loss, mem) in (("full logits:    ", full), ("selected logits:", sel)):
        peak = f"  peak {mem:.0f} MiB" if device == "cuda" else ""
        print(f"{name} {sec * 1000:8.1f} ms  summed loss {loss:.3f}{peak}")
    print(f"speed-up {full[0] / sel[0]:.2f}x")


if __name__ == "__main__":
    main()
