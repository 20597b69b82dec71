"""Where checkpoints live: a directory every node sees (local disk, NFS), or an object store (``s3://``,
``gs://``) through the filesystems Ray Train itself uses (pyarrow's S3 and GCS clients).

An object store has no rename and no directories, so the same promise is kept differently: on a disk a
checkpoint is written under a temporary name and renamed into place, in a bucket its files are uploaded
under their final keys and the manifest object is written last. Either way a checkpoint counts only once
its manifest exists and lists every file with its size, and a single object (or an atomic replace) moves
the ``latest`` pointer. Credentials and endpoints come from the environment, never from config files:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` (S3-compatible servers such as
MinIO), or Google's application default credentials.

Unreadable is not absent: a read or a listing returns what is there, says "not there" only when the
storage said so (a missing file or key), and otherwise retries transient errors (S3 throttling and 5xx,
timeouts, NFS's EIO and ESTALE) with backoff for ``DISTSFT_STORAGE_RETRY_S`` seconds (default 60), then
raises ``StorageError`` naming the location. Nothing that decides to start over or to delete acts on a
read that failed.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from distsft.errors import ConfigError, DistsftError, first_line
from distsft.host import private_dir

T = TypeVar("T")
TRANSIENT = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ECONNRESET, errno.EBUSY}


UPLOADS = 8
"""Files a rank uploads at once."""


class StorageError(DistsftError):
    """A checkpoint location that could not be read or listed: not the same as one that holds nothing."""


def retry_budget_s() -> float:
    return float(os.environ.get("DISTSFT_STORAGE_RETRY_S", "60"))


def reading(location: str | Path, what: str, fn: Callable[[], T], budget_s: float | None = None) -> T:
    """``fn()``, retried with backoff while it fails transiently, for at most ``budget_s`` (default
    ``DISTSFT_STORAGE_RETRY_S``); a missing file (``FileNotFoundError``) goes to the caller as it is, and any
    other failure becomes one ``StorageError`` line."""
    budget = retry_budget_s() if budget_s is None else budget_s
    deadline, delay = time.monotonic() + budget, 0.5
    while True:
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as e:
            transient = e.errno in TRANSIENT or e.errno is None  # object stores' errors carry no errno
            if not transient or time.monotonic() + delay > deadline:
                why = first_line(e)
                waited = f" for {budget:g}s" if transient and budget else ""
                raise StorageError(
                    f"checkpoint storage {location}: {what} failed{waited} ({why}); an unreadable checkpoint is not "
                    "taken for a missing one, so nothing was started over or deleted: run again once it can be "
                    "read (the cluster file's storage_retry_s sets how long to retry)"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


SCHEMES = ("s3://", "gs://")


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(SCHEMES)


def absolute(location: str | Path) -> str | Path:
    """A bucket URI as it is; a path made absolute here (``~`` expanded), as every node must be given it."""
    return location if is_remote(location) else Path(location).expanduser().resolve()


def join(location: str | Path, *parts: str) -> str | Path:
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return Path(location).joinpath(*parts)


def name(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str | Path) -> str | Path:
    if is_remote(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return Path(location).parent


class Bucket:
    """The few operations checkpoints need, on one object-store location (``s3://bucket/prefix``)."""

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        kwargs: dict[str, Any] = {}
        if uri.startswith("s3://"):
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
            if endpoint:
                scheme, _, host = endpoint.partition("://")
                kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
            self.fs = pafs.S3FileSystem(
                region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
                **kwargs,
            )
        else:
            self.fs = pafs.GcsFileSystem()
        self.uri = uri.rstrip("/")

    def path(self, location: str | Path) -> str:
        """The filesystem's own path (``bucket/key``) of a URI under this bucket."""
        return str(location).split("://", 1)[1].rstrip("/")

    def files(self, location: str | Path, budget_s: float | None = None) -> dict[str, int]:
        """Every object under ``location`` (relative key -> size); empty only when the listing says so."""
        import pyarrow.fs as pafs

        base = self.path(location)
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = reading(location, "listing", lambda: self.fs.get_file_info(selector), budget_s)
        return {i.path[len(base) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}

    def children(self, location: str | Path, budget_s: float | None = None) -> list[str]:
        """Names of the 'directories' directly under ``location``."""
        import pyarrow.fs as pafs

        base = self.path(location)
        selector = pafs.FileSelector(base, recursive=False, allow_not_found=True)
        infos = reading(location, "listing", lambda: self.fs.get_file_info(selector), budget_s)
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def read_text(self, location: str | Path, budget_s: float | None = None) -> str | None:
        """The object's text; None only when the store says there is no such object."""

        def read() -> str:
            with self.fs.open_input_stream(self.path(location)) as f:
                return f.read().decode("utf-8")

        try:
            return reading(location, "reading", read, budget_s)
        except FileNotFoundError:
            return None

    def write_text(self, location: str | Path, text: str) -> None:
        """One PUT: the object appears whole or not at all."""
        with self.fs.open_output_stream(self.path(location)) as f:
            f.write(text.encode("utf-8"))

    def upload(self, local_dir: Path, location: str | Path) -> dict[str, int]:
        """Every file under ``local_dir`` to the same relative keys under ``location``, several at a time (a
        rank's shards go in parallel, as the other ranks wait for the slowest); returns what went."""
        import concurrent.futures

        import pyarrow.fs as pafs

        files = sorted(p for p in local_dir.rglob("*") if p.is_file())

        def send(f: Path) -> tuple[str, int]:
            rel = f.relative_to(local_dir).as_posix()
            pafs.copy_files(str(f), f"{self.path(location)}/{rel}", destination_filesystem=self.fs)
            return rel, f.stat().st_size

        with concurrent.futures.ThreadPoolExecutor(max_workers=UPLOADS) as pool:
            return dict(pool.map(send, files))

    def download(self, location: str | Path, local_dir: Path, keep=lambda rel: True) -> None:
        import pyarrow.fs as pafs

        for rel in self.files(location):
            if keep(rel):
                target = local_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(f"{self.path(location)}/{rel}", str(target), source_filesystem=self.fs)

    def delete(self, location: str | Path) -> None:
        """The manifest first, so a checkpoint being deleted stops counting before it loses any file."""
        base = self.path(location)
        try:
            self.fs.delete_file(f"{base}/MANIFEST.json")
        except OSError:
            pass
        try:
            self.fs.delete_dir(base)
        except OSError:
            pass


def bucket(location: str | Path) -> Bucket:
    loc = str(location)
    if not is_remote(loc):
        raise ValueError(f"{loc}: not an object-store URI")
    root = "/".join(loc.split("/", 3)[:3])  # scheme://bucket
    if root not in _buckets:  # one client per bucket and process: making one costs a credentials lookup
        _buckets[root] = Bucket(root)
    return _buckets[root]


_buckets: dict[str, Bucket] = {}


def check_uri(uri: str, key: str) -> None:
    """``s3://bucket/prefix`` or ``gs://bucket/prefix``; anything else with a scheme is refused."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme and f"{scheme}://" not in SCHEMES:
        raise ConfigError(f"{key} {uri}: {scheme}:// is not supported; use a path, s3://bucket/prefix or gs://...")
    if scheme and not uri.split("://", 1)[1].strip("/"):
        raise ConfigError(f"{key} {uri}: name a bucket (s3://bucket/prefix)")


def staging_dir(*parts: str) -> Path:
    """Node-local scratch space for a checkpoint on its way to or from an object store."""
    from distsft.config import cache_home

    return private_dir(cache_home() / "staging" / Path(*parts))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
