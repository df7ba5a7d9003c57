"""The scripted expert: resolves held-out tasks, recovers from student-visited states, spans a horizon."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from typer.testing import CliRunner

from unipost.envs.embedded import (
    DIFFICULTIES,
    PERTURBATION_KINDS,
    EmbeddedEnv,
    ScriptedExpert,
    generate_task,
    play_expert,
    random_perturbation,
    tool_call_message,
)
from unipost.rollout.policy import AgentState, Policy

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
NAMES = list(DIFFICULTIES)


def test_expert_resolves_all_heldout_tasks_from_reset_with_a_5_to_25_turn_horizon():
    turns: dict[str, list[int]] = {name: [] for name in NAMES}
    for i in range(30):
        name = NAMES[i % len(NAMES)]
        traj = play_expert(generate_task("heldout", i, name))
        assert traj.outcome.resolved, (traj.task_id, traj.outcome)
        assert all(t.executor == "teacher" and t.label_equals_action for t in traj.turns)
        turns[name].append(len(traj.turns))
    flat = [n for ns in turns.values() for n in ns]
    assert 5 <= min(flat) <= 7 and 20 <= max(flat) <= 25, turns
    means = [sum(turns[name]) / len(turns[name]) for name in NAMES]
    assert means == sorted(means)  # harder settings -> longer horizons


def test_expert_recovers_from_random_and_wrong_student_actions():
    resolved, n = 0, 40
    for i in range(n):
        rng = random.Random(i)
        traj = play_expert(generate_task("heldout", 100 + i, NAMES[i % 4]), perturb=rng.randint(1, 6), seed=i)
        resolved += traj.outcome.resolved
        assert all(t.label is not None for t in traj.turns)  # a label at every visited state
    assert resolved >= 0.95 * n, f"{resolved}/{n}"


@pytest.mark.parametrize("kind", PERTURBATION_KINDS)
def test_expert_recovers_from_each_kind_of_perturbation(kind):
    task = generate_task("heldout", 7, "hard")
    expert = ScriptedExpert()
    with EmbeddedEnv(task) as env:
        messages = env.reset()
        rng = random.Random(0)
        for _ in range(3):  # three of the same kind, e.g. three wrong edits in the buggy file
            action = random_perturbation(env, rng, kind)
            messages += [action, *env.step(action).observation]
        for t in range(40):
            action = expert.next_action(AgentState(messages, env.tools, env, t))
            result = env.step(action)
            assert not result.tool_error, (action, result.observation)  # the expert's calls are always valid
            messages += [action, *result.observation]
            if result.done:
                break
        assert env.verify().resolved


def test_expert_recovers_from_deleted_package_and_binary_garbage():
    task = generate_task("heldout", 9, "medium")
    for command in (
        f"rm -rf /testbed/{task.package}",
        f"head -c 3000 /dev/urandom > /testbed/{task.bug.path}",
    ):
        with EmbeddedEnv(task) as env:
            messages = env.reset()
            action = tool_call_message("", "terminal", {"command": command}, "x")
            messages += [action, *env.step(action).observation]
            for t in range(40):
                action = ScriptedExpert().next_action(AgentState(messages, env.tools, env, t))
                result = env.step(action)
                messages += [action, *result.observation]
                if result.done:
                    break
            assert env.verify().resolved, command


def test_expert_is_a_deterministic_black_box_policy_with_canonical_actions():
    expert = ScriptedExpert()
    assert isinstance(expert, Policy) and expert.name == "expert" and not expert.white_box
    with EmbeddedEnv(generate_task("train", 2, "medium")) as env:
        prompt = env.reset()
        states = [AgentState(prompt, env.tools, env, 0)] * 2
        a, b = expert.act(states)
        assert a.message == b.message == expert.next_action(states[0])
        msg = a.message
        assert msg["role"] == "assistant" and msg["content"] and len(msg["tool_calls"]) == 1
        call = msg["tool_calls"][0]
        assert call["type"] == "function" and isinstance(json.loads(call["function"]["arguments"]), dict)
    with pytest.raises(ValueError, match="EmbeddedEnv"):
        expert.next_action(AgentState(prompt, [], None, 0))


def test_cli_expert_and_show():
    from unipost.envs.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["expert", "--split", "heldout", "--n", "3", "--perturb", "2", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "resolved: 3/3"
    result = runner.invoke(app, ["show", "--split", "train", "--index", "4", "--difficulty", "easy"])
    assert result.exit_code == 0, result.output
    task = generate_task("train", 4, "easy")
    assert task.issue.splitlines()[0] in result.output and "expert trajectory" in result.output
    assert '"resolved":true' in result.output.replace(" ", "")


def _call(message):
    call = message["tool_calls"][0]["function"]
    return call["name"], json.loads(call["arguments"])


def test_expert_rereads_the_exact_lines_after_a_refused_edit_then_fixes():
    """After the agent's str_replace is refused (old_str not in the file), the expert's label is a
    view of the lines it will replace (the true line becomes the most recent copy in the context),
    then the edit; with reread_after_failed_edit=False it repeats the edit at once (the older expert)."""
    task = generate_task("heldout", 3, "easy")
    for reread in (True, False):
        expert = ScriptedExpert(reread_after_failed_edit=reread)
        with EmbeddedEnv(task) as env:
            messages = env.reset()
            for t in range(40):  # the expert up to its fix
                action = expert.next_action(AgentState(messages, env.tools, env, t))
                name, args = _call(action)
                if args.get("command") == "str_replace":
                    break
                messages += [action, *env.step(action).observation]
            wrong = dict(args, old_str=args["old_str"].replace("(", "( ", 1) + "  # not in the file")
            bad = tool_call_message("", "file_editor", wrong, "bad")
            result = env.step(bad)
            assert result.tool_error and "did not appear verbatim" in str(result.observation)
            messages += [bad, *result.observation]
            label = expert.next_action(AgentState(messages, env.tools, env, t + 1))
            name, label_args = _call(label)
            if not reread:
                assert label_args == args  # the same edit again
                continue
            assert name == "file_editor" and label_args["command"] == "view"
            assert label_args["path"] == args["path"]
            observation = env.step(label).observation
            assert args["old_str"].splitlines()[0] in str(observation)  # the true line is shown last
            messages += [label, *observation]
            fix = expert.next_action(AgentState(messages, env.tools, env, t + 2))
            assert _call(fix)[1] == args  # then the edit, not another view
            messages += [fix, *env.step(fix).observation]
            for k in range(t + 3, 40):
                action = expert.next_action(AgentState(messages, env.tools, env, k))
                result = env.step(action)
                messages += [action, *result.observation]
                if result.done:
                    break
            assert env.verify().resolved


def test_expert_rereading_leaves_its_own_trajectories_unchanged():
    """The expert's own edits never fail, so the warm start's demos (expert episodes from reset) are
    the same with and without re-reading."""
    for i in range(4):
        task = generate_task("train", 20_000 + i, "easy")
        runs = []
        for reread in (True, False):
            expert = ScriptedExpert(reread_after_failed_edit=reread)
            with EmbeddedEnv(task) as env:
                messages = env.reset()
                actions = []
                for t in range(40):
                    action = expert.next_action(AgentState(messages, env.tools, env, t))
                    result = env.step(action)
                    actions.append(action)
                    messages += [action, *result.observation]
                    if result.done:
                        break
            runs.append(actions)
        assert runs[0] == runs[1]
