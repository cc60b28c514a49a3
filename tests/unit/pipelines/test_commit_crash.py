"""Crash at every write of a task commit: the training state saved (``Learner.save_state``: every
rank's files fsynced, the directory renamed into place), then the record naming it (as report.json),
then the older state removed — stopped by a power cut at each durable operation in turn
(tests/unit/storage/powercut.py). After every one, the state the record names loads, and holds the
weights of that task: never a record naming a state the disk lacks or holds half of."""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch

from pipelines.learner import silence_library_noise
from storage import checksums, files
from storage.files import write_atomic
from tests.unit.storage.powercut import CUT, PowerCut

silence_library_noise()
def commit_scenario(learner, root: Path) -> None:
    """Two task commits as the scheduler makes them: the training state saved (every rank's files
    fsynced, the directory renamed into place), then the record naming it, then the older state removed."""
    for index in (0, 1):
        with torch.no_grad():
            next(learner.model.parameters()).add_(1.0)  # what training the task changed
        state = learner.save_state(root / "state" / f"task-{index:02d}")
        write_atomic(root / "report.json", json.dumps({"training_state": str(state), "task": index}))
        for older in (root / "state").glob("task-*"):
            if older != state:
                files.remove_tree(older)


def test_a_power_cut_at_any_write_of_a_task_commit_leaves_a_state_that_loads(make_learner_for_commit, tmp_path):
    learner, fresh = make_learner_for_commit
    start = next(learner.model.parameters()).detach().clone()
    counter = PowerCut(tmp_path / "count", stop_at=None)
    (tmp_path / "count").mkdir()
    files.set_observer(counter)
    try:
        commit_scenario(learner, tmp_path / "count")
    finally:
        files.set_observer(None)
    total = counter.count
    print(f"the task commits make {total} durable operations (DeepSpeed's own file writes are not among them: "
          "they are fsynced before the rename that publishes them)")
    committed = []
    for n in range(1, total + 1):
        root = tmp_path / f"cut-{n:03d}"
        root.mkdir()
        with torch.no_grad():
            next(learner.model.parameters()).copy_(start)
        pid = os.fork()
        if pid == 0:
            try:
                # The process group of one lives in the parent: a collective here would wait on the
                # parent's sockets. In a group of one, each is the identity.
                for collective in ("barrier", "all_reduce", "broadcast"):
                    setattr(torch.distributed, collective, lambda *args, **kwargs: None)
                faulthandler.dump_traceback_later(30, exit=True)  # a hang is named, not waited out
                files.set_observer(PowerCut(root, n))
                commit_scenario(learner, root)
                os._exit(0)
            except BaseException:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                os._exit(3)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == CUT, f"cut at operation {n}"
        report = root / "report.json"
        if not report.exists():
            committed.append(None)
            continue
        named = json.loads(report.read_text())
        assert checksums.verify(named["training_state"]) == [], f"cut at operation {n}: the named state is damaged"
        try:
            fresh.load_state(named["training_state"])
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"after a power cut at operation {n} of {total}: the record names task {named['task']}'s "
                        f"state, which does not load: {type(exc).__name__}: {exc}")
        expected = start + named["task"] + 1
        torch.testing.assert_close(next(fresh.model.parameters()).detach(), expected, rtol=0, atol=0)
        committed.append(named["task"])
    assert set(committed) == {None, 0, 1}


@pytest.fixture
def make_learner_for_commit(make_learner, toy_stream_config):
    toy_stream_config["training"].update(zero_stage=0)
    learner, _, _ = make_learner(toy_stream_config)
    fresh, _, _ = make_learner(toy_stream_config)
    yield learner, fresh
    learner.close()
    fresh.close()
