"""OpenHandsEnv (real OpenHands tools in the sandbox) against EmbeddedEnv on the same embedded tasks.

The action sequence is recorded on the embedded env (scripted expert, optionally after student-like
perturbations) and replayed verbatim on OpenHandsEnv; the observations must agree after the
normalisation of unipost.envs.openhands.normalize (documented in docs/openhands.md), and both episodes
must resolve. The failure messages print both texts, so a new SDK release's wording change shows up.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from unipost.envs.embedded import EmbeddedEnv, ScriptedExpert, generate_task, random_perturbation
from unipost.envs.embedded.expert import tool_call_message
from unipost.envs.openhands import OpenHandsEnv, comparable_pair
from unipost.rollout.policy import AgentState

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parents[1] / "fixtures" / "openhands" / "tool_schemas-openhands-tools-1.58.0.json"


def _record(task, perturb: int, seed: int, max_turns: int = 40):
    """Actions and observations of the expert (after ``perturb`` perturbations) on the embedded env."""
    expert, rng = ScriptedExpert(), random.Random(seed)
    actions, results = [], []
    with EmbeddedEnv(task) as env:
        messages = list(env.reset())
        for t in range(max_turns):
            if t < perturb:
                action = random_perturbation(env, rng)
            else:
                action = expert.next_action(AgentState(messages, env.tools, env, t))
            result = env.step(action)
            actions.append(action)
            results.append(result)
            messages += [action, *result.observation]
            if result.done:
                break
        outcome = env.verify()
    return actions, results, outcome


def _replay(env, actions):
    env.reset()
    return [env.step(a) for a in actions], env.verify()


def _assert_same(actions, embedded, openhands):
    assert len(embedded) == len(openhands)
    for t, (a, e, o) in enumerate(zip(actions, embedded, openhands, strict=True)):
        assert e.tool_error == o.tool_error, (t, a, e.observation, o.observation)
        assert e.done == o.done, (t, a)
        assert len(e.observation) == len(o.observation)
        for em, om in zip(e.observation, o.observation, strict=True):
            assert (em["role"], em.get("name"), em.get("tool_call_id")) == (
                om["role"],
                om.get("name"),
                om.get("tool_call_id"),
            )
            left, right = comparable_pair(
                em["content"], om["content"], embedded_error=e.tool_error, openhands_error=o.tool_error
            )
            assert left == right, (
                f"turn {t}: {json.dumps(a.get('tool_calls'))[:300]}\n--- embedded\n{em['content']}\n"
                f"--- openhands\n{om['content']}"
            )


@pytest.fixture(scope="module")
def medium_task():
    return generate_task("heldout", 3, "medium")


def test_expert_episode_gives_the_same_observations_and_resolves_in_both(medium_task):
    actions, embedded, e_out = _record(medium_task, perturb=0, seed=0)
    with OpenHandsEnv(medium_task) as env:
        openhands, o_out = _replay(env, actions)
        assert env.versions["openhands-sdk"] == "1.58.0", env.versions
    _assert_same(actions, embedded, openhands)
    assert e_out.resolved and o_out.resolved, (e_out, o_out)
    assert len(actions) >= 5


def test_perturbed_episode_with_errors_gives_the_same_observations(medium_task):
    """Wrong edits, junk files, deleted lines, bad calls, then the expert's recovery."""
    actions, embedded, e_out = _record(medium_task, perturb=6, seed=11)
    with OpenHandsEnv(medium_task) as env:
        openhands, o_out = _replay(env, actions)
    _assert_same(actions, embedded, openhands)
    assert e_out.resolved == o_out.resolved
    assert e_out.failure_mode == o_out.failure_mode


def test_live_sdk_schemas_are_the_fixture_and_what_the_env_advertises(medium_task):
    fixture = json.loads(FIXTURE.read_text())
    with OpenHandsEnv(medium_task) as env:
        env.reset()
        live = {t["function"]["name"]: t for t in env.live_tools}
    assert {t["function"]["name"]: t for t in env.tools} == live  # what the SDK's agent would send
    cwd = "Your current working directory is: "
    for name, schema in fixture.items():  # the fixture up to the workspace path in one sentence
        text = json.dumps(schema).replace(cwd + "/workspace", cwd + "/testbed")
        assert json.loads(text) == live[name], name


