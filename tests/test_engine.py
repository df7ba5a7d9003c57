"""The rollout engine on the real embedded environment, with the scripted expert as teacher.

What must hold (issue 3): the turn-level mixture executes the teacher at rate beta; DAgger records the
teacher's label at every visited state; AggreVaTe switches executor exactly at k; SFT with the expert
resolves; GRPO groups; budgets end episodes with the right failure modes; malformed tool calls and
crashing environments never end the run; batching does not change greedy trajectories.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from unipost.data import Message
from unipost.envs.embedded import EmbeddedEnv, ScriptedExpert, bwrap_available, play_split
from unipost.objective import (
    GRPO,
    SFT,
    AggreVaTe,
    DAgger,
    EpisodePlan,
    OwnSamples,
    PrefixSwitch,
    Recipe,
    StudentRollout,
    TurnMixture,
    UniformPrefix,
)
from unipost.rollout.engine import CONTEXT_OVERFLOW, RolloutEngine
from unipost.rollout.policy import AgentState, PolicyOutput
from unipost.rollout.scripted import RandomToolPolicy, ScriptedPolicy
from unipost.rollout.store import TrajectoryStore, load

pytestmark = pytest.mark.skipif(not bwrap_available(), reason="the embedded env needs bubblewrap")

Z999 = 3.2905  # two-sided 99.9% normal quantile


def tasks(n: int, split: str = "train", difficulty: str = "easy", start: int = 0) -> list[tuple]:
    return [(split, start + i, difficulty) for i in range(n)]


def make_env(task) -> EmbeddedEnv:
    return EmbeddedEnv.from_split(*task)


def tools() -> list[dict]:
    return EmbeddedEnv.from_split("train", 0, "easy").tools


def weak_student(seed: int = 0, *, finish: bool = False) -> RandomToolPolicy:
    """Random (20% malformed) tool calls; without ``finish`` so the teacher decides when episodes end."""
    schemas = [t for t in tools() if finish or t["function"]["name"] != "finish"]
    return RandomToolPolicy(schemas, seed=seed, malformed_rate=0.2)


def engine(recipe, *, student=None, teacher=None, **kwargs) -> RolloutEngine:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("concurrency", 8)
    return RolloutEngine(make_env, student=student, teacher=teacher, recipe=recipe, **kwargs)


def executors(traj) -> list[str]:
    return [t.executor for t in traj.turns]


# -- recipes: who executes, what is labelled ---------------------------------------------------------


def test_turn_mixture_matches_beta_and_dagger_labels_every_state():
    beta = 0.3
    eng = engine(DAgger(beta), student=weak_student(), teacher=ScriptedExpert(), max_turns=24)
    batch = eng.collect(tasks(24), iteration=0)
    stats = batch.stats
    n = stats.turns
    assert n >= 300, "too few turns for a meaningful interval"
    # teacher-executed fraction: Binomial(n, beta) within its two-sided 99.9% interval
    half = Z999 * math.sqrt(beta * (1 - beta) / n)
    assert abs(stats.teacher_fraction - beta) <= half, (stats.teacher_fraction, beta, half)
    assert 0 < stats.teacher_turns < n
    for i, traj in enumerate(batch.trajectories):
        # the executors are exactly the episode's plan, re-derived independently of the run
        plan = eng.plan_episode(eng.recipe.rollout, 0, i, 0)
        assert executors(traj) == plan.executors(len(traj.turns))
        assert traj.meta["beta"] == beta and traj.meta["group"] == i and traj.meta["iteration"] == 0
        for turn in traj.turns:
            assert turn.label is not None, "DAgger needs the teacher's label at EVERY visited state"
            assert turn.label.get("tool_calls"), "the expert always acts through a tool"
            if turn.executor == "teacher":
                assert turn.label == turn.action and turn.action_token_ids is None
    # one teacher query per visited state (executed turns and labels), never more
    assert stats.teacher_queries == n
    assert stats.student_queries == n - stats.teacher_turns
    # the student is weak: its turns include malformed calls, recorded as tool-use errors
    assert stats.tool_errors > 0


def test_mixture_without_teacher_labels_only_queries_teacher_turns():
    """Mixture rollouts trained on own samples (mixture OPD) do not pay for labels at student turns."""
    recipe = Recipe(TurnMixture(0.5), OwnSamples())
    batch = engine(recipe, student=weak_student(1), teacher=ScriptedExpert(), max_turns=10).collect(
        tasks(6), 0
    )
    assert batch.stats.teacher_queries == batch.stats.teacher_turns > 0
    for traj in batch.trajectories:
        for turn in traj.turns:
            assert (turn.label is not None) == (turn.executor == "teacher")


def test_aggrevate_switches_executor_exactly_at_k():
    batch = engine(AggreVaTe(k=3), student=weak_student(2), teacher=ScriptedExpert(), max_turns=30).collect(
        tasks(4), 0
    )
    for traj in batch.trajectories:
        assert traj.meta["prefix_k"] == 3
        assert executors(traj) == ["student"] * 3 + ["teacher"] * (len(traj.turns) - 3)
        assert all(t.label is not None for t in traj.turns)
    # a random prefix law: each episode switches at its own k, recorded in meta
    eng = engine(
        Recipe(PrefixSwitch(UniformPrefix(0, 4)), OwnSamples(executor="teacher")),
        student=weak_student(3),
        teacher=ScriptedExpert(),
        max_turns=30,
    )
    batch = eng.collect(tasks(6), 0)
    ks = [traj.meta["prefix_k"] for traj in batch.trajectories]
    assert len(set(ks)) > 1
    for traj, k in zip(batch.trajectories, ks, strict=True):
        assert executors(traj) == ["student"] * k + ["teacher"] * (len(traj.turns) - k)


def test_sft_with_the_expert_resolves_and_store_receives_episodes_as_they_finish(tmp_path):
    store_path = tmp_path / "trajs.jsonl"
    seen: list[int] = []

    class WatchingExpert(ScriptedExpert):
        """The expert, noting how many trajectories the store holds whenever it is asked to act."""

        def act(self, states, *, greedy=False):
            seen.append(len(load(store_path)) if store_path.exists() else 0)
            return super().act(states, greedy=greedy)

    # mixed difficulties: short episodes finish while long ones still run
    work = [("heldout", i, "easy" if i % 2 else "hard") for i in range(6)]
    with TrajectoryStore(store_path) as store:
        batch = engine(SFT(), teacher=WatchingExpert(), max_turns=40, concurrency=6).collect(
            work, 0, store=store
        )
    assert batch.stats.resolve_rate == 1.0 and batch.stats.teacher_fraction == 1.0
    assert all(t.outcome.resolved and t.outcome.reward == 1.0 for t in batch.trajectories)
    assert all(turn.label == turn.action for t in batch.trajectories for turn in t.turns)
    assert [t.task_id for t in batch.trajectories] == [EmbeddedEnv.from_split(*w).task.task_id for w in work]
    stored = load(store_path).trajectories
    assert sorted(stored, key=lambda t: t.meta["group"]) == batch.trajectories
    assert 0 < max(seen) < len(work), "finished episodes reach the store before the run ends"
    # the same episodes as the standalone expert loop, turn for turn
    _, alone = play_split(*work[0], max_turns=40)
    assert [t.action for t in batch.trajectories[0].turns] == [t.action for t in alone.turns]


def test_grpo_groups():
    batch = engine(GRPO(group_size=3), student=weak_student(4, finish=True), max_turns=4).collect(tasks(2), 5)
    assert len(batch) == 6
    assert [(t.meta["group"], t.meta["sample"]) for t in batch.trajectories] == [
        (g, s) for g in range(2) for s in range(3)
    ]
    assert all(t.meta["group_size"] == 3 and t.meta["iteration"] == 5 for t in batch.trajectories)
    assert all(t.teacher_fraction == 0.0 for t in batch.trajectories)
    assert batch.stats.teacher_queries == 0


def test_iteration_is_recorded_whatever_the_protocol_plans():
    """GRPO groups are keyed by (iteration, group) and group numbers restart in every collection, so the
    engine records the collection's iteration itself: a custom protocol whose plans omit it (as the
    RolloutProtocol contract allows) must not let aggregated data pool different iterations' groups."""

    class NoIterationRollout:
        needs = frozenset()
        group_size = 2
        uses_teacher, uses_student, collects = False, True, True

        def plan(self, iteration, rng):
            return EpisodePlan(lambda t: "student", {"beta": 0.0})

    recipe = dataclasses.replace(GRPO(group_size=2), rollout=NoIterationRollout())
    batch = engine(recipe, student=weak_student(1, finish=True), max_turns=2).collect(tasks(1), 7)
    assert [t.meta["iteration"] for t in batch.trajectories] == [7, 7]


