"""DAgger's teacher labels off the tick's critical path (issue 23 item 4), against a REAL local HTTP
teacher that answers like a slow API (``benchmarks/latency_teacher.py``: latency per call, a cap).

What must hold: labels are requested as soon as a state exists and the engine never blocks a tick on
them (held answers do not stop the episodes); deferred labels, executed actions and the store's order
equal the synchronous path's; identical states cost one request; a label that fails after the teacher's
retries is a clear error that keeps every finished, fully labelled episode, or with
``TeacherLabels(on_missing="skip")`` a turn without a label that says why. No timings are asserted.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections import Counter
from pathlib import Path

import pytest
from factories import TOOLS

from unipost.data import Outcome, StepResult
from unipost.envs.embedded import ScriptedExpert
from unipost.objective import Recipe, StudentRollout, TeacherLabels, TurnMixture, Uniform
from unipost.rollout.engine import RolloutEngine
from unipost.rollout.label_queue import LabelFailedError, LabelQueue, labels_deferrable
from unipost.rollout.openai_policy import OpenAIChatPolicy
from unipost.rollout.policy import AgentState
from unipost.rollout.scripted import RandomToolPolicy, ScriptedPolicy
from unipost.rollout.store import TrajectoryStore, load

_spec = importlib.util.spec_from_file_location(
    "latency_teacher", Path(__file__).resolve().parents[1] / "benchmarks" / "latency_teacher.py"
)
latency_teacher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(latency_teacher)


class EchoEnv:
    """A tiny world without a sandbox: each command's observation names it and the task; never done."""

    steps = 0
    lock = threading.Lock()

    def __init__(self, task: str):
        self.task = task
        self.task_id = task
        self.tools = TOOLS

    def reset(self):
        return [
            {"role": "system", "content": "Fix the bug."},
            {"role": "user", "content": f"task {self.task}"},
        ]

    def step(self, action):
        with EchoEnv.lock:
            EchoEnv.steps += 1
        calls = action.get("tool_calls") or []
        if not calls:
            return StepResult([{"role": "user", "content": "no tool call"}], tool_error=True)
        args = json.loads(calls[0]["function"]["arguments"] or "{}")
        text = f"ran {args.get('command')!r} in {self.task}"
        return StepResult([{"role": "tool", "tool_call_id": calls[0]["id"], "content": text}])

    def verify(self):
        return Outcome(submitted=True)

    def close(self):
        pass


@pytest.fixture()
def teacher_server():
    server = latency_teacher.LatencyTeacher(min_ms=20, max_ms=60, cap=4).start()
    yield server
    server.stop()


def api_teacher(server, **kw) -> OpenAIChatPolicy:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 30.0)
    return OpenAIChatPolicy(server.url, latency_teacher.MODEL, api_key="none", concurrency=4, **kw)


def dagger(beta: float, on_missing: str = "error") -> Recipe:
    return Recipe(TurnMixture(beta), TeacherLabels(on_missing=on_missing), Uniform())


def collect(recipe, teacher, tasks, *, student=None, store=None, max_turns=4, concurrency=4, **kw):
    student = student if student is not None else RandomToolPolicy(TOOLS, seed=3, malformed_rate=0.2)
    engine = RolloutEngine(
        EchoEnv,
        student=student,
        teacher=teacher,
        recipe=recipe,
        max_turns=max_turns,
        concurrency=concurrency,
        progress=False,
        **kw,
    )
    return engine, engine.collect(tasks, iteration=0, store=store)


def test_the_api_teacher_defers_and_the_scripted_expert_does_not(teacher_server):
    with api_teacher(teacher_server) as teacher:
        assert labels_deferrable(teacher)
        engine, _ = collect(dagger(0.0), teacher, [])
        assert engine.defer_labels and engine.label_concurrency == teacher.concurrency
        engine, _ = collect(dagger(0.0), teacher, [], defer_labels=False)
        assert not engine.defer_labels
    expert = ScriptedExpert()  # reads the live workspace: its labels must be computed at the state
    assert not labels_deferrable(expert)
    teacher_only = Recipe(TurnMixture(1.0), TeacherLabels())
    student = RandomToolPolicy(TOOLS)
    assert not RolloutEngine(EchoEnv, student=student, teacher=expert, recipe=teacher_only).defer_labels
    with pytest.raises(ValueError, match="messages_only"):
        RolloutEngine(EchoEnv, student=student, teacher=expert, recipe=teacher_only, defer_labels=True)
    with pytest.raises(ValueError, match="messages_only"):
        LabelQueue(expert, concurrency=2, greedy=False)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_deferred_labels_equal_the_synchronous_path(teacher_server, tmp_path, beta):
    """Same episodes (the student's sampling is untouched), same labels, same store order."""
    tasks = [f"t{i}" for i in range(7)]
    runs = {}
    for defer in (False, True):
        with api_teacher(teacher_server) as teacher:
            store = TrajectoryStore(tmp_path / f"{defer}.jsonl")
            _, batch = collect(dagger(beta), teacher, tasks, store=store, defer_labels=defer)
            store.close()
        assert batch.stats.deferred_labels is defer
        runs[defer] = (batch, load(tmp_path / f"{defer}.jsonl").trajectories)
    (sync, sync_stored), (deferred, deferred_stored) = runs[False], runs[True]
    assert len(sync.trajectories) == len(tasks) and sync.stats.turns == 4 * len(tasks)
    dump = lambda trajs: [t.model_dump() for t in trajs]
    assert dump(deferred.trajectories) == dump(sync.trajectories)
    assert dump(deferred_stored) == dump(sync_stored), "the store's order is the synchronous path's"
    for traj in deferred.trajectories:
        for turn in traj.turns:
            assert turn.label is not None and turn.label["tool_calls"], "every visited state is labelled"
    if beta:
        assert 0 < deferred.stats.teacher_turns < deferred.stats.turns  # executed turns went through too
    assert deferred.stats.teacher_queries == sync.stats.teacher_queries == deferred.stats.turns


