"""Whether and from where a run continues, decided once, on the driver, before any worker starts.

The driver picks the checkpoint (``checkpoint.resume``: the latest, none, or a given one), checks that it
continues this run (no config change that alters the continuation unless allowed; another worker count
is resharded, ``reshard.py``) and hands the decision to the workers as a ``ResumePlan``. A worker only ever departs from
it for a checkpoint of its own run: a worker group that Ray restarts after a failure continues from the
latest checkpoint the failed group completed.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distsft.checkpoint import storage
from distsft.checkpoint.store import CorruptCheckpoint, Location, find_latest, read_manifest, resolve, verify
from distsft.errors import ConfigError


@dataclass(frozen=True)
class ResumePlan:
    run_id: str
    """New for every launch; recorded in every checkpoint this launch writes."""
    checkpoint: str | None = None
    """The checkpoint the launch continues from (validated), or None for a fresh start."""
    step: int = 0
    """The step that checkpoint saved (0 for a fresh start): the run continues after it."""
    data_fingerprint: str = ""
    engine_stage: int | str = 0
    """The engine's checkpoint layout (``DeepSpeedPlan.layout``)."""

    def manifest_meta(self) -> dict[str, Any]:
        """What every checkpoint of this launch records beside its files, and what resume compares."""
        return {"run_id": self.run_id, "data_fingerprint": self.data_fingerprint, "engine_stage": self.engine_stage}

    def for_worker(self, root: Location) -> Location | None:
        """Where a worker (re)starts: its own run's latest checkpoint when there is one (a restarted worker
        group), else the driver's choice."""
        latest = find_latest(root)
        if latest is not None and (read_manifest(latest) or {}).get("run_id") == self.run_id:
            return latest
        return self.checkpoint

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide_resume(
    mode: str,
    root: Location,
    config: dict[str, Any],
    world_size: int,
    data_fingerprint: str,
    engine_stage: int | str,
    allow_changes: bool,
    verify_files: bool = False,
) -> tuple[ResumePlan, list[str]]:
    """This launch's ``ResumePlan`` (``mode`` is ``checkpoint.resume``), and the config changes that were
    allowed; raises when the checkpoint cannot continue this run. With ``verify_files`` (a checkpoint on a
    disk this process reads whole anyway: one worker) every file is checked against its checksum first,
    and under ``auto`` a corrupt checkpoint is skipped, said in one line, for the newest intact one."""
    fresh = ResumePlan(uuid.uuid4().hex, data_fingerprint=data_fingerprint, engine_stage=engine_stage)
    skip: set[str] = set()
    while True:
        ckpt = None if mode == "never" else find_latest(root, skip) if mode == "auto" else resolve(mode)
        if ckpt is None:
            return fresh, []
        manifest = read_manifest(ckpt) or {}
        if not verify_files or storage.is_remote(ckpt):
            break
        try:
            verify(Path(ckpt), manifest, ckpt)
            break
        except CorruptCheckpoint as e:
            if mode != "auto":
                raise
            print(f"resume: skipped {storage.name(ckpt)}: {e.file} is corrupt (its sha256 differs from the manifest's)")
            skip.add(storage.name(ckpt))
    diffs = check_continuation(manifest, config, world_size, data_fingerprint, allow_changes)
    step = int(manifest.get("step") or 0)
    return ResumePlan(fresh.run_id, str(ckpt), step, data_fingerprint, engine_stage), diffs


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
    "train.global_batch_size",
    "train.lr",
    "train.min_lr_ratio",
    "train.warmup_steps",
    "train.warmup_ratio",
    "train.lr_scheduler",
    "train.adam_eps",
    "train.weight_decay",
    "train.adam_betas",
    "train.seed",
    "train.zero_stage",
    "train.router_aux_loss_coef",
]
IGNORED_DATA_KEYS = ("num_proc", "cache_dir", "on_error", "evals")  # evals: held out, never trained on


def check_continuation(
    manifest: dict[str, Any],
    config: dict[str, Any],
    world_size: int,
    data_fingerprint: str,
    allow: bool,
) -> list[str]:
    """Differences between the checkpoint's run and this one; raises unless ``allow``. Another worker count
    or engine layout is no difference by itself (the checkpoint is resharded, ``reshard.py``); the rows
    per step they imply are."""
    old = manifest.get("config", {})
    diffs = []
    was, now = rows_per_step(old, manifest.get("world_size")), rows_per_step(config, world_size)
    if was is not None and was != now:
        diffs.append(
            f"rows per step: {was} ({manifest.get('world_size')} workers) -> {now} ({world_size} workers); set "
            "train.global_batch_size so the batch does not depend on the worker count"
        )
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


def rows_per_step(config: dict[str, Any], world_size: int | None) -> int | None:
    """Rows per optimizer step of a run config (as a dict) on ``world_size`` workers: its batch plan's, or
    None where that cannot be known (no worker count recorded, or a config that no longer loads)."""
    from distsft.config import build_config

    if not world_size:
        return None
    try:
        return build_config(config, "<checkpoint config>").batch_plan(world_size).global_batch
    except ConfigError:
        return None


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d