def test_constructor_and_collect_validate():
    with pytest.raises(ValueError, match="no teacher policy"):
        engine(DAgger(0.5), student=weak_student())
    with pytest.raises(ValueError, match="no student policy"):
        engine(GRPO(4))
    with pytest.raises(ValueError, match="max_turns"):
        engine(SFT(), teacher=ScriptedExpert(), max_turns=0)
    with pytest.raises(ValueError, match="count_tokens"):
        engine(SFT(), teacher=ScriptedExpert(), context_budget=100)
    with pytest.raises(ValueError, match="collects no rollouts"):
        engine(SFT(data="x.jsonl"), teacher=ScriptedExpert())
    with pytest.raises(ValueError, match="iteration"):
        engine(SFT(), teacher=ScriptedExpert()).collect(tasks(1), -1)


# -- budgets -----------------------------------------------------------------------------------------


def test_turn_budget_ends_with_budget_exhaustion():
    task = ("heldout", 1, "medium")
    _, full = play_split(*task)
    # stop one turn short of `finish`: the fix is in, the episode is not submitted
    batch = engine(SFT(), teacher=ScriptedExpert(), max_turns=len(full.turns) - 1).collect([task] * 2, 0)
    for traj in batch.trajectories:
        assert len(traj.turns) == len(full.turns) - 1
        assert traj.meta["ended_by"] == "turn_budget"
        assert traj.outcome.failure_mode == "budget_exhaustion" and not traj.outcome.submitted
    assert batch.stats.ended_by == {"turn_budget": 2}


