"""Resume a checkpoint on another number of workers, or under another ZeRO layout.

DeepSpeed's shards are cut per worker: rank r of N holds 1/N of the flattened fp32 weights and Adam
moments, padded to N's alignment. To continue on M workers the checkpoint is turned once into whole
tensors by parameter name (the layout of DeepSpeed's universal checkpoints: ``zero/<name>/fp32.pt``,
``exp_avg.pt``, ``exp_avg_sq.pt``, ``step.pt``), by DeepSpeed's own converter for ZeRO 1-3 shards, or
read straight from a one-worker engine without ZeRO, which holds them whole. Each rank of the new engine
then cuts its own partition from those tensors (``load_portable``), so the optimizer state carries over
exactly and the continuation is the run that would have been.

The converted tree lives beside the shards (``<checkpoint>/universal/``), written on the driver before
any worker starts and published like the checkpoint itself: built elsewhere, then moved into place (a
rename on a disk; in an object store every file first and ``universal/meta.json`` last), so a crash
leaves no half tree that counts. Later resumes of the same checkpoint reuse it.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from distsft.checkpoint import storage
from distsft.checkpoint.safe_load import no_code_from_checkpoints
from distsft.checkpoint.store import DS_TAG, Location, read_manifest, verify

UNIVERSAL = "universal"
META = "meta.json"
STATES = ("fp32", "exp_avg", "exp_avg_sq")


def needs_reshard(manifest: dict[str, Any], world_size: int, layout: int | str) -> bool:
    """A checkpoint whose shards this engine cannot load as they are: another worker count or layout."""
    written = manifest.get("engine_stage", manifest.get("config", {}).get("train", {}).get("zero_stage"))
    return manifest.get("world_size") != world_size or (written is not None and written != layout)


def foreign_manifest(ckpt: Location, world_size: int, layout: int | str) -> dict[str, Any] | None:
    """``ckpt``'s manifest when this many workers under this layout cannot load its shards as they are
    (the checkpoint must go through the converted tree); None when they can."""
    manifest = read_manifest(ckpt) or {}
    return manifest if needs_reshard(manifest, world_size, layout) else None


def universal_dir(ckpt: Location) -> Location:
    return storage.join(ckpt, UNIVERSAL)


def is_converted(ckpt: Location) -> bool:
    loc = storage.join(universal_dir(ckpt), META)
    if storage.is_remote(loc):
        return storage.bucket(loc).read_text(loc) is not None
    return Path(loc).is_file()


def make_portable(ckpt: Location) -> None:
    """Convert ``ckpt`` (once) into whole tensors by parameter name, under ``universal_dir(ckpt)``. Runs on
    the driver: it reads every rank's shards, which only a process that sees the whole checkpoint can."""
    target = universal_dir(ckpt)
    if is_converted(ckpt):
        return
    manifest = read_manifest(ckpt)
    if manifest is None:
        raise RuntimeError(f"checkpoint {ckpt} is not complete")
    remote = storage.is_remote(ckpt)
    work = storage.staging_dir("reshard", uuid.uuid4().hex)
    try:
        if remote:
            from distsft.checkpoint.store import fetch

            src = fetch(ckpt)
        else:
            src = Path(ckpt)
        verify(src, manifest, ckpt)  # every file the conversion reads, against the checksums of the save
        out = work / UNIVERSAL
        with no_code_from_checkpoints():
            _convert(src / DS_TAG, out)
        # The optimizer's step count is the checkpoint's step (bf16 and fp32 never skip a step).
        meta = {
            "step": int(manifest["step"]),
            "world_size": manifest.get("world_size"),
            "layout": manifest.get("engine_stage"),
        }
        if remote:
            storage.bucket(ckpt).upload(out, target)  # every tensor first ...
            storage.bucket(ckpt).write_text(storage.join(target, META), json.dumps(meta))  # ... the marker last
            storage.remove(src)
        else:
            (out / META).write_text(json.dumps(meta))
            tmp = Path(ckpt) / f".tmp-{UNIVERSAL}-{uuid.uuid4().hex[:8]}"
            shutil.move(str(out), tmp)
            shutil.rmtree(target, ignore_errors=True)  # a tree without its marker: a crashed conversion
            tmp.rename(target)
    finally:
        storage.remove(work)


