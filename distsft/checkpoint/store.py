"""Atomic, resumable checkpoints of DeepSpeed engines, on a shared disk or in an object store.

A checkpoint counts only once it is complete. On a disk every rank writes its shards into
``.tmp-step-N``; after a barrier, rank 0 writes ``MANIFEST.json`` (every file and its size) and fsyncs
it, renames the directory to ``step-N``, and only then moves the ``latest`` pointer with an atomic
replace. In an object store (``s3://``, ``gs://``: see ``distsft/storage.py``) every rank saves into
node-local staging and uploads its own files under ``step-N/``; rank 0 checks that every file each rank
sent is there with its size, and only then writes the manifest object, and then ``latest``. Loading
trusts nothing else: ``latest`` is checked against its manifest, and when it is missing or wrong the
newest ``step-*`` whose manifest matches its files wins. A crash mid-save (a kill during the upload
included) therefore leaves files without a manifest, which are ignored and removed by the next save.
DeepSpeed's own ``latest`` file (written without any of this) is never created or read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsft.checkpoint import auth, storage
from distsft.errors import ConfigError
from distsft.host import fsync_dir, write_atomic

PREFIX = "step-"
MANIFEST = "MANIFEST.json"
LATEST = "latest"
DS_TAG = "ds"
HF_DIR = "hf"  # model config, generation config and tokenizer: what export needs besides the weights

Location = str | Path
"""A checkpoint or checkpoints root: a directory, or an ``s3://`` / ``gs://`` URI."""

_RANKED = re.compile(r"zero_pp_rank_(\d+)_|rng-rank(\d+)\.json")


class CorruptCheckpoint(storage.StorageError):
    """A file whose content is not what the manifest recorded at save (same size, other bytes)."""

    def __init__(self, message: str, file: str) -> None:
        super().__init__(message)
        self.file = file


class UnsignedCheckpoint(CorruptCheckpoint):
    """A manifest this run's key did not sign (``auth.py``): someone else's, or rewritten."""

    def __init__(self, ckpt: Location, why: str) -> None:
        super().__init__(f"checkpoint {ckpt}: {why}, so it is not used; {auth.HOW_TO_ACCEPT}", MANIFEST)
        self.why = why


def owner(rel: str) -> int | None:
    """The rank whose file ``rel`` is (DeepSpeed's ``zero_pp_rank_N`` shards, our ``rng-rankN``); None for
    the files every rank reads (the model states of a one-worker or ZeRO-1/2 engine, ``hf/``)."""
    m = _RANKED.search(rel)
    return None if m is None else int(m.group(1) or m.group(2))


