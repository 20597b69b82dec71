"""Checkpoint files are read without running code from them, DeepSpeed's own loaders included.

DeepSpeed reads its shards with a full unpickler, weights_only off (its checkpoint engine, ``zero_to_fp32``,
``ds_to_universal``): a full unpickler, so a file someone could write (a shared disk, a bucket) runs code
on every node that resumes from it and on the machine that exports it, even padded to the original size.
Inside ``no_code_from_checkpoints()`` every ``torch.load`` is PyTorch's restricted unpickler
(``weights_only=True``), which rebuilds tensors, containers and primitives and, here, only the three
DeepSpeed classes its checkpoints hold (found by ``torch.serialization.get_unsafe_globals_in_checkpoint``
over ZeRO 0-3, bf16 and fp32, LoRA, one and two workers). A file that needs anything else is refused with
one line naming it and what it asked for.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import threading
import zipfile
from collections.abc import Iterator
from typing import Any

from distsft.checkpoint.storage import StorageError
from distsft.errors import first_line

ALLOWED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpoint(StorageError):
    """A checkpoint file that only a full unpickler could read: refused, since it could run code."""


def allowed_classes() -> list[Any]:
    import importlib

    out = []
    for dotted in ALLOWED:
        module, name = dotted.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), name))
    return out


_lock = threading.RLock()


@contextlib.contextmanager
def no_code_from_checkpoints() -> Iterator[None]:
    """Every ``torch.load`` inside reads with ``weights_only=True`` and the classes in ``ALLOWED`` (DeepSpeed's
    loaders turn weights_only off; they get the restricted unpickler all the same)."""
    import torch

    with _lock:
        real = torch.load
        if getattr(real, "_distsft_safe", False):  # nested: already in force
            yield
            return
        classes = allowed_classes()

        def load(f: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["weights_only"] = True
            try:
                with torch.serialization.safe_globals(classes):
                    return real(f, *args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:  # not what torch.save writes
                raise UnsafeCheckpoint(
                    f"{f}: refused: not a file PyTorch reads without a full unpickler ({first_line(e)}); it is "
                    "not what DeepSpeed wrote (use an earlier checkpoint you trust, or checkpoint.resume=never)"
                ) from None
            except pickle.UnpicklingError as e:
                found = re.search(r"GLOBAL (\S+)|Unsupported global: (?:GLOBAL )?(\S+)", str(e))
                said = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
                asked = (
                    f"it asks for {found.group(1) or found.group(2)}"
                    if found
                    else f"the restricted unpickler says: {said.group(1).strip()[:120]}"
                    if said
                    else str(e).splitlines()[0][:120]
                )
                raise UnsafeCheckpoint(
                    f"{f}: refused: reading it would need a full unpickler ({asked}), which can run code that "
                    "whoever wrote the file chose; distsft reads only tensors and DeepSpeed's own classes from "
                    "checkpoints (use an earlier checkpoint you trust, or checkpoint.resume=never)"
                ) from None

        load._distsft_safe = True  # type: ignore[attr-defined]
        torch.load = load
        try:
            yield
        finally:
            torch.load = real
