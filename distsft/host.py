"""What a process asks of the machine it runs on: files that appear whole or not at all, and its own peak
memory. Leaf module: imports nothing of distsft, so every package may use it."""

from __future__ import annotations

import os
import re
from pathlib import Path


def write_atomic(path: Path, text: str, durable: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and an atomic rename: a reader (or a crash)
    sees the old file or the new one, never half of it. ``durable`` also fsyncs the file and its directory,
    for what must survive a power cut (checkpoint manifests and pointers)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def private_dir(path: Path) -> Path:
    """``path`` as a directory, every component this call creates private to the user (0700): caches and
    scratch space in shared places (``/tmp``, a shared home) hold prepared data, checkpoint shards on
    their way to a bucket and Ray's session logs, which another user of the machine must not read.
    Directories that exist keep their mode: they are the user's choice."""
    path = Path(path).expanduser()
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by another process
            pass
    return path


class DirectoryLock:
    """Held by one launch for the whole run: a second launch into the same output directory is refused with
    the first one's host and pid, instead of both writing its checkpoints and metrics. An advisory lock
    (``flock``) that the kernel drops when the holder dies, so a killed run never leaves it stuck."""

    NAME = ".distsft.lock"

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / self.NAME
        self.fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise BusyError(f"{self.path.parent}: a launch is already running there ({holder}); wait for it to "
                            "end, stop it, or choose another output_dir") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays (removing it would race a new holder)
            self.fd = None


class BusyError(Exception):
    """An output directory held by another launch (the CLI reports it as one line)."""


def scratch_beside(out: Path) -> Path:
    """A new, empty directory next to ``out`` (same filesystem, so it can be renamed into place), under a
    name nobody else uses: never an existing directory of the user's."""
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def publish_dir(tmp: Path, out: Path) -> None:
    """Move a directory built under a temporary name into place, replacing what was there: at every instant
    ``out`` is the whole old directory or the whole new one. Linux swaps the two in one ``renameat2``
    (RENAME_EXCHANGE) and the old one is removed afterwards; where the filesystem cannot swap, the old one
    is first renamed aside (a crash between the two renames leaves both, whole, and no ``out``)."""
    import shutil

    if not out.exists():
        tmp.rename(out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp)
        return
    aside = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(aside)
    tmp.rename(out)
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is unsupported."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry, not only the file's data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """Text without terminal escape sequences (colours that Ray puts into remote tracebacks)."""
    return _ANSI.sub("", text)


def interface_of(ip: str) -> str | None:
    """The network interface that carries ``ip`` on this machine (``eth0``, ``ens5``, ...), or None.

    gloo and NCCL bind to the address the host name resolves to unless told an interface, and on most
    distributions the host name resolves to loopback (``127.0.1.1`` on Debian and Ubuntu), which no other
    node can reach; the interface of the node's Ray address is the one its peers can."""
    import socket

    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family in (socket.AF_INET, socket.AF_INET6) and a.address.split("%")[0] == ip for a in addrs):
            return name
    return None
