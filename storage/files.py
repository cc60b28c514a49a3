"""Files and directories that are whole or absent, and the one layer every durable write goes through.

Everything a run writes for a reader to trust later (matrix, report, run state, checkpoints,
snapshots) goes to a temporary name beside its target and is renamed over it: a reader, or a
run resumed after a kill, sees the old version or the new one, never half of either.

Every operation whose order decides what survives a crash — writing a file's data, fsync of a file
or a directory, rename, link, unlink, removing a tree, making a directory — is done by a function
here (or, for the replay log, announced through ``observe``), so that a test can watch them all and
stop the process at any one of them (``set_observer``; tests/unit/storage/test_crash_at_every_write.py
stops it at each, drops what was not fsynced, as a power cut would, and checks what a restore gets).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from storage.errors import StorageError

class DiskFullError(StorageError, OSError):
    """The device a commit writes to is full: names the path, what is free there and what was needed.
    The commit it stopped was not published: the last one stands."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps: torch reports a full disk as a failed file write) is ENOSPC."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
            return True
        if "No space left on device" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def disk_full_error(path: str | os.PathLike, needed: int | None, exc: BaseException) -> DiskFullError:
    """The error to raise for a full device while writing ``path`` (``needed``: bytes, when known)."""
    error = DiskFullError(f"no space left on the device holding {path}: {space_note(path, needed)} "
                          f"({type(exc).__name__}: {str(exc)[:200]}). The commit in progress was not published; the "
                          "last one stands. Free space there, or move the run to a larger disk, and continue it with "
                          "`forgetless resume`")
    error.errno = errno.ENOSPC
    return error


def space_note(path: str | os.PathLike, needed: int | None) -> str:
    """"X free of Y, about N is needed" for the device holding ``path`` (or its nearest existing parent)."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    usage = shutil.disk_usage(where)
    need = f"about {_size(needed)} is needed" if needed else "more is needed"
    return f"{_size(usage.free)} free of {_size(usage.total)}, {need}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (0 if it is not there)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


# (operation, *paths) -> None, called before each durable operation; None: nobody watches
_observer: Callable[..., None] | None = None


def set_observer(observer: Callable[..., None] | None) -> None:
    """Watch every durable operation from now on (None: stop). For tests of crash safety."""
    global _observer
    _observer = observer


def observe(operation: str, *paths: str | os.PathLike) -> None:
    """Announce a durable operation about to happen: ``write`` (a file's data: created, replaced or
    appended to), ``fsync``, ``fsync_dir``, ``rename`` (src, dst), ``link`` (src, dst), ``unlink``,
    ``rmtree``, ``mkdir``."""
    if _observer is not None:
        _observer(operation, *(os.fspath(p) for p in paths))


def fsync_file(handle_or_fd: int | object, path: str | os.PathLike) -> None:
    """fsync an open file (a descriptor, or anything with ``fileno()``) at ``path``."""
    observe("fsync", path)
    os.fsync(handle_or_fd if isinstance(handle_or_fd, int) else handle_or_fd.fileno())


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace``, announced: durable once the directory is fsynced."""
    observe("rename", src, dst)
    os.replace(src, dst)


def link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    observe("link", src, dst)
    os.link(src, dst)


def unlink(path: str | os.PathLike) -> None:
    """Remove a file if it is there."""
    if os.path.lexists(path):
        observe("unlink", path)
        Path(path).unlink(missing_ok=True)


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a directory and all under it, if it is there (errors ignored, links not followed)."""
    if os.path.lexists(path):
        observe("rmtree", path)
        shutil.rmtree(path, ignore_errors=True)


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p``, each level it creates announced."""
    path = Path(path)
    missing = []
    for level in [path, *path.parents]:
        if level.exists():
            break
        missing.append(level)
    for level in reversed(missing):
        observe("mkdir", level)
        level.mkdir(exist_ok=True)
    return path


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        observe("fsync_dir", path)
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under ``path`` and every directory, deepest first: what a rename is about
    to publish is on disk before the name points at it (a machine crash then finds the new
    content whole, or the old name). Links are not followed."""
    for folder, _dirs, files in os.walk(path, topdown=False, followlinks=False):
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                fsync_path(file)
        fsync_directory(folder)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file by its path (what any process wrote to it reaches the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync_file(fd, path)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename.

    Args:
        durable: fsync the file (and the directory) before returning, so the new content also
            survives a machine crash, not only the death of the process.
    """
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise (disk_full_error(path, len(data), exc) if is_disk_full(exc) else exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            observe("write", tmp)
            handle.write(data)
            handle.flush()
            if durable:
                fsync_file(handle, tmp)
        replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full_error(path, len(data), exc) from exc
        raise
    if durable:
        fsync_directory(path.parent)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path`` whole.

    Every file written into it is fsynced before the rename, and the parent directory after, so
    the new directory survives a machine crash as well as the death of the process. An older
    ``path`` is moved aside before the rename and deleted after it. A kill between those two renames
    leaves the old directory under ``.<name>.old-*``; the next call for the same path puts it back
    first. On an exception the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    make_dirs(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        remove_tree(stale)
    for aside in sorted(path.parent.glob(f".{path.name}.old-*")):
        if not path.exists():
            replace(aside, path)
        else:
            remove_tree(aside)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    observe("mkdir", tmp)
    try:
        yield tmp
        fsync_tree(tmp)  # the files first, then the names that publish them
    except BaseException as exc:
        written = tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full_error(path, max(written, tree_bytes(path)) or None, exc) from exc
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        remove_tree(old)
        replace(path, old)
    replace(tmp, path)
    fsync_directory(path.parent)
    if old is not None:
        remove_tree(old)
