"""What checkpoint safety costs: checksums on a save, the restricted unpickler and checksum check on a
resume, the same on an export, and the manifest's signature.

    .venv/bin/python benchmarks/checkpoint_safety.py [--layers 8] [--hidden 1024] [--repeats 3]

One ``--local`` run of one step (ZeRO-2, fp32, one process) writes a checkpoint of a random-init Llama
(about 110M parameters with the defaults: 1.3 GiB with Adam's moments). Then, on that checkpoint:
``resume``: every file a resume reads, through ``torch.load`` as DeepSpeed's engine calls it (a full
unpickler) against ``no_code_from_checkpoints`` (PyTorch's restricted one), plus the sha256 check;
``export``: ``distsft export``'s consolidation with and without the restricted unpickler; ``sign``:
HMAC of the manifest and its check. Medians of ``--repeats``; the page cache is warm for both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.memory import make_model  # noqa: E402
from distsft.checkpoint import auth, export, find_latest, read_manifest  # noqa: E402
from distsft.checkpoint import store as store_mod  # noqa: E402
from distsft.checkpoint.safe_load import no_code_from_checkpoints  # noqa: E402
from distsft.config import load_config  # noqa: E402
from distsft.launcher.run import launch_local  # noqa: E402


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="distsft-ckpt-safety-"))
    try:
        params = make_model(work / "model", args.layers, args.hidden)
        hashing = []
        real_digests = store_mod._digests

        def timed_digests(*a, **k):
            t0 = time.perf_counter()
            try:
                return real_digests(*a, **k)
            finally:
                hashing.append(time.perf_counter() - t0)

        cfg = load_config(
            None,
            [
                f"output_dir={work / 'run'}",
                f"model.path={work / 'model'}",
                "model.tokenizer=demo",
                "train.micro_batch_size=1",
                "data.eval_fraction=0",
                "data.max_seq_len=256",
                "train.max_steps=1",
                "train.zero_stage=2",
                "checkpoint.every_steps=1",
                "checkpoint.final=false",
                "logging.plot=false",
                "logging.tensorboard=false",
            ],
        )
        saves = []
        real_save = store_mod.save

        def timed_save(*a, **k):
            t0 = time.perf_counter()
            try:
                return real_save(*a, **k)
            finally:
                saves.append(time.perf_counter() - t0)

        with mock.patch.object(store_mod, "_digests", timed_digests), mock.patch("distsft.checkpoint.save", timed_save):
            launch_local(cfg, quiet=True)
        ckpt = find_latest(work / "run" / "checkpoints")
        manifest = read_manifest(ckpt)
        size = sum(manifest["files"].values())
        files = sorted(Path(ckpt).rglob("*.pt"))
        print(f"model: {params / 1e6:.0f}M parameters; checkpoint {size / 2**30:.2f} GiB in {len(files)} files")
        if saves and hashing:
            print(f"save: {saves[-1]:.2f} s, of which sha256 + fsync of the files {sum(hashing):.2f} s "
                  f"({100 * sum(hashing) / saves[-1]:.0f}%)")  # fmt: skip

        def load_all(safe: bool) -> None:
            ctx = no_code_from_checkpoints() if safe else contextlib.nullcontext()
            with ctx:
                for f in files:
                    torch.load(f, map_location="cpu", weights_only=False)  # as DeepSpeed's engine asks

        full = median_s(lambda: load_all(False), args.repeats)
        restricted = median_s(lambda: load_all(True), args.repeats)
        check = median_s(lambda: store_mod.verify(Path(ckpt), manifest, ckpt), args.repeats)
        print(f"resume reads: full unpickler {full:.2f} s, restricted {restricted:.2f} s "
              f"({restricted - full:+.2f} s); sha256 check {check:.2f} s")  # fmt: skip

        def run_export(safe: bool) -> None:
            out = work / f"export-{safe}"
            shutil.rmtree(out, ignore_errors=True)
            if safe:
                export.export(ckpt, out)
            else:  # as before: a full unpickler, no checksums
                with (
                    mock.patch.object(export, "no_code_from_checkpoints", contextlib.nullcontext),
                    mock.patch.object(store_mod, "verify", lambda *a, **k: None),
                ):
                    export.export(ckpt, out)

        plain = median_s(lambda: run_export(False), args.repeats)
        safe = median_s(lambda: run_export(True), args.repeats)
        print(f"export: full unpickler, no checksums {plain:.2f} s; restricted + sha256 {safe:.2f} s "
              f"({safe - plain:+.2f} s)")  # fmt: skip

        text = json.dumps(manifest)
        sign = median_s(lambda: [auth.sign(json.loads(text)) for _ in range(100)], args.repeats) / 100
        verify = median_s(lambda: [auth.problem(json.loads(text)) for _ in range(100)], args.repeats) / 100
        print(f"manifest signature ({len(text)} bytes): sign {sign * 1e3:.2f} ms, check {verify * 1e3:.2f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