def digest(path: Path, durable: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
        if durable:
            os.fsync(f.fileno())
    return h.hexdigest()


def _digests(directory: Path, rank: int | None, durable: bool = False) -> dict[str, str]:
    """sha256 of the files under ``directory`` that ``rank`` owns (rank 0: also those nobody owns; None:
    all of them), so the ranks of a save share the hashing and each reads back only what it wrote; with
    ``durable``, each is fsynced too (what this rank wrote, not every filesystem of the node)."""
    out = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = f.relative_to(directory).as_posix()
        who = owner(rel)
        if rank is None or who == rank or (who is None and rank == 0):
            out[rel] = digest(f, durable)
    return out


def verify(local: Path, manifest: dict[str, Any], ckpt: Location, rank: int | None = None) -> None:
    """Check the files of ``local`` (a checkpoint, or a local copy of ``ckpt``) that ``rank`` reads (None:
    every file) against the manifest's sha256; raise ``CorruptCheckpoint`` naming the first that differs.
    Checkpoints written before checksums carry sizes only, which ``read_manifest`` checked."""
    for rel, want in (manifest.get("sha256") or {}).items():
        who = owner(rel)
        path = local / rel
        if (rank is None or who is None or who == rank) and path.is_file() and digest(path) != want:
            raise CorruptCheckpoint(
                f"checkpoint {ckpt}: {rel} is corrupt (same size, other bytes: its sha256 differs from the "
                f"manifest's); {_instead(ckpt)}",
                rel,
            )


def _instead(ckpt: Location) -> str:
    older = [d for d in _step_dirs(storage.parent(ckpt), budget_s=0) if storage.name(d) < storage.name(ckpt)]
    for d in reversed(older):
        try:
            if read_manifest(d, budget_s=0) is not None:
                return f"continue from the previous complete one with checkpoint.resume={d}"
        except storage.StorageError:
            continue
    return "no earlier complete checkpoint exists: start over with checkpoint.resume=never"


# --- layout and validation -------------------------------------------------------------------------
def step_dir(root: Location, step: int) -> Location:
    return storage.join(root, f"{PREFIX}{step:08d}")


def _files(ckpt: Location, budget_s: float | None = None) -> dict[str, int]:
    if storage.is_remote(ckpt):
        return storage.bucket(ckpt).files(ckpt, budget_s)
    ckpt = Path(ckpt)

    def listing() -> dict[str, int]:
        return {f.relative_to(ckpt).as_posix(): f.stat().st_size for f in ckpt.rglob("*") if f.is_file()}

    return storage.reading(ckpt, "listing", listing, budget_s)


def _read(location: Location, budget_s: float | None = None) -> str | None:
    """The file's text; None only when it does not exist (anything else unreadable raises StorageError)."""
    if storage.is_remote(location):
        return storage.bucket(location).read_text(location, budget_s)
    try:
        return storage.reading(location, "reading", Path(location).read_text, budget_s)
    except FileNotFoundError:
        return None


def _size(path: Path, budget_s: float | None) -> int | None:
    try:
        return storage.reading(path, "reading", lambda: path.stat().st_size, budget_s)
    except FileNotFoundError:
        return None


def read_manifest(ckpt: Location, budget_s: float | None = None) -> dict[str, Any] | None:
    """The manifest if ``ckpt`` is complete (every listed file present with its size); None when it is proven
    incomplete (no manifest, a malformed one, a listed file missing or of another size). A manifest or file
    that cannot be read raises ``StorageError``: unreadable is not incomplete."""
    text = _read(storage.join(ckpt, MANIFEST), budget_s)
    if text is None:
        return None
    try:
        manifest = json.loads(text)
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError):
        return None
    why = auth.problem(manifest)
    if why is not None:
        raise UnsignedCheckpoint(ckpt, why)
    present = _files(ckpt, budget_s) if storage.is_remote(ckpt) else None
    for rel, size in files.items():
        have = present.get(rel) if present is not None else _size(Path(ckpt) / rel, budget_s)
        if have != size:
            return None
    return manifest


def find_latest(root: Location, skip: set[str] | frozenset[str] = frozenset()) -> Location | None:
    """The newest complete checkpoint under ``root`` (but those named in ``skip``); the pointer is a hint,
    the manifests decide. None only when the listing proves there is none; storage that cannot be read
    raises ``StorageError``. A checkpoint this run's key did not sign is skipped, said once, for an older
    one that it did; when only such checkpoints exist, ``UnsignedCheckpoint`` is raised rather than taking
    the root for empty (a run that started over would overwrite them)."""
    steps = [d for d in _step_dirs(root) if storage.name(d) not in skip]
    pointer = (_read(storage.join(root, LATEST)) or "").strip()
    pointer = "" if pointer in skip else pointer
    unsigned: list[UnsignedCheckpoint] = []

    def complete(d: Location) -> bool:
        try:
            return read_manifest(d) is not None
        except UnsignedCheckpoint as e:
            unsigned.append(e)
            if str(d) not in _said:
                _said.add(str(d))
                print(f"checkpoint: skipped {storage.name(d)}: {e.why}", flush=True)
            return False

    if pointer.startswith(PREFIX):
        candidate = storage.join(root, pointer)
        if complete(candidate):
            newer = [d for d in steps if storage.name(d) > pointer and complete(d)]
            return newer[-1] if newer else candidate
    for d in reversed(steps):
        if complete(d):
            return d
    if unsigned:
        raise unsigned[0]
    return None


_said: set[str] = set()
"""Checkpoints already named as skipped by this process (``find_latest`` runs several times per launch)."""


def _step_dirs(root: Location, budget_s: float | None = None) -> list[Location]:
    if storage.is_remote(root):
        names = storage.bucket(root).children(root, budget_s)
        return [storage.join(root, n) for n in names if n.startswith(PREFIX)]
    root = Path(root)

    def listing() -> list[Location]:
        with os.scandir(root) as entries:  # a root that cannot be listed raises; only a missing one is empty
            return sorted(root / e.name for e in entries if e.name.startswith(PREFIX) and e.is_dir())

    try:
        return storage.reading(root, "listing", listing, budget_s)
    except FileNotFoundError:
        return []