def test_ticks_do_not_wait_for_labels(teacher_server):
    """Every label answer is held until all episodes have taken all their steps: the deferred engine
    finishes the episodes meanwhile (the synchronous one would stall on its first tick), then
    resolves every label before collect returns."""
    n, max_turns = 6, 4
    teacher_server.gate = threading.Event()
    EchoEnv.steps = 0
    released = {}

    def release_when_all_steps_are_taken():
        for _ in range(1000):  # up to 10 s: only a deadlock breaker for the synchronous path
            if EchoEnv.steps >= n * max_turns:
                released["by"] = "all steps taken"
                released["requests_seen"] = len(teacher_server.requests)
                break
            threading.Event().wait(0.01)
        else:
            released["by"] = "timeout"
        teacher_server.gate.set()

    watcher = threading.Thread(target=release_when_all_steps_are_taken, daemon=True)
    watcher.start()
    with api_teacher(teacher_server) as teacher:
        _, batch = collect(
            dagger(0.0), teacher, [f"t{i}" for i in range(n)], max_turns=max_turns, concurrency=n
        )
    watcher.join()
    assert released["by"] == "all steps taken", "a tick waited for a teacher label"
    assert released["requests_seen"] > 0, "labels are requested while the episodes run, not after"
    stats = batch.stats
    assert stats.ticks_blocked_on_teacher == 0 and stats.ticks >= max_turns
    assert stats.teacher_requests == stats.turns == n * max_turns
    assert all(turn.label is not None for traj in batch.trajectories for turn in traj.turns)


def test_identical_states_cost_one_request(teacher_server):
    """A group of 4 samples of a deterministic student visits the same states: one request each."""
    student = ScriptedPolicy(
        lambda s: {
            "content": "",
            "tool_calls": [
                {
                    "id": f"c{s.turn}",
                    "type": "function",
                    "function": {"name": "terminal", "arguments": json.dumps({"command": f"ls {s.turn}"})},
                }
            ],
        }
    )
    recipe = Recipe(StudentRollout(group_size=4), TeacherLabels(), Uniform())
    with api_teacher(teacher_server) as teacher:
        _, batch = collect(recipe, teacher, ["a", "b", "c"], student=student, max_turns=3, concurrency=12)
    stats = batch.stats
    assert stats.teacher_queries == 3 * 4 * 3 and stats.teacher_requests == 3 * 3
    assert stats.label_cache_hits == stats.teacher_queries - stats.teacher_requests
    assert len(teacher_server.requests) == 9 == len(set(teacher_server.requests))
    for g in range(3):
        group = batch.trajectories[4 * g : 4 * g + 4]
        assert all(t.turns == group[0].turns for t in group) and group[0].turns[2].label is not None


def test_a_failed_label_is_a_clear_error_that_keeps_finished_episodes(teacher_server, tmp_path):
    teacher_server.fail_substring = "task poison"
    tasks = ["a", "b", "poison", "c", "d"]
    store = TrajectoryStore(tmp_path / "s.jsonl")
    expected = r"poison.*TeacherUnavailableError.*on_missing='skip'"
    with (
        api_teacher(teacher_server, max_retries=1) as teacher,
        pytest.raises(LabelFailedError, match=expected) as err,
    ):
        collect(dagger(0.0), teacher, tasks, store=store, max_turns=2, concurrency=2)
    store.close()
    kept = err.value.trajectories
    kept_ids = [t.task_id for t in kept]
    assert {"a", "b"} <= set(kept_ids) and "poison" not in kept_ids
    assert [t.task_id for t in load(tmp_path / "s.jsonl").trajectories] == kept_ids
    assert all(turn.label is not None for t in kept for turn in t.turns)
    # the teacher's own retries, not a second layer: each failing state was tried max_retries + 1 times
    failing = [n for n in Counter(teacher_server.requests).values() if n > 1]
    assert failing and set(failing) == {2}


