"""Play one embedded episode with the scripted expert, optionally after K student-like perturbations.

This is deliberately not the rollout engine (that one batches policies across many episodes and owns
the budgets); it is the small loop behind ``unipost env expert`` / ``unipost env show`` and the
recovery tests. The expert's label is recorded at every visited state, perturbation turns included,
exactly as DAgger would record it (paper Eq. 10-11).
"""

from __future__ import annotations

import random
from typing import Any

from unipost.data import AgentState, Trajectory, Turn
from unipost.envs.embedded.env import EmbeddedEnv
from unipost.envs.embedded.expert import ScriptedExpert
from unipost.envs.embedded.perturb import random_perturbation
from unipost.envs.embedded.tasks import Difficulty, Task, generate_task


def play_expert(
    task: Task,
    *,
    perturb: int = 0,
    seed: int = 0,
    max_turns: int = 60,
    **env_kwargs: Any,
) -> Trajectory:
    """Run ``perturb`` random/wrong actions, then the expert until it finishes or ``max_turns``."""
    expert = ScriptedExpert()
    rng = random.Random(f"perturb/{task.task_id}/{seed}")
    with EmbeddedEnv(task, **env_kwargs) as env:
        prompt = env.reset()
        messages = list(prompt)
        traj = Trajectory(task_id=task.task_id, prompt=prompt, meta={"perturb": perturb, "seed": seed})
        done = False
        for t in range(max_turns):
            state = AgentState(messages, env.tools, env, t)
            label = expert.next_action(state)
            if t < perturb:
                action, executor = random_perturbation(env, rng), "student"
            else:
                action, executor = label, "teacher"
            result = env.step(action)
            traj.turns.append(
                Turn(
                    index=t,
                    executor=executor,
                    action=action,
                    label=label,
                    observation=result.observation,
                    tool_error=result.tool_error,
                    tool_error_kind=result.info.get("tool_error_kind") if result.tool_error else None,
                )
            )
            messages += [action, *result.observation]
            if result.done:
                done = True
                break
        traj.outcome = env.verify(ended_by=None if done else "turn_budget")
    return traj


def play_split(
    split: str, index: int, difficulty: str | Difficulty = "medium", **kwargs: Any
) -> tuple[Task, Trajectory]:
    task = generate_task(split, index, difficulty)
    return task, play_expert(task, **kwargs)
