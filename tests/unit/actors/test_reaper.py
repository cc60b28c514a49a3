"""The watcher of a local Ray: it ends the Ray session's processes once the driver is gone — and
never the driver itself, which closes the watcher's pipe while it tears down. And what a command
does itself before it exits: ends its local Ray, every process of it."""

import json
import os
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


def test_a_command_ends_its_local_ray_with_every_process_it_started(tmp_path):
    """``end_local_ray``: the driver's Ray (its GCS, raylet, dashboard and the workers and agents the
    raylet started) ended before the command exits, not left to the watcher."""
    script = ("import json, os, psutil, ray\nfrom actors.cluster import end_local_ray, start_local_ray\n"
              "start_local_ray(1)\n"
              "@ray.remote\ndef pid():\n    return os.getpid()\n"
              "worker = ray.get(pid.remote())\n"
              "node = ray._private.worker._global_node\n"
              "started = [i.process.pid for infos in node.all_processes.values() for i in infos]\n"
              "started += [c.pid for p in started for c in psutil.Process(p).children(recursive=True)]\n"
              "end_local_ray()\n"
              "def running(p):\n"
              "    try:\n        return psutil.Process(p).status() != psutil.STATUS_ZOMBIE\n"
              "    except psutil.Error:\n        return False\n"
              "print(json.dumps({'worker': worker, 'started': started, 'running': [p for p in started if running(p)],"
              " 'initialized': ray.is_initialized()}))\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(seen["started"]) >= 4 and seen["worker"] in seen["started"]  # GCS, raylet, dashboard..., a worker
    assert seen["running"] == [] and not seen["initialized"]
