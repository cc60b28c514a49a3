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
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

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
            if os.path.islink(file):
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                fsync_file(fd, file)
            finally:
                os.close(fd)
        fsync_directory(folder)


def write_atomic(path: str | os.PathLike, data: bytes | str, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename.

    Args:
        durable: fsync the file (and the directory) before returning, so the new content also
            survives a machine crash, not only the death of the process.
    """
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            observe("write", tmp)
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            if durable:
                fsync_file(handle, tmp)
        replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)  # the files first, then the names that publish them
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        remove_tree(old)
        replace(path, old)
    replace(tmp, path)
    fsync_directory(path.parent)
    if old is not None:
        remove_tree(old)
