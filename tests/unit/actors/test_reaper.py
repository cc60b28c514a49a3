"""The watcher of a local Ray: it ends the Ray session's processes once the driver is gone — and
never the driver itself, which closes the watcher's pipe while it tears down."""

import signal
import subprocess
import sys
import time
from pathlib import Path

from actors.reaper import GRACE_S

REPO = Path(__file__).resolve().parents[3]


def test_a_driver_tearing_down_is_spared_and_its_session_is_ended_once_it_is_gone(tmp_path):
    session = tmp_path / "session"
    session.mkdir()
    # a process of that Ray which outlives its driver: a file of the session open
    leftover = subprocess.Popen([sys.executable, "-c", f"f = open({str(session / 'agent.log')!r}, 'w')\n"
                                 "import time\ntime.sleep(120)"])
    # the driver: its own file in the session, the watcher's pipe closed (as its teardown does), then
    # seconds more of teardown — longer than the watcher's grace
    driver = ("import time\nfrom actors import reaper\n"
              f"log = open({str(session / 'driver.log')!r}, 'w')\n"
              f"watcher = reaper.watch({str(session)!r})\nwatcher.stdin.close()\n"
              f"time.sleep({GRACE_S + 2})\nprint('driver done', flush=True)\n")
    try:
        time.sleep(0.5)  # the leftover has its file open
        result = subprocess.run([sys.executable, "-c", driver], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout == "driver done\n", result.stderr
        assert leftover.wait(timeout=30) == -signal.SIGTERM  # and the session's process went after it
    finally:
        leftover.kill()
