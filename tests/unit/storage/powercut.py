"""A power cut at a chosen durable operation, as ``storage.files``' observer.

The model, per POSIX and what ext4/xfs do in practice:

- a file's data is on disk once the file was fsynced; what was written after (or never fsynced)
  is lost: the file keeps its content of the last fsync, a file never fsynced is empty;
- a name (a file or directory created, renamed, linked or removed) is on disk once its directory
  was fsynced; a change to a name not followed by that is undone;
- whatever was there when the watch began is on disk.

``PowerCut(root, stop_at=n)`` counts the operations under ``root``; at the ``n``-th (before it
runs) it rewinds ``root`` to what a power cut would leave and ends the process (exit ``CUT``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CUT = 42  # the exit status of a process the cut ended


class PowerCut:
    def __init__(self, root: str | os.PathLike, stop_at: int | None):
        self.root, self.stop_at, self.count = Path(os.path.abspath(root)), stop_at, 0
        self.synced: dict[int, bytes] = {}  # inode -> its content on disk
        self.dirty: set[int] = set()  # inodes written since their last fsync
        self.created: list[Path] = []  # files announced before they existed: their inode is taken next time
        self.undo: list[tuple] = []  # name changes not yet durable, oldest first: (directory, kind, ...)
        for path in self.root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                self.synced.setdefault(path.stat().st_ino, path.read_bytes())

    def _durable(self, inode: int) -> bytes:
        return self.synced.get(inode, b"")

    def _stash(self, path: Path) -> dict[str, bytes | None]:
        """What a tree (or file) under ``path`` holds on disk: relative path -> bytes (None: a directory)."""
        if path.is_file():
            return {"": self._durable(path.stat().st_ino)}
        tree: dict[str, bytes | None] = {"": None}
        for item in sorted(path.rglob("*")):
            tree[str(item.relative_to(path))] = None if item.is_dir() else self._durable(item.stat().st_ino)
        return tree

    def __call__(self, operation: str, *paths: str) -> None:
        where = [Path(os.path.abspath(p)) for p in paths]
        if not all(p.is_relative_to(self.root) for p in where):
            return
        for path in self.created:  # created by the operation before: dirty until fsynced
            if path.is_file():  # a new file: an inode number a removed file had says nothing of it
                inode = path.stat().st_ino
                self.synced.pop(inode, None)
                self.dirty.add(inode)
        self.created = []
        self.count += 1
        if self.count == self.stop_at:
            self.cut()
            os._exit(CUT)
        self._record(operation, where)

    def _record(self, operation: str, paths: list[Path]) -> None:
        path = paths[0]
        if operation == "write":
            if path.exists():
                self.dirty.add(path.stat().st_ino)
            else:
                self.undo.append((path.parent, "create", path))
                self.created.append(path)
        elif operation == "fsync":
            inode = path.stat().st_ino
            self.synced[inode] = path.read_bytes()
            self.dirty.discard(inode)
        elif operation == "fsync_dir":
            self.undo = [entry for entry in self.undo if entry[0] != path]
        elif operation == "rename":
            src, dst = paths
            previous = self._stash(dst) if dst.exists() else None
            self.undo.append((dst.parent, "rename", src, dst, previous))
        elif operation == "link":
            self.undo.append((paths[1].parent, "create", paths[1]))
        elif operation in ("unlink", "rmtree"):
            self.undo.append((path.parent, "remove", path, self._stash(path)))
        elif operation == "mkdir":
            self.undo.append((path.parent, "create", path))
        else:
            raise ValueError(f"unknown durable operation {operation!r}")

    def cut(self) -> None:
        """Rewind ``root`` to what is on disk: first each file's content (while every inode number
        still names one file), then the name changes, whose restored files carry their durable
        content already and may be given a number a dirty file had."""
        by_inode: dict[int, list[Path]] = {}
        for path in self.root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                by_inode.setdefault(path.stat().st_ino, []).append(path)
        for inode in self.dirty:
            for path in by_inode.get(inode, []):
                path.write_bytes(self._durable(inode))
        for entry in reversed(self.undo):
            kind = entry[1]
            if kind == "create":
                _remove(entry[2])
            elif kind == "rename":
                _, _, src, dst, previous = entry
                if dst.exists() or dst.is_symlink():
                    src.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(dst, src)
                if previous is not None:
                    _restore(dst, previous)
            elif kind == "remove":
                _remove(entry[2])
                _restore(entry[2], entry[3])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _restore(path: Path, tree: dict[str, bytes | None]) -> None:
    if not path.parent.exists():
        return  # its directory is not on disk either
    for relative, data in tree.items():
        target = path / relative if relative else path
        if data is None:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
