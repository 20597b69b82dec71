"""Prepare throughput: N generated conversations through the whole data pipeline, then the cached re-run.

    .venv/bin/python benchmarks/prepare.py [--rows 100000] [--num-proc 2] [--max-seq-len 1024]

Prints rows/s and tokens/s for the first (uncached) prepare, and the time of the second (cache hit).
The rows are recombined from the bundled demo (random system prompts, 1-3 exchanges, mixed formats), so
lengths and scripts vary like real SFT data.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distsft.config import DataConfig, ModelConfig  # noqa: E402
from distsft.data.prepare import prepare  # noqa: E402
from distsft.data.sources import DEMO_DATA  # noqa: E402
from distsft.model import load_tokenizer  # noqa: E402


def generate(path: Path, n: int, seed: int = 0) -> None:
    demo = [json.loads(x)["messages"] for x in DEMO_DATA.read_text().splitlines()]
    systems = sorted({m[0]["content"] for m in demo if m[0]["role"] == "system"})
    pairs = [
        (m[i]["content"], m[i + 1]["content"])
        for m in demo
        for i in range(len(m) - 1)
        if m[i]["role"] == "user" and m[i + 1]["role"] == "assistant"
    ]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            turns = [{"role": "system", "content": rng.choice(systems)}] if rng.random() < 0.3 else []
            for q, a in rng.sample(pairs, rng.choice([1, 1, 2, 3])):
                turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 4 == 3 and len(turns) == 2:  # some alpaca rows in the mix
                row = {"instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]}
            else:
                row = {"messages": turns}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    args = ap.parse_args()
    tok = load_tokenizer(ModelConfig(path="demo"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        t = time.perf_counter()
        generate(data, args.rows)
        print(f"generated {args.rows} rows ({data.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s")
        cfg = DataConfig(
            path=str(data), max_seq_len=args.max_seq_len, num_proc=args.num_proc, cache_dir=str(Path(tmp) / "cache")
        )
        t = time.perf_counter()
        first = prepare(cfg, tok, seed=0)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        again = prepare(cfg, tok, seed=0)
        warm = time.perf_counter() - t
        assert again.cache_hit and not first.cache_hit
        s = first.stats
        print(
            f"prepare ({args.num_proc} processes): {cold:.1f}s  {s.rows_read / cold:,.0f} rows/s  "
            f"{s.tokens / cold:,.0f} tokens/s"
        )
        print(
            f"  rows read {s.rows_read}, kept {s.kept}, too long {s.too_long}, tokens {s.tokens}, "
            f"supervised {s.supervised_tokens}, packed rows {s.packed_rows}, "
            f"packing efficiency {s.packing_efficiency:.1%}"
        )
        print(f"cached re-run: {warm:.3f}s")


if __name__ == "__main__":
    main()
