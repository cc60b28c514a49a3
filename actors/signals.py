"""SIGTERM, what a job scheduler sends, ends a run as Ctrl-C does: KILLED in MLflow, not RUNNING."""

from __future__ import annotations

import signal
import threading
from typing import Any


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_stop_signal() -> None:
    """Turn SIGTERM into KeyboardInterrupt in the main thread.

    Called at start-up and again after ``ray.init``, whose core installs a SIGTERM handler of its
    own that ends the process without a word (measured: the run stayed RUNNING).
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