def test_a_failed_label_with_on_missing_skip_leaves_the_turn_unlabelled_and_says_why(teacher_server):
    teacher_server.fail_substring = "task poison"
    with api_teacher(teacher_server, max_retries=0) as teacher:
        _, batch = collect(dagger(0.0, "skip"), teacher, ["a", "poison", "b"], max_turns=3, concurrency=3)
    by_id = {t.task_id: t for t in batch.trajectories}
    assert set(by_id) == {"a", "poison", "b"}
    poison = by_id["poison"]
    assert all(turn.label is None for turn in poison.turns)
    assert [e["turn"] for e in poison.meta["label_errors"]] == [0, 1, 2]
    assert "TeacherUnavailableError" in poison.meta["label_errors"][0]["error"]
    assert batch.stats.label_failures == 3
    assert all(turn.label is not None for t in (by_id["a"], by_id["b"]) for turn in t.turns)
    assert TeacherLabels(on_missing="skip").select(poison) == []


def test_a_failed_teacher_executed_turn_is_a_label_failed_error_that_keeps_finished_episodes(
    teacher_server, tmp_path
):
    """beta 1: the teacher executes every turn (urgent requests). Its failure at the poisoned task stops
    the collection with LabelFailedError carrying, and having stored, the episodes that finished before
    (the old code let the teacher's own error escape and dropped finished episodes awaiting labels)."""
    teacher_server.fail_substring = "task poison"
    store = TrajectoryStore(tmp_path / "s.jsonl")
    with (
        api_teacher(teacher_server, max_retries=0) as teacher,
        pytest.raises(
            LabelFailedError, match=r"teacher-executed turn failed.*poison.*cannot be skipped"
        ) as err,
    ):
        collect(
            dagger(1.0, "skip"), teacher, ["a", "b", "poison", "c"], store=store, max_turns=2, concurrency=2
        )
    store.close()
    kept_ids = [t.task_id for t in err.value.trajectories]
    assert kept_ids == ["a", "b"]
    assert [t.task_id for t in load(tmp_path / "s.jsonl").trajectories] == kept_ids


def test_the_label_queue_asks_again_for_a_state_whose_request_failed(teacher_server):
    """A failed answer is not a cache entry: the next request for that state goes to the teacher again
    (the synchronous path would ask again), and succeeds once the teacher is back."""
    teacher_server.fail_substring = "task 0"
    state = AgentState([{"role": "user", "content": "task 0"}], TOOLS, None, 0)
    with (
        api_teacher(teacher_server, max_retries=0) as teacher,
        LabelQueue(teacher, concurrency=1, greedy=True) as labels,
    ):
        first = labels.request(state)
        with pytest.raises(Exception, match="HTTP"):
            first.result(timeout=30)
        teacher_server.fail_substring = None
        again = labels.request(state, urgent=True)
        assert again is not first and again.result(timeout=30).message["tool_calls"]
    assert labels.requests == 2 and labels.cache_hits == 0


def test_the_label_queue_sends_urgent_requests_first_and_promotes_a_queued_twin(teacher_server):
    teacher_server.gate = threading.Event()
    messages = [[{"role": "user", "content": f"task {i}"}] for i in range(4)]
    with api_teacher(teacher_server) as teacher, LabelQueue(teacher, concurrency=1, greedy=False) as labels:
        states = [AgentState(m, TOOLS, None, 0) for m in messages]
        first = labels.request(states[0])  # the only worker takes it; the gate holds its answer
        while not teacher_server.requests:
            threading.Event().wait(0.01)
        queued = [labels.request(s) for s in states[1:]]
        twin = labels.request(states[3], urgent=True)  # the same state as the last label, needed now
        assert twin is queued[-1] and labels.cache_hits == 1
        teacher_server.gate.set()
        for f in (first, *queued):
            assert f.result(timeout=30).message["tool_calls"]
    digests = [latency_teacher.LatencyTeacher.digest({"messages": m, "tools": TOOLS}) for m in messages]
    assert teacher_server.requests == [digests[0], digests[3], digests[1], digests[2]]
    assert labels.requests == 4


def test_the_train_config_switch_reaches_the_engine(teacher_server):
    from types import SimpleNamespace

    from unipost.train.build import build_engine
    from unipost.train.lab import tiny_config

    with api_teacher(teacher_server) as teacher:
        parts = SimpleNamespace(
            make_env=EchoEnv,
            student_policy=RandomToolPolicy(TOOLS),
            teacher_policy=teacher,
            renderer=SimpleNamespace(count_tokens=lambda messages, tools: 0),
        )
        for flag in (True, False):
            config = tiny_config(rollout={"defer_labels": flag})
            assert build_engine(config, dagger(0.0), parts).defer_labels is flag
