"""Canonical trajectories for tests: OpenAI-style tool calls, mixed executors, teacher labels."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from functools import cache

from unipost.data import Outcome, Trajectory, Turn

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "terminal",
            "description": "Run a shell command.",
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "string"}},
                "required": ["command"],
            },
        },
    }
]


def action(text: str, command: str, call_id: str) -> dict:
    return {
        "role": "assistant",
        "content": text,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": "terminal", "arguments": json.dumps({"command": command})},
            }
        ],
    }


def make_trajectory(
    executors: str = "tststs",
    *,
    task_id: str = "t0",
    seed: int = 0,
    reasoning: bool = False,
    resolved: bool = True,
    submitted: bool = True,
    reward: float | None = None,
    meta: dict | None = None,
) -> Trajectory:
    """``executors`` is a string of 't'/'s' per turn; the teacher label is recorded at every state."""
    turns = []
    for t, who in enumerate(executors):
        teacher = action(
            ("<think>\nlocate the bug\n</think>\n\n" if reasoning else "") + f"Look at file {t + seed}.",
            f"cat pkg/mod{t + seed}.py",
            f"call_{t}",
        )
        executed = (
            teacher if who == "t" else action(f"Try {t * 7 + seed}.", f"ls -la {t + seed}", f"call_{t}")
        )
        obs = [{"role": "tool", "tool_call_id": f"call_{t}", "content": f"output {t + seed}\nline two"}]
        executor = "teacher" if who == "t" else "student"
        turns.append(Turn(index=t, executor=executor, action=executed, label=teacher, observation=obs))
    prompt = [
        {"role": "system", "content": "You are a careful software engineer."},
        {"role": "user", "content": f"The function add(2, {seed}) returns the wrong value."},
    ]
    outcome = Outcome(
        resolved=resolved, submitted=submitted, reward=float(resolved) if reward is None else reward
    )
    return Trajectory(task_id=task_id, prompt=prompt, turns=turns, outcome=outcome, meta=meta or {})


TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}


@cache
def session_cache() -> str:
    """One unipost cache for the whole test process (task tokenizer, random inits, clones), removed at
    exit: test modules share one tokenizer build instead of one each, and nothing lands in
    ~/.cache/unipost. A test that checks the cold path passes an empty folder of its own instead."""
    path = tempfile.mkdtemp(prefix="unipost-test-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def tiny_train_config(output_dir, cache_dir, recipe: str, **updates):
    """A seconds-long TrainConfig: 1-layer Qwen3, random init, easy tasks, no evaluation.

    ``cache_dir``: :func:`session_cache` to share the process's warm cache, or an empty folder to test
    the cold path.

    Not the tiny lab (``unipost.train.lab.tiny_config``, which the main job, bench_methods and the
    notebooks use): this is the ``ModelConfig(kind="tiny")`` path, a model built from its sizes with the
    locally trained task tokenizer, which the lab's pretrained-directory student never exercises and
    which the Trainer tests check against (vocabulary sizes, expert NLL under that tokenizer). Tests
    that want the lab use ``tiny_config(..., quick=True, assets=lab_assets)`` (tests/conftest.py).
    """
    from unipost.train.config import (
        EnvConfig,
        EvalConfig,
        ModelConfig,
        OptimConfig,
        RolloutConfig,
        TeacherConfig,
        TrainConfig,
        WarmStartConfig,
    )

    base = TrainConfig(
        name=recipe,
        recipe=recipe,
        iterations=2,
        seed=0,
        output_dir=str(output_dir),
        progress=False,
        cache_dir=str(cache_dir),
        model=ModelConfig(**TINY, tokenizer_vocab=1024),
        warm_start=WarmStartConfig(demos=0, epochs=1),
        teacher=TeacherConfig(white_box="none", distill_epochs=1),
        env=EnvConfig(difficulty="easy", train_tasks=8, heldout_tasks=2, max_observation_chars=600),
        rollout=RolloutConfig(episodes_per_iteration=2, max_turns=8, context_budget=4096, max_new_tokens=16),
        optim=OptimConfig(lr=1e-2, micro_batch_tokens=4096, epochs_per_batch=3),
        eval=EvalConfig(every=0, kl_tasks=0),
    )
    return base.replace(**updates)