def test_sandbox_isolates_the_agent_and_errors_never_crash(medium_task, tmp_path):
    """Host files are invisible, /usr is read-only, no network; a runtime timeout is an error observation."""
    secret = tmp_path / "host-secret.txt"
    secret.write_text("do not read")
    with OpenHandsEnv(medium_task, call_timeout_s=20, no_change_timeout_s=5) as env:
        env.reset()

        def run(cmd: str, **extra):
            r = env.step(tool_call_message("", "terminal", {"command": cmd, **extra}, "c"))
            return r, r.observation[0]["content"]

        _, out = run(f"cat {secret}; ls /root /etc/passwd; touch /usr/x")
        assert "do not read" not in out and "No such file or directory" in out and "Read-only" in out
        _, out = run("python3 -c \"import socket; socket.create_connection(('1.1.1.1', 80), 2)\"")
        assert "Network is unreachable" in out or "OSError" in out
        _, out = run("pwd && whoami 2>/dev/null; echo $HOME")
        assert out.startswith("/testbed")
        r, out = run("sleep 60", timeout=40)  # longer than call_timeout_s: the worker is killed
        assert r.tool_error and "runtime failed" in out
        r, out = run("ls /testbed")  # a fresh worker answers the next call
        assert not r.tool_error and "[The command completed with exit code 0.]" in out
        assert r.info["worker_restarts"] == 1
        r = env.step({"role": "assistant", "content": "no tool call"})
        assert r.tool_error
        # OpenHands' editor accepts any absolute path (the embedded one only /testbed): the sandbox is
        # what keeps the host's files out of reach
        view = {"command": "view", "path": str(secret)}
        r = env.step(tool_call_message("", "str_replace_editor", view, "c"))
        assert r.tool_error and "do not read" not in r.observation[0]["content"]


def test_the_rollout_engine_drives_openhands_like_the_embedded_env():
    """make_env_factory(EnvConfig(name='openhands')) in the RolloutEngine, two episodes in flight."""
    from unipost.envs.registry import make_env_factory
    from unipost.objective import SFT
    from unipost.rollout.engine import RolloutEngine
    from unipost.train.config import EnvConfig

    tasks = [("heldout", 1), ("heldout", 2)]
    results = {}
    for name in ("embedded", "openhands"):
        engine = RolloutEngine(
            make_env_factory(EnvConfig(name=name, difficulty="easy")),
            student=None,
            teacher=ScriptedExpert(),
            recipe=SFT(rejection_sampling=False),
            max_turns=20,
            concurrency=2,
            progress=False,
        )
        results[name] = engine.collect(tasks, iteration=0).trajectories
    for e, o in zip(results["embedded"], results["openhands"], strict=True):
        assert e.task_id == o.task_id and e.outcome.resolved and o.outcome.resolved
        assert [t.action for t in e.turns] == [t.action for t in o.turns]  # same states -> same actions


def test_a_parked_worker_serves_the_next_episode_without_leaking_state():
    """reuse_worker: same process, but fresh files, no stray processes, fresh shell and editor."""
    from unipost.envs.openhands.env import close_parked_workers

    close_parked_workers()
    first, second = generate_task("train", 5, "easy"), generate_task("train", 6, "easy")

    def run(env, cmd):
        return env.step(tool_call_message("", "terminal", {"command": cmd}, "c")).observation[0]["content"]

    with OpenHandsEnv(first) as env:
        env.reset()
        pid = env.worker.proc.pid
        run(env, "cd /tmp && touch /testbed/junk.txt && (sleep 300 &) && export LEAK=1")
        assert "sleep 300" in run(env, "ps -eo args")
    with OpenHandsEnv(second) as env:
        env.reset()
        assert env.worker.proc.pid == pid  # the parked worker, no new SDK import
        out = run(env, "pwd; ls /testbed; echo leak=$LEAK; ps -eo args")
        assert out.startswith("/testbed\n") and "junk.txt" not in out and "leak=\n" in out
        assert "sleep 300" not in out
        assert sorted(p.relative_to(env.workspace).as_posix() for p in env.workspace.rglob("*.py")) == sorted(
            second.files
        )
        actions, embedded, _ = _record(second, perturb=0, seed=0)
        openhands, outcome = _replay(env, actions)
        _assert_same(actions, embedded, openhands)
        assert outcome.resolved
    close_parked_workers()
