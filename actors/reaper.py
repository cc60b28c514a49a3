"""Clears away a local Ray whose driver died without shutting it down.

A driver that starts its own Ray (``ray.init`` without an address) and is then SIGKILLed leaves
some of that Ray's processes running for good: on this machine its dashboard agent and runtime-env
agent outlive the raylet they should share their fate with (ray-project/ray#52385). So the driver
starts this small watcher beside it, in a session of its own: it waits for the driver to die (the
pipe it holds reaches end-of-file, and the process is gone: a driver tearing down closes the pipe
before it ends, and still holds files of its session), gives Ray a moment to stop by itself, then
ends every process that still has a file open in that Ray session's directory — and nothing else.

  python -m actors.reaper SESSION_DIR DRIVER_PID     (stdin: a pipe the driver holds open)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 3.0  # Ray's own processes notice a dead driver within a second or two


def session_processes(session_dir: str | Path) -> list[int]:
    """Processes (other than this one) with a file open under ``session_dir``: that Ray's processes."""
    session_dir = str(Path(session_dir).resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd).startswith(session_dir + os.sep):
                    found.append(int(entry.name))
                    break
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found


def reap(session_dir: str | Path, *, grace_s: float = GRACE_S, spare: int | None = None) -> list[int]:
    """SIGTERM, then SIGKILL, every process of the Ray session but ``spare``; returns their pids."""
    time.sleep(grace_s)
    pids = [pid for pid in session_processes(session_dir) if pid != spare]
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
    return pids


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and has not ended (a zombie, ended but not
    yet waited for by its parent, has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc to read: whether the pid exists at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def watch(session_dir: str | Path) -> subprocess.Popen | None:
    """Start the watcher for this process's local Ray (None where /proc is not there to look in)."""
    if not Path("/proc/self/fd").is_dir():
        return None
    return subprocess.Popen([sys.executable, "-m", "actors.reaper", str(session_dir), str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def main() -> None:
    session_dir, driver = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver's Ctrl-C is for the driver
    sys.stdin.buffer.read()  # end-of-file: the driver died, or is tearing down (its objects closed)
    while alive(driver):  # never the driver itself: one tearing down still holds its session's files
        time.sleep(0.2)
    reap(session_dir, spare=driver)


if __name__ == "__main__":
    main()