def resolve(path: Location) -> Location:
    """A user-given checkpoint: a ``step-N`` directory, or a run/checkpoints directory (its latest)."""
    p: Location = path if storage.is_remote(path) else Path(path).expanduser()
    for candidate in (p, storage.join(p, "checkpoints")):
        if read_manifest(candidate) is not None:
            return candidate
        latest = find_latest(candidate)
        if latest is not None:
            return latest
    if not storage.is_remote(p) and not Path(p).exists():
        raise ConfigError(f"checkpoint {p}: no such directory")
    raise ConfigError(f"checkpoint {p}: no complete checkpoint there (no valid {MANIFEST})")


# --- save --------------------------------------------------------------------------------------------
def save(
    engine: Any,
    root: Location,
    step: int,
    meta: dict[str, Any],
    keep_last: int,
    write_hf: Callable[[Path], None],
    frozen_base: bool = False,
    upload_group: Callable[[], Any] | None = None,
    best_by: str | None = None,
) -> Location:
    """Collective: every rank calls it. Rank 0 calls ``write_hf(dir)`` for what export needs besides the
    weights (model config, tokenizer, ...). With a frozen base (LoRA) only what trains is saved: the base
    comes from ``model.path`` again on resume. ``upload_group()``: the process group on which ranks wait
    for the slowest upload to an object store, bounded apart from the training collectives (default: the
    world group). ``best_by``: the eval metric whose best checkpoint rotation keeps (``best_checkpoint``)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    remote = storage.is_remote(root)
    final = step_dir(root, step)
    if remote:  # every rank stages what it writes on its own node, then uploads it
        tmp = storage.staging_dir(storage.name(storage.parent(root)), f"save-{storage.name(final)}-rank{rank}")
        storage.remove(tmp)
        tmp.mkdir(parents=True)
    else:
        tmp = Path(root) / f".tmp-{storage.name(final)}"
        if rank == 0:  # what crashed saves left (one save at a time writes here) goes first
            for old in Path(root).glob(".tmp-*"):
                shutil.rmtree(old, ignore_errors=True)
            tmp.mkdir(parents=True)
    dist.barrier()
    try:
        engine.save_checkpoint(
            str(tmp),
            tag=DS_TAG,
            client_state={"step": step, "distsft_param_names": trainable_names(engine.module)},
            save_latest=False,
            exclude_frozen_parameters=frozen_base,
        )
        (tmp / f"rng-rank{rank}.json").write_text(json.dumps(_rng_state()))
        if rank == 0:
            write_hf(tmp / HF_DIR)
        dist.barrier()  # on a shared disk, every rank's files are written before each hashes its own
        # Each rank hashes what it wrote, while it is still in the page cache (staged files are all its
        # own), and on a disk makes it durable before rank 0 vouches for it.
        sums = _digests(tmp, None if remote else rank, durable=not remote)
    except (OSError, RuntimeError) as e:
        if not _no_space(e):
            raise
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        shutil.rmtree(tmp, ignore_errors=True)  # the next save, or launch, must not find the disk full of it
        total, last = shutil.disk_usage(tmp.parent).total, _last_size(root)
        before = f"the last complete checkpoint took {_gib(last)}" if last else "no earlier checkpoint to compare"
        raise storage.StorageError(
            f"checkpoint {final}: no space left on the device writing {tmp} ({_gib(written)} written when it "
            f"filled a filesystem of {_gib(total)}; {before}); the partial save was removed: free space or move "
            "output_dir (or the cluster's storage_path), then run again"
        ) from None
    if remote:
        _maybe_die_in_save(step, "upload")
        sent = storage.bucket(root).upload(tmp, final)
        storage.remove(tmp)
    else:
        sent = {}
    _maybe_die_in_save(step)
    every = [None] * dist.get_world_size()
    # After an upload the ranks wait for the slowest one's on a group bounded by upload_timeout_s.
    group = upload_group() if upload_group is not None and remote and dist.get_world_size() > 1 else None
    dist.all_gather_object(every, (sent, sums), group=group)
    if rank == 0:
        if remote:
            files = {rel: size for part, _ in every for rel, size in part.items()}
            missing = [rel for rel, size in files.items() if _files(final).get(rel) != size]
            if missing:
                raise RuntimeError(f"checkpoint {final}: uploaded files are not there: {missing[:5]}")
        else:
            files = _files(tmp)
        sha256 = {rel: h for _, part in every for rel, h in part.items()}
        manifest = auth.sign(
            {
                "step": step,
                "world_size": dist.get_world_size(),
                "files": files,
                "sha256": {rel: sha256[rel] for rel in files if rel in sha256},
                "created": time.time(),
                **meta,
            }
        )
        text = json.dumps(manifest, indent=1)
        if remote:
            storage.bucket(root).write_text(storage.join(final, MANIFEST), text)
            storage.bucket(root).write_text(storage.join(root, LATEST), storage.name(final))
        else:
            write_atomic(tmp / MANIFEST, text, durable=True)
            if Path(final).exists():  # a rerun with resume: never, overwriting its own old step
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(Path(root))
            write_atomic(Path(root) / LATEST, storage.name(final), durable=True)
        _purge(root, keep_last, keep=final, best_by=best_by)
    dist.barrier(group=group)
    return final


def _no_space(error: BaseException) -> bool:
    """ENOSPC, or torch's zip writer failing on a full disk (``unexpected pos`` / ``file write failed``)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left" in text or "unexpected pos" in text or "file write failed" in text


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def _last_size(root: Location) -> int:
    try:
        latest = find_latest(root)
    except storage.StorageError:
        return 0
    return sum((read_manifest(latest) or {}).get("files", {}).values()) if latest is not None else 0


