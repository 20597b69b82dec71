"""Consolidate a checkpoint's ZeRO shards into a plain Hugging Face model directory.

DeepSpeed's converter reads the fp32 master partitions lazily (memory-mapped, Adam moments dropped), so
host memory holds about one output shard at a time and no GPU is involved. Its own writer is not used:
it hands safetensors both names of a tied weight (``model.embed_tokens.weight`` and ``lm_head.weight``
are one tensor in Llama-3.2, Qwen2.5, Gemma, SmolLM), which safetensors refuses. Here a tied weight is
written once, under the name the model owns it by, and ``tie_word_embeddings`` in the saved config ties
it again at load, exactly as ``save_pretrained`` does.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import shutil
from pathlib import Path
from typing import Any

from distsft.checkpoint import storage
from distsft.checkpoint import store as checkpoint
from distsft.checkpoint.safe_load import no_code_from_checkpoints
from distsft.errors import ConfigError
from distsft.host import publish_dir, scratch_beside
from distsft.model.lora import is_adapter_dir, write_adapter
from distsft.model.lora import merge as merge_adapter

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


MARKER = "distsft_export.json"
"""Written into every export: which checkpoint it came from (what ``check_out`` lets an export replace)."""


def check_out(out: Path, ckpt: checkpoint.Location, run_dirs: list[Path], same_run: bool = False) -> None:
    """Refuse an export target that would destroy something: the run's own directories or any directory above
    them, a file, or an existing non-empty directory that is not a previous export of the same checkpoint
    (``same_run``: of any checkpoint of the same run, as a run's own ``final/`` is)."""
    target = out.resolve()
    for held in [*run_dirs, *([] if storage.is_remote(ckpt) else [Path(ckpt)])]:
        held = held.resolve()
        if target == held or target in held.parents:
            raise ConfigError(f"--out {out}: it holds {held} (the run: checkpoints, metrics); choose a new directory")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {out}: a file is there; choose a directory")
    if not target.is_dir() or not any(target.iterdir()):
        return
    made = _marker(target)
    if made is None:  # a run's own final/ exported before exports were marked is still its own
        same = same_run and any((target / f).is_file() for f in ("config.json", "adapter_config.json"))
    elif same_run:
        same = str(storage.parent(made["checkpoint"])) == str(storage.parent(identity(ckpt)))
    else:
        same = str(made["checkpoint"]) == identity(ckpt)
    if not same:
        what = "another checkpoint's export" if made else "not an export of distsft"
        raise ConfigError(
            f"--out {out}: the directory exists and is {what} ({sum(1 for _ in target.iterdir())} entries); "
            "choose a new directory, or remove it yourself"
        )


def identity(ckpt: checkpoint.Location) -> str:
    """How an export names its checkpoint: the URI, or the absolute path."""
    return str(ckpt) if storage.is_remote(ckpt) else str(Path(ckpt).resolve())


def _marker(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None


def export(
    ckpt: checkpoint.Location,
    out: Path,
    dtype: str = "fp32",
    max_shard_size: str = "5GB",
    merge: bool = False,
    source: checkpoint.Location | None = None,
) -> Path:
    """Write ``out`` (config, generation config, tokenizer, safetensors weights) from checkpoint ``ckpt``;
    the directory appears under its final name only once complete, and replaces what was there in one
    step. A LoRA checkpoint gives a PEFT adapter directory, or with ``merge`` a plain model whose weights
    are base + scaled BA. ``source``: the checkpoint ``ckpt`` is a local copy of (recorded in the marker)."""
    manifest = checkpoint.read_manifest(ckpt)
    if manifest is None:
        raise ConfigError(f"checkpoint {ckpt}: incomplete (no valid {checkpoint.MANIFEST}); refusing to export it")
    if storage.is_remote(ckpt):  # consolidate from a node-local copy of the bucket's files
        local = checkpoint.fetch(ckpt)
        try:
            return export(local, out, dtype, max_shard_size, merge, source=ckpt)
        finally:
            storage.remove(local)
    ckpt = Path(ckpt)
    checkpoint.verify(ckpt, manifest, source or ckpt)  # export reads every file: a corrupt one is named
    marker = {MARKER: json.dumps({"checkpoint": identity(source or ckpt), "step": manifest.get("step")}) + "\n"}
    if merge:
        if not is_adapter_dir(ckpt / checkpoint.HF_DIR):
            raise ConfigError(f"checkpoint {ckpt}: --merge needs a LoRA run; this one trained the whole model")
        scratch = scratch_beside(out)
        try:
            adapter = export(ckpt, scratch / "adapter", "fp32")
            return merge_adapter(adapter, out, _torch_dtype(dtype), extra=marker)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    tmp = scratch_beside(out)
    tmp.rmdir()
    shutil.copytree(ckpt / checkpoint.HF_DIR, tmp)
    for name, text in marker.items():
        (tmp / name).write_text(text)
    if is_adapter_dir(ckpt / checkpoint.HF_DIR):  # a LoRA run: a PEFT adapter directory
        with no_code_from_checkpoints():
            state, _aliases = consolidated_state(ckpt, trainable_only=True)
            weights = {k: v.contiguous() for k, v in state.items()}
        write_adapter(weights, ckpt / checkpoint.HF_DIR, tmp, _torch_dtype(dtype))
        # peft's layout: the base's config.json is not the adapter's; the generation config (the template's
        # end-of-turn token among its stops) stays, for a merge and for loaders that read it from here
        (tmp / "config.json").unlink(missing_ok=True)
        publish_dir(tmp, out)
        return out
    with no_code_from_checkpoints():  # DeepSpeed's zero_to_fp32 reads lazily, while the shards are written
        state, _aliases = consolidated_state(ckpt)
        write_safetensors(state, tmp, dtype, max_shard_size)
    config = json.loads((tmp / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = DTYPE_NAMES[dtype]
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    publish_dir(tmp, out)
    return out


def _torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, DTYPE_NAMES[dtype])


def consolidated_state(ckpt: Path, trainable_only: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """Full-size tensors by name (lazy for ZeRO shards), each tied weight under one name; and
    ``{alias: kept name}``. A checkpoint of a one-worker engine (no ZeRO) holds its module whole."""
    ds_dir = ckpt / checkpoint.DS_TAG
    if any(ds_dir.glob("zero_pp_rank_*")) or any(ds_dir.glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            lazy = get_fp32_state_dict_from_zero_checkpoint(
                str(ckpt), tag=checkpoint.DS_TAG, exclude_frozen_parameters=trainable_only, lazy_mode=True
            )
        identity = id
    else:
        import torch

        states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        lazy = states["module"]  # a LoRA checkpoint saved only what trains

        def identity(t):  # tied weights come back from torch.load as one storage
            return t.untyped_storage().data_ptr()

    state: dict[str, Any] = {}
    owner: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in lazy.items():
        key = identity(tensor)
        if key in owner:  # a tied parameter listed again under its second name
            aliases[name] = owner[key]
            continue
        owner[key] = name
        state[name] = tensor
    return state, aliases


def write_safetensors(state: dict[str, Any], out: Path, dtype: str, max_shard_size: str) -> None:
    """Shards of at most ``max_shard_size`` (with an index when there are several), one in memory at a time."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, DTYPE_NAMES[dtype])

    def target(t: Any) -> torch.dtype:
        return torch_dtype if t.dtype.is_floating_point else t.dtype

    sizes = {k: torch.empty(tuple(t.shape), dtype=target(t), device="meta") for k, t in state.items()}
    split = split_torch_state_dict_into_shards(
        sizes, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for n in names:
            t = state[n].contiguous()
            shard[n] = t.to(target(t))
        save_file(shard, out / filename, metadata={"format": "pt"})
        del shard
        gc.collect()
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
