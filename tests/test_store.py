"""The append-only trajectory store: round trip, torn tails, corruption, checkpoint positions, SIGKILL."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from unipost.data import Outcome, Trajectory, Turn
from unipost.rollout.store import StoreCorruptError, StorePosition, TrajectoryStore, load


def make_traj(i: int, pad: int = 0) -> Trajectory:
    """A trajectory with a teacher turn and a labelled student turn (unicode and newlines included)."""
    call = {
        "id": f"c{i}",
        "type": "function",
        "function": {"name": "terminal", "arguments": '{"command": "ls"}'},
    }
    return Trajectory(
        task_id=f"task-{i}",
        prompt=[
            {"role": "system", "content": "sys"},
            {"role": "user", "content": f"issue {i}\nline two é ✓"},
        ],
        turns=[
            Turn(
                index=0,
                executor="teacher",
                action={"role": "assistant", "content": "a", "tool_calls": [call]},
            ),
            Turn(
                index=1,
                executor="student",
                action={"role": "assistant", "content": "x" * pad},
                label={"role": "assistant", "content": "b", "tool_calls": [call]},
                observation=[{"role": "user", "content": "no tool call"}],
                action_token_ids=[1, 2, 3],
                action_logprobs=[-0.5, -1.25, -3.0],
                tool_error=True,
            ),
        ],
        outcome=Outcome(resolved=i % 2 == 0, submitted=True, reward=float(i % 2 == 0)),
        meta={"iteration": 3, "group": i, "beta": 0.5},
    )


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "trajs.jsonl"
    trajs = [make_traj(i) for i in range(5)]
    with TrajectoryStore(path) as store:
        store.append(trajs[0])
        pos = store.extend(trajs[1:])
        assert pos == store.position() == StorePosition(5, path.stat().st_size)
        assert len(store) == 5
    result = load(path)
    assert not result.truncated_tail and result.bad_lines == []
    assert result.trajectories == trajs  # pydantic equality: every field, floats exact
    assert result.position == StorePosition(5, path.stat().st_size)
    assert path.read_bytes().count(b"\n") == 5  # one line per trajectory


def test_reopening_continues_the_file(tmp_path):
    path = tmp_path / "t.jsonl"
    with TrajectoryStore(path) as store:
        store.extend([make_traj(0), make_traj(1)])
    with TrajectoryStore(path) as store:
        assert store.position().records == 2
        store.append(make_traj(2))
    assert [t.task_id for t in load(path).trajectories] == ["task-0", "task-1", "task-2"]


@pytest.mark.parametrize("cut", [1, 17, -2])
def test_truncated_last_line_is_reported_and_good_records_kept(tmp_path, caplog, cut):
    path = tmp_path / "t.jsonl"
    with TrajectoryStore(path) as store:
        store.extend([make_traj(i) for i in range(3)])
        good = store.position()
        store.append(make_traj(3))
    data = path.read_bytes()
    # cut the last record: 1 byte in, 17 bytes in, or just before its newline
    end = good.offset + cut if cut > 0 else len(data) + cut + 1
    path.write_bytes(data[:end])
    with caplog.at_level(logging.WARNING, logger="unipost.rollout.store"):
        result = load(path)
    assert result.truncated_tail
    assert result.bad_lines == [4]
    assert [t.task_id for t in result.trajectories] == ["task-0", "task-1", "task-2"]
    assert result.position == good
    assert any("line 4" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


def test_garbage_last_line_with_newline_is_a_torn_tail_too(tmp_path):
    path = tmp_path / "t.jsonl"
    with TrajectoryStore(path) as store:
        store.append(make_traj(0))
    with path.open("ab") as fh:
        fh.write(b"\x00\x00\x00\n")  # what a power loss can leave after the last fsync
    result = load(path)
    assert result.truncated_tail and len(result) == 1


def test_reopening_a_torn_store_cuts_the_tail_before_appending(tmp_path):
    path = tmp_path / "t.jsonl"
    with TrajectoryStore(path) as store:
        store.extend([make_traj(0), make_traj(1)])
    path.write_bytes(path.read_bytes()[:-40])  # torn second record
    with TrajectoryStore(path) as store:
        assert store.position().records == 1
        store.append(make_traj(2))
    result = load(path)
    assert not result.truncated_tail
    assert [t.task_id for t in result.trajectories] == ["task-0", "task-2"]


def test_corrupt_middle_line_raises_naming_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    with TrajectoryStore(path) as store:
        store.extend([make_traj(i) for i in range(4)])
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:30] + b"oops" + lines[1][30:]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(StoreCorruptError, match=rf"{path.name}:2: not a valid Trajectory"):
        load(path)
    lenient = load(path, strict=False)
    assert lenient.bad_lines == [2] and not lenient.truncated_tail
    assert [t.task_id for t in lenient.trajectories] == ["task-0", "task-2", "task-3"]
    with pytest.raises(StoreCorruptError):  # a schema violation is corruption too
        path.write_text('{"task_id": 1, "prompt": "no"}\n' + make_traj(0).model_dump_json() + "\n")
        load(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trajectory store"):
        load(tmp_path / "nope.jsonl")


def test_position_and_truncate_to_restore_a_checkpoint(tmp_path):
    path = tmp_path / "t.jsonl"
    store = TrajectoryStore(path)
    store.extend([make_traj(i) for i in range(3)])
    checkpoint = tuple(store.position())  # what a checkpoint would serialise
    store.extend([make_traj(i) for i in range(3, 6)])
    with path.open("ab") as fh:
        fh.write(b'{"task_id": "torn')  # and a crash mid-write after that
    store.truncate_to(checkpoint)
    assert store.position() == StorePosition(3, path.stat().st_size)
    store.append(make_traj(9))
    store.close()
    assert [t.task_id for t in load(path).trajectories] == ["task-0", "task-1", "task-2", "task-9"]

    store = TrajectoryStore(path)
    with pytest.raises(ValueError, match="not a record boundary"):
        store.truncate_to(StorePosition(1, 10))
    with pytest.raises(ValueError, match="not a record boundary"):
        store.truncate_to(StorePosition(2, checkpoint[1]))  # wrong record count for that offset
    with pytest.raises(ValueError, match="only"):
        store.truncate_to(StorePosition(10, 10**9))
    store.truncate_to(StorePosition(0, 0))
    assert path.stat().st_size == 0 and len(store) == 0
    store.close()


def test_credentials_in_meta_are_redacted_not_stored(tmp_path):
    """A credential in meta is replaced by *** (the trajectory itself is kept: refusing it would lose
    the episode and abort a collect)."""
    traj = make_traj(0)
    traj.meta["teacher"] = {"model": "m", "api_key": "sk-123", "headers": [{"Authorization": "Bearer x"}]}
    with TrajectoryStore(tmp_path / "t.jsonl") as store:
        store.append(traj)
    raw = (tmp_path / "t.jsonl").read_bytes()
    assert b"sk-123" not in raw and b"Bearer x" not in raw
    (stored,) = load(tmp_path / "t.jsonl").trajectories
    assert stored.meta["teacher"] == {"model": "m", "api_key": "***", "headers": [{"Authorization": "***"}]}


_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_store import make_traj
    from unipost.rollout.store import TrajectoryStore

    store = TrajectoryStore({path!r})
    for i in range(100000):
        store.append(make_traj(i, pad=200_000 if i % 2 else 10))  # big records: a kill can tear one
        print(i, flush=True)
    """
)


def test_sigkill_mid_run_loses_only_episodes_in_flight(tmp_path):
    """A real crash: the writer is SIGKILLed while appending; every reported-finished record survives."""
    path = tmp_path / "t.jsonl"
    script = _WRITER.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    finished = -1
    deadline = time.monotonic() + 60
    while finished < 25 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        finished = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert finished >= 25, "the writer did not get going"
    result = load(path)
    ids = [int(t.task_id.split("-")[1]) for t in result.trajectories]
    assert ids == list(range(len(ids)))  # a prefix, in order, no gaps
    assert len(ids) >= finished + 1  # everything that finished before the kill
    assert len(ids) <= finished + 2  # at most the one in flight when we read the last report
    torn = not path.read_bytes().endswith(b"\n")
    assert result.truncated_tail == torn