def trainable_names(module: Any) -> list[str]:
    """The names of what the optimizer holds, in its order (what resharding a one-worker checkpoint needs)."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def _maybe_die_in_save(step: int, moment: str = "shards") -> None:
    """Crash injection for tests: ``DISTSFT_KILL_IN_SAVE=STEP[:upload[:MARKER]]`` SIGKILLs this process
    after its shards of that step are written (or, for an object store, before they are uploaded) and
    before the manifest exists: the worst moments for a crash. With a marker file it happens once."""
    parts = os.environ.get("DISTSFT_KILL_IN_SAVE", "").split(":")
    if parts[0] != str(step) or (parts[1] if len(parts) > 1 else "shards") != moment:
        return
    if len(parts) > 2:
        marker = Path(parts[2])
        if marker.exists():
            return
        marker.touch()
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _purge(root: Location, keep_last: int, keep: Location, best_by: str | None = None) -> None:
    """Old complete checkpoints beyond ``keep_last`` and leftovers of crashed saves (proven incomplete: their
    manifest is missing or does not match the files listed); never ``keep``, never the best by ``best_by``
    among the complete ones, and never a checkpoint that could not be read, which is kept and named once.
    A checkpoint is deleted manifest first, so it stops counting before it loses a file. It runs between two
    collectives: no retries here, a doubt keeps."""
    try:
        steps = _step_dirs(root, budget_s=0)
    except storage.StorageError as e:
        print(f"checkpoint: no old checkpoint removed: {e}", flush=True)
        return
    complete, incomplete, unread, unsigned = [], [], [], []
    manifests: dict[str, dict[str, Any]] = {}
    for d in steps:
        try:
            manifest = read_manifest(d, budget_s=0)
            (complete if manifest is not None else incomplete).append(d)
            if manifest is not None:
                manifests[str(d)] = manifest
        except UnsignedCheckpoint:
            unsigned.append(storage.name(d))
        except storage.StorageError:
            unread.append(storage.name(d))
    if unread:
        print(f"checkpoint: kept {', '.join(unread)}: could not be read now, so not taken for leftovers", flush=True)
    unsigned = [n for n in unsigned if f"kept {n}" not in _said]
    _said.update(f"kept {n}" for n in unsigned)
    if unsigned:
        print(f"checkpoint: kept {', '.join(unsigned)}: not signed with this run's key, not ours to remove", flush=True)
    best = _best_of(manifests, best_by) if best_by else None
    kept = {str(keep), best.location if best else ""}
    stale = [d for d in complete[:-keep_last] if str(d) not in kept] + [d for d in incomplete if d != keep]
    if storage.is_remote(root):
        for d in stale:
            storage.bucket(root).delete(d)
        return
    for d in stale:
        (Path(d) / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)
    for d in Path(root).glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)


# --- the best checkpoint ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Best:
    location: str
    step: int
    metric: str
    value: float


def _best_of(manifests: dict[str, dict[str, Any]], metric: str | None) -> Best | None:
    """The lowest ``metric`` among complete checkpoints' manifests (``{location: manifest}``); the earliest
    wins a tie (a later equal loss saves nothing). Without ``metric``: the one the newest manifest that names
    one names (``best_by``)."""
    if metric is None:
        named = [m["best_by"] for _, m in sorted(manifests.items()) if m.get("best_by")]
        metric = named[-1] if named else None
    scored = [
        Best(loc, int(m["step"]), metric, float(m["evals"][metric]))
        for loc, m in manifests.items()
        if metric is not None and isinstance(m.get("evals"), dict) and m["evals"].get(metric) is not None
    ]
    return min(scored, key=lambda b: (b.value, b.step), default=None)


def best_checkpoint(root: Location, metric: str | None = None) -> Best | None:
    """The complete checkpoint under ``root`` with the lowest ``metric`` (an eval loss recorded in its
    manifest at save; default: the metric the run kept its best by). Its value is read from the signed
    manifest, so a checkpoint someone else wrote can never become the best: a manifest this run's key did
    not sign is skipped, as ``find_latest`` skips it. None when no checkpoint records the metric."""
    manifests = {}
    for d in _step_dirs(root):
        try:
            manifest = read_manifest(d)
        except UnsignedCheckpoint as e:
            if str(d) not in _said:
                _said.add(str(d))
                print(f"checkpoint: skipped {storage.name(d)}: {e.why}", flush=True)
            continue
        if manifest is not None:
            manifests[str(d)] = manifest
    return _best_of(manifests, metric)


# --- load --------------------------------------------------------------------------------------------
def load(engine: Any, ckpt: Location, frozen_base: bool = False) -> int:
    """Restore weights, optimizer, LR schedule and this rank's RNG; returns the step to continue after.

    DeepSpeed's shards are pickles that its engine reads with a full unpickler (weights_only off); here they
    go through PyTorch's restricted unpickler instead (``safe_load``), after their checksums are verified.
    From an object store each rank downloads what it reads (not the other ranks' shards) to its node.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    local = Path(ckpt) if not storage.is_remote(ckpt) else fetch(ckpt, rank)
    try:
        verify(local, read_manifest(ckpt) or {}, ckpt, rank)
        from distsft.checkpoint.safe_load import no_code_from_checkpoints

        with no_code_from_checkpoints():  # DeepSpeed's engine asks torch.load for a full unpickler
            path, client = engine.load_checkpoint(
                str(local),
                tag=DS_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                load_module_strict=not frozen_base,  # a LoRA checkpoint holds no frozen base weights
            )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
        rng = local / f"rng-rank{rank}.json"
        if rng.is_file():
            _set_rng_state(json.loads(rng.read_text()))
    finally:
        if storage.is_remote(ckpt):
            storage.remove(local)
    return int(client["step"])


def set_rng_state_of(ckpt: Location, rank: int) -> None:
    """This rank's random state from ``ckpt`` when the rank wrote one there (a resharded resume may have
    more ranks than the checkpoint: those keep their seeded state)."""
    text = _read(storage.join(ckpt, f"rng-rank{rank}.json"))
    if text:
        _set_rng_state(json.loads(text))


def fetch(ckpt: Location, rank: int | None = None) -> Path:
    """A node-local copy of a checkpoint in an object store: everything, or what ``rank`` reads."""

    local = storage.staging_dir(storage.name(storage.parent(storage.parent(ckpt))), f"load-{storage.name(ckpt)}")
    if rank is not None:
        local = local.with_name(f"{local.name}-rank{rank}")

    def mine(rel: str) -> bool:
        who = owner(rel)
        return rank is None or who is None or who == rank

    storage.remove(local)
    storage.bucket(ckpt).download(ckpt, local, keep=mine)
    return local


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
