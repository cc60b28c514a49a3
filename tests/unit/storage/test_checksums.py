"""Checksums of a directory written by several processes (a training state): what ``verify`` names."""

from __future__ import annotations

import json

import google_crc32c
import pytest

from storage import checksums


@pytest.fixture
def state(tmp_path):
    """A state of five files from two writers, each listing its share."""
    directory = tmp_path / "task-03.step-000020"
    (directory / "global_step26").mkdir(parents=True)
    for name, data in {"rank-000.json": b"{}", "rank-001.json": b'{"a": 1}', "strategy.safetensors": b"\x00" * 4096,
                       "global_step26/mp_rank_00_model_states.pt": bytes(range(256)) * 64,
                       "global_step26/zero_pp_rank_1_optim_states.pt": b"optimizer" * 1000}.items():
        (directory / name).write_bytes(data)
    for rank in (0, 1):
        checksums.write_share(directory, rank, 2)
    return directory


def test_the_shares_cover_every_file_once_with_its_size_and_crc32c(state):
    lists = [json.loads((state / f"checksums-rank-{r:03d}.json").read_text())["files"] for r in (0, 1)]
    assert not set(lists[0]) & set(lists[1])
    assert set(lists[0]) | set(lists[1]) == {"rank-000.json", "rank-001.json", "strategy.safetensors",
                                             "global_step26/mp_rank_00_model_states.pt",
                                             "global_step26/zero_pp_rank_1_optim_states.pt"}
    listed = {**lists[0], **lists[1]}
    data = (state / "rank-001.json").read_bytes()
    assert listed["rank-001.json"] == {"bytes": len(data), "crc32c": google_crc32c.value(data)}
    assert checksums.verify(state) == []


def test_a_flipped_bit_a_truncation_and_a_missing_file_are_each_named(state):
    model = state / "global_step26" / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[1000] ^= 0x10
    model.write_bytes(bytes(data))  # same size, another CRC
    (state / "strategy.safetensors").write_bytes(b"\x00" * 100)
    (state / "rank-001.json").unlink()
    problems = checksums.verify(state)
    assert len(problems) == 3, problems
    assert any(p.startswith(f"{model}: fails its checksum (CRC-32C ") for p in problems)
    assert f"{state / 'strategy.safetensors'}: 100 bytes, 4096 when it was saved (truncated or overwritten)" in problems
    assert f"{state / 'rank-001.json'}: missing (its checksum list names it)" in problems


def test_a_lost_or_unreadable_checksum_list_is_named(state):
    (state / "checksums-rank-001.json").unlink()
    assert checksums.verify(state) == [f"{state}: checksum list(s) checksums-rank-001.json missing, so some of its "
                                       "files cannot be checked"]
    (state / "checksums-rank-000.json").write_bytes(b"\xff\xfe not json")
    (problem,) = checksums.verify(state)
    assert problem.startswith(f"{state / 'checksums-rank-000.json'}: unreadable checksum list (UnicodeDecodeError")


def test_a_state_saved_without_checksums_has_nothing_to_check(tmp_path):
    (tmp_path / "rank-000.pt").write_bytes(b"older format")
    assert checksums.verify(tmp_path) == []
