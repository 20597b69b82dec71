"""Atomic, resumable checkpoints of DeepSpeed engines, and their consolidation into a HF directory.

A checkpoint counts only once it is complete: every rank writes its shards into ``.tmp-step-N``; after
a barrier, rank 0 writes ``MANIFEST.json`` (every file and its size) and fsyncs it, renames the
directory to ``step-N``, and only then moves the ``latest`` pointer with an atomic replace. Loading
trusts nothing else: ``latest`` is checked against its manifest, and when it is missing or wrong the
newest ``step-*`` directory whose manifest matches its files wins. A crash mid-save therefore leaves
only a ``.tmp-*`` directory, which is ignored and cleaned up by the next save. DeepSpeed's own
``latest`` file (written without any of this) is never created or read.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from distsft.errors import ConfigError

PREFIX = "step-"
MANIFEST = "MANIFEST.json"
LATEST = "latest"
DS_TAG = "ds"
HF_DIR = "hf"  # model config, generation config and tokenizer: what export needs besides the weights


# --- layout and validation -------------------------------------------------------------------------
def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    """The manifest if ``ckpt`` is complete (every listed file present with its size), else None."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        for rel, size in manifest["files"].items():
            if (ckpt / rel).stat().st_size != size:
                return None
        return manifest
    except (OSError, ValueError, KeyError):
        return None


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``; the pointer is a hint, the manifests decide."""
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if read_manifest(candidate) is not None:
            newer = [d for d in _step_dirs(root) if d.name > candidate.name and read_manifest(d) is not None]
            return newer[-1] if newer else candidate
    for d in reversed(_step_dirs(root)):
        if read_manifest(d) is not None:
            return d
    return None


def _step_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.glob(f"{PREFIX}*") if d.is_dir())


def resolve(path: str | Path) -> Path:
    """A user-given checkpoint: a ``step-N`` directory, or a run/checkpoints directory (its latest)."""
    p = Path(path).expanduser()
    for candidate in (p, p / "checkpoints"):
        if read_manifest(candidate) is not None:
            return candidate
        latest = find_latest(candidate)
        if latest is not None:
            return latest
    if not p.exists():
        raise ConfigError(f"checkpoint {p}: no such directory")
    raise ConfigError(f"checkpoint {p}: no complete checkpoint there (no valid {MANIFEST})")


# --- save --------------------------------------------------------------------------------------------
def save(
    engine: Any,
    root: Path,
    step: int,
    meta: dict[str, Any],
    keep_last: int,
    hf_parts: list[Any],
    frozen_base: bool = False,
) -> Path:
    """Collective: every rank calls it. ``hf_parts`` (config, tokenizer, ...) are saved by rank 0. With a
    frozen base (LoRA) only what trains is saved: the base comes from ``model.path`` again on resume."""
    import torch.distributed as dist

    rank = dist.get_rank()
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(
        str(tmp), tag=DS_TAG, client_state={"step": step}, save_latest=False, exclude_frozen_parameters=frozen_base
    )
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(_rng_state()))
    os.sync()  # each rank makes its own shards durable before rank 0 vouches for them
    _maybe_die_in_save(step)
    dist.barrier()
    if rank == 0:
        for part in hf_parts:
            part.save_pretrained(tmp / HF_DIR)
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        manifest = {"step": step, "world_size": dist.get_world_size(), "files": files, "created": time.time(), **meta}
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # a rerun with resume: never, overwriting its own old step
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, final.name)
        _purge(root, keep_last, keep=final)
    dist.barrier()
    return final


def _maybe_die_in_save(step: int) -> None:
    """Crash injection for tests: ``DISTSFT_KILL_IN_SAVE=STEP`` SIGKILLs this process after its shards of
    that step are written and before the manifest exists: the worst moment for a crash."""
    if os.environ.get("DISTSFT_KILL_IN_SAVE") == str(step):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _purge(root: Path, keep_last: int, keep: Path) -> None:
    """Old complete checkpoints beyond ``keep_last`` and leftovers of crashed saves; never ``keep``."""
    complete = [d for d in _step_dirs(root) if read_manifest(d) is not None]
    for d in complete[:-keep_last]:
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)


# --- load --------------------------------------------------------------------------------------------
def load(engine: Any, ckpt: Path, frozen_base: bool = False) -> int:
    """Restore weights, optimizer, LR schedule and this rank's RNG; returns the step to continue after.

    DeepSpeed's optimizer shards are pickles (``torch.load(weights_only=False)`` inside DeepSpeed); they
    are only ever read from a checkpoint whose manifest this run validated, written by distsft itself.
    """
    import torch.distributed as dist

    path, client = engine.load_checkpoint(
        str(ckpt),
        tag=DS_TAG,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_strict=not frozen_base,  # a LoRA checkpoint holds no frozen base weights
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
    rng = ckpt / f"rng-rank{dist.get_rank()}.json"
    if rng.is_file():
        _set_rng_state(json.loads(rng.read_text()))
    return int(client["step"])


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# --- resume decisions (driver and workers) ----------------------------------------------------------------
# Keys whose change makes a resumed run differ from an uninterrupted one (data order, batch, schedule).
CONTINUATION_KEYS = [
    "model.path",
    "model.tokenizer",
    "model.quantization",
    "lora",
    "data",
    "train.max_steps",
    "train.epochs",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.lr",
    "train.min_lr_ratio",
    "train.warmup_steps",
    "train.weight_decay",
    "train.adam_betas",
    "train.seed",
    "train.zero_stage",
    "train.router_aux_loss_coef",
]
IGNORED_DATA_KEYS = ("num_proc", "cache_dir", "on_error")


def pick_resume(mode: str, root: Path, run_id: str) -> Path | None:
    """Which checkpoint a run starts from. A checkpoint of this very run (a worker-group restart after a
    failure) always wins; otherwise ``checkpoint.resume`` decides."""
    latest = find_latest(root)
    if latest is not None and (read_manifest(latest) or {}).get("run_id") == run_id:
        return latest
    if mode == "never":
        return None
    if mode == "auto":
        return latest
    return resolve(mode)


def check_continuation(
    manifest: dict[str, Any], config: dict[str, Any], world_size: int, data_fingerprint: str, allow: bool
) -> list[str]:
    """Differences between the checkpoint's run and this one; raises unless ``allow`` (world size always)."""
    if manifest.get("world_size") != world_size:
        raise ConfigError(
            f"the checkpoint was written by {manifest.get('world_size')} workers and this run has {world_size}; "
            "ZeRO shards are split per worker, so resume with the same number of workers, or export the "
            "checkpoint (`distsft export RUN_DIR`) and start a new run from it with a fresh optimizer"
        )
    old = manifest.get("config", {})
    diffs = []
    for key in CONTINUATION_KEYS:
        a, b = _get(old, key), _get(config, key)
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if k not in IGNORED_DATA_KEYS and a.get(k) != b.get(k):
                    diffs.append(f"data.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    if manifest.get("data_fingerprint") and manifest["data_fingerprint"] != data_fingerprint:
        diffs.append("the prepared data differs (files, tokenizer or data config changed)")
    if diffs and not allow:
        raise ConfigError(
            "this run's config differs from the checkpoint's in ways that change the continuation:\n  "
            + "\n  ".join(diffs)
            + "\nset checkpoint.allow_changes=true to resume anyway, or checkpoint.resume=never to start over"
        )
    return diffs


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d