def convert_for(ckpt: Location, world_size: int, layout: int | str) -> str | None:
    """Convert ``ckpt`` where this many workers under this layout cannot load its shards as they are; run
    on the driver, where the whole checkpoint is in reach, before any worker waits for it. Returns the line
    to show, or None when nothing was needed."""
    import time

    manifest = foreign_manifest(ckpt, world_size, layout)
    if manifest is None:
        return None
    t0 = time.monotonic()
    make_portable(ckpt)
    return (
        f"resharding: the checkpoint was written by {manifest.get('world_size')} worker(s), this run has "
        f"{world_size} [converted in {time.monotonic() - t0:.1f}s]"
    )


def _convert(ds_dir: Path, out: Path) -> None:
    """DeepSpeed's files of one checkpoint -> ``out/zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``. The shards
    are read by PyTorch's restricted unpickler (``safe_load``: DeepSpeed's converter asks for a full one and
    does not get it); what this writes holds tensors only and is read back with ``weights_only=True``."""
    import torch

    if any(ds_dir.glob("*optim_states.pt")):
        import argparse

        from deepspeed.checkpoint import ds_to_universal

        args = argparse.Namespace(
            input_folder=str(ds_dir), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=True,
        )  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)  # its progress prints and bars are not the console's business
        return
    # One worker without ZeRO: the module's weights and torch's AdamW state, whole, in one file.
    (states,) = ds_dir.glob("mp_rank_*_model_states.pt")
    sd = torch.load(states, map_location="cpu", weights_only=True)
    module, opt = sd["module"], sd["optimizer"]
    ids = [i for g in opt["param_groups"] for i in g["params"]]
    names = sd.get("distsft_param_names") or _unique(module)  # trainable names, in the optimizer's order
    if len(names) != len(ids):
        raise RuntimeError(f"{states}: {len(ids)} optimizer parameters but {len(names)} names; cannot reshard")
    for name, i in zip(names, ids, strict=True):
        d = out / "zero" / name
        d.mkdir(parents=True, exist_ok=True)
        st = opt["state"].get(i, {})
        torch.save({"param": module[name].float()}, d / "fp32.pt")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.save(
                {"param": st[key].float() if key in st else torch.zeros_like(module[name].float())}, d / f"{key}.pt"
            )
        step = int(st.get("step", 0))
        torch.save(torch.tensor(float(step)), d / "step.pt")
    return step


def _unique(module: dict[str, Any]) -> list[str]:
    """A state dict's names, tied weights once (the first name, as ``named_parameters`` keeps it)."""
    seen, names = set(), []
    for name, t in module.items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            names.append(name)
    return names