def count_chars(messages: list[Message], tools: list[dict]) -> int:
    return sum(len(m.get("content") or "") for m in messages)


def test_context_budget_ends_before_exceeding_with_context_overflow():
    task = ("heldout", 2, "medium")
    prompt = EmbeddedEnv.from_split(*task).reset()
    budget = count_chars(prompt, []) + 1500
    eng = engine(SFT(), teacher=ScriptedExpert(), context_budget=budget, count_tokens=count_chars)
    (traj,) = eng.collect([task], 0).trajectories
    assert traj.meta["ended_by"] == "context_budget"
    assert traj.outcome.failure_mode == "context_overflow"
    assert 0 < len(traj.turns) < 8
    for t in range(len(traj.turns)):  # every state acted from was within budget ...
        assert count_chars(traj.context(t), []) <= budget
    assert count_chars(traj.messages(), []) > budget  # ... and the next one was not


def test_policy_refusing_an_overlong_prompt_ends_with_context_overflow():
    def refuse(state: AgentState) -> PolicyOutput:
        if state.turn < 2:
            return PolicyOutput({"role": "assistant", "content": "thinking"})
        return PolicyOutput({"role": "assistant", "content": ""}, tool_error=CONTEXT_OVERFLOW)

    recipe = Recipe(StudentRollout(), OwnSamples())
    (traj,) = engine(recipe, student=ScriptedPolicy(refuse)).collect(tasks(1), 0).trajectories
    assert len(traj.turns) == 2 and traj.meta["ended_by"] == "context_budget"


# -- robustness --------------------------------------------------------------------------------------


def garbage(state: AgentState) -> PolicyOutput:
    """Malformed output, including a 'finish' call the parser rejected: it must not be executed."""
    finish = {"id": "x", "type": "function", "function": {"name": "finish", "arguments": "{}"}}
    if state.turn % 2:
        return PolicyOutput({"role": "assistant", "content": "<tool_call>{not json"}, tool_error="bad JSON")
    return PolicyOutput(
        {"role": "assistant", "content": "", "tool_calls": [finish]}, tool_error="unknown argument 'x'"
    )


