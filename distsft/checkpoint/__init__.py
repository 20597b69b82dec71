"""Checkpoints: atomic sharded saves on a disk or in an object store (``store``, ``storage``), the resume
decision (``resume``), and consolidation into a Hugging Face directory (``export``).

Imports ``config``, ``host`` and ``model.lora`` (export writes adapters); never the launcher or Ray.
"""

from distsft.checkpoint.reshard import convert_for, make_portable, needs_reshard, resume_engine
from distsft.checkpoint.resume import CONTINUATION_KEYS, ResumePlan, check_continuation, decide_resume
from distsft.checkpoint.store import (
    MANIFEST,
    Best,
    Location,
    best_checkpoint,
    fetch,
    find_latest,
    load,
    read_manifest,
    resolve,
    save,
    step_dir,
)

__all__ = [
    "CONTINUATION_KEYS", "MANIFEST", "Best", "Location", "best_checkpoint",
    "ResumePlan", "check_continuation", "convert_for", "decide_resume",
    "fetch",
    "find_latest", "load", "make_portable", "needs_reshard", "read_manifest", "resolve", "resume_engine", "save",
    "step_dir",
]  # fmt: skip