def _load(path: Path) -> Any:
    """One converted tensor (ZeRO 1-2 and our own files hold ``{"param": tensor, ...}``, ZeRO 3 the tensor)."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["param"] if isinstance(obj, dict) else obj


def load_portable(engine: Any, ckpt: Location, stage: int, rank: int) -> None:
    """Set this engine's weights and Adam state from the converted tree of ``ckpt``: every rank reads the
    whole tensors of its trainable parameters and keeps its own partition. Collective under ZeRO 1 and 2
    (the updated weights are gathered)."""
    import torch

    src = universal_dir(ckpt)
    local: Path
    if storage.is_remote(src):
        local = storage.staging_dir("reshard-load", f"{storage.name(ckpt)}-rank{rank}")
        storage.remove(local)
        storage.bucket(src).download(src, local)
    else:
        local = Path(src)
    try:
        step = json.loads((local / META).read_text())["step"]
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        missing = [n for n, _ in named if not (local / "zero" / n / "fp32.pt").is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {ckpt}: no saved state for parameters {missing[:5]}")
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        _ensure_adam_state(engine.optimizer, inner)
        for name, p in named:
            full = {k: _load(local / "zero" / name / f"{k}.pt") for k in STATES}
            _set(engine, inner, p, full, stage)
        _after(engine, stage)
        for st in inner.state.values():  # Adam's bias correction goes on from the saved count
            if "step" in st:
                st["step"] = torch.full_like(st["step"], step) if torch.is_tensor(st["step"]) else step
        _schedule_at(engine, step)
    finally:
        if storage.is_remote(src):
            storage.remove(local)


def _schedule_at(engine: Any, step: int) -> None:
    """The engine's counters and learning rates where an uninterrupted run has them after ``step`` steps
    (the schedule is our ``LambdaLR``: one value per step)."""
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
    sched = engine.lr_scheduler
    if sched is None:
        return
    sched.last_epoch = step
    lrs = [base * f(step) for base, f in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
    for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = lrs


def _set(engine: Any, inner: Any, p: Any, full: dict[str, Any], stage: int) -> None:
    import torch
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if stage == 0 and not hasattr(p, "_hp_mapping"):  # one worker without ZeRO: the tensors themselves
        with torch.no_grad():
            p.data.copy_(full["fp32"].view_as(p).to(p.dtype))
            for key in ("exp_avg", "exp_avg_sq"):
                inner.state[p][key].copy_(full[key].view_as(p))
        return
    safe_set_full_fp32_param(p, full["fp32"].to(_device(p)))
    for key in ("exp_avg", "exp_avg_sq"):
        safe_set_full_optimizer_state(p, full[key].to(_device(p)), key)


def _ensure_adam_state(wrapper: Any, inner: Any) -> None:
    """Adam's state as its first step would make it (torch creates it lazily), so there is a tensor to
    copy the saved moments into; then ZeRO 1 and 2 link their per-parameter views of it."""
    import torch

    on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
    # ZeRO 3 hands its flat fp32 partitions to the optimizer only for the length of a step
    held = [t for group in inner.param_groups for t in group["params"]]
    for t in held + list(getattr(wrapper, "fp32_partitioned_groups_flat", None) or []):
        if not inner.state[t]:
            inner.state[t] = {
                "step": torch.zeros((), dtype=torch.float32, device=t.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(t, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(t, memory_format=torch.preserve_format),
            }
    if getattr(wrapper, "_hp_optimizer_states_linked", True) is False:
        wrapper._lazy_init_hp_params_optimizer_state()


def _device(p: Any) -> Any:
    return getattr(p, "ds_tensor", p).device


def _after(engine: Any, stage: int) -> None:
    """Carry the fp32 master weights into the weights the forward pass uses."""
    opt = engine.optimizer
    if stage == 3:
        for i in range(len(opt.fp16_partitioned_groups_flat)):
            opt.fp16_partitioned_groups_flat[i].data.copy_(opt.fp32_partitioned_groups_flat[i].data)
    elif hasattr(opt, "update_lp_params"):
        opt.update_lp_params()


def resume_engine(
    engine: Any, ckpt: Location, frozen_base: bool, world_size: int, layout: int | str, stage: int
) -> int:
    """Restore ``ckpt`` into this engine; returns the step to continue after. Shards written by this many
    workers under this layout load as they are (``store.load``); any others through the converted tree,
    which the driver normally made already (else rank 0 makes it here while the others wait)."""
    import torch.distributed as dist

    from distsft.checkpoint.store import load, set_rng_state_of

    manifest = foreign_manifest(ckpt, world_size, layout)
    if manifest is None:
        return load(engine, ckpt, frozen_base)
    rank = dist.get_rank()
    if rank == 0 and not is_converted(ckpt):
        make_portable(ckpt)
    dist.barrier()
    load_portable(engine, ckpt, stage, rank)
    set_rng_state_of(ckpt, rank)
    if rank == 0:
        print(
            f"resharded {ckpt}: written by {manifest.get('world_size')} worker(s) (layout "
            f"{manifest.get('engine_stage')}), continued on {world_size} (layout {layout})",
            flush=True,
        )
    return int(manifest["step"])