def test_malformed_tool_calls_become_error_observations_and_tool_use_errors():
    recipe = Recipe(StudentRollout(), OwnSamples())
    batch = engine(recipe, student=ScriptedPolicy(garbage), max_turns=4).collect(tasks(3), 0)
    assert batch.stats.tool_errors == batch.stats.turns == 12
    for traj in batch.trajectories:
        assert len(traj.turns) == 4, "the rejected finish call was not executed"
        assert not traj.outcome.submitted and traj.outcome.failure_mode == "tool_use_error"
        for turn in traj.turns:
            assert turn.tool_error and "tool_calls" not in turn.action
            assert turn.observation[0]["content"].startswith("ERROR: your last message did not contain")
        assert "bad JSON" in traj.turns[1].observation[0]["content"]


class FlakyEnv(EmbeddedEnv):
    """Raises inside step() on turn 2 of one task: a crashed sandbox, a full disk, a bug."""

    def step(self, action):
        if self.task.index == 1 and len(self.actions) == 2:
            raise OSError("sandbox exploded")
        return super().step(action)


def test_environment_exception_ends_only_its_episode():
    def factory(task):
        if task[1] == 3:
            raise RuntimeError("no such task")
        return FlakyEnv.from_split(*task)

    eng = RolloutEngine(factory, student=None, teacher=ScriptedExpert(), recipe=SFT(), progress=False)
    batch = eng.collect(tasks(4), 0)
    by_index = {t.meta["group"]: t for t in batch.trajectories}
    assert "sandbox exploded" in by_index[1].meta["env_error"] and len(by_index[1].turns) == 3
    assert "environment error" in by_index[1].outcome.detail
    assert "no such task" in by_index[3].meta["env_error"] and by_index[3].turns == []
    for i in (0, 2):
        assert by_index[i].meta["env_error"] is None and by_index[i].outcome.resolved
    assert batch.stats.env_errors == 2


# -- batching ----------------------------------------------------------------------------------------


def test_batching_does_not_change_greedy_trajectories(tokenizer, tiny_model):
    from unipost.rollout.transformers_policy import TransformersPolicy

    student = TransformersPolicy(tiny_model, tokenizer, max_new_tokens=12)
    recipe = Recipe(StudentRollout(), OwnSamples())
    work = tasks(4, difficulty="easy")  # issue texts of different lengths: left padding matters

    def run(concurrency):
        eng = engine(recipe, student=student, max_turns=3, concurrency=concurrency)
        return eng.collect(work, 0, greedy=True)

    batched, alone = run(4), run(1)
    assert batched.stats.student_calls == 3 and alone.stats.student_calls == 12
    for a, b in zip(batched.trajectories, alone.trajectories, strict=True):
        assert a.task_id == b.task_id and len(a.turns) == len(b.turns) == 3
        for ta, tb in zip(a.turns, b.turns, strict=True):
            assert ta.action == tb.action and ta.observation == tb.observation
            assert ta.action_token_ids == tb.action_token_ids and ta.action_token_ids
            assert ta.action_logprobs == pytest.approx(tb.action_logprobs, abs=1e-4)
        assert a.outcome == b.outcome


def test_default_context_counter_is_the_students_own_prompt(tokenizer, tiny_model):
    from unipost.rollout.transformers_policy import TransformersPolicy

    student = TransformersPolicy(tiny_model, tokenizer, max_new_tokens=8)
    state = AgentState(EmbeddedEnv.from_split(*tasks(1)[0]).reset(), tools())
    budget = len(student.prompt_ids(state)) + 20  # room for about one turn
    eng = engine(Recipe(StudentRollout(), OwnSamples()), student=student, context_budget=budget)
    (traj,) = eng.collect(tasks(1), 0, greedy=True).trajectories
    assert traj.meta["ended_by"] == "context_budget" and 1 <= len(traj.turns) <= 2
    assert traj.outcome.failure_mode in ("context_overflow", "tool_use_error")
