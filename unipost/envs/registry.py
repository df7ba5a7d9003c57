"""``make_env_factory(env_config)``: the ``task -> Environment`` factory the Trainer and CLI use.

Every environment takes the same task keys, ``(split, index)`` with split ``"train"`` or
``"heldout"``, so the Trainer's task sampling does not depend on which world it trains in:

- ``embedded``: task ``index`` of the procedurally generated split (EmbeddedEnv);
- ``openhands``: the same embedded task, its tools executed by the real OpenHands SDK in
  ``.venv-openhands`` (OpenHandsEnv; same workspace, same hidden-test verifier);
- ``swe``: instance ``index`` of the split of ``env.tasks_path`` (a SWE-bench-format JSONL), in its own
  Docker container (DockerSWEEnv; needs the ``docker`` package and an engine), graded there per
  episode unless ``env.swe_grading='none'``.

Heavy modules are imported when the factory is built, never by ``import unipost``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from unipost.envs.base import Environment


def embedded_env_factory(
    difficulty: str, max_observation_chars: int, *, prompt_tools: bool = True
) -> Callable[[Any], Environment]:
    """``(split, index) -> EmbeddedEnv``: one fresh sandboxed world per episode.

    It sits here, in the envs layer, so the registry, run set-up and notebooks share one factory
    without the envs layer reaching up into ``train``.
    """
    from unipost.envs.embedded import EmbeddedEnv

    def make(task: tuple[str, int]) -> Environment:
        split, index = task
        return EmbeddedEnv.from_split(
            split, index, difficulty, max_observation_chars=max_observation_chars, prompt_tools=prompt_tools
        )

    return make


def make_env_factory(env: Any) -> Callable[[Any], Environment]:
    """Build the factory for ``env`` (a :class:`unipost.train.config.EnvConfig`)."""
    if env.name == "embedded":
        return embedded_env_factory(env.difficulty, env.max_observation_chars, prompt_tools=env.prompt_tools)
    if env.name == "openhands":
        from unipost.envs.openhands import OpenHandsEnv

        kwargs: dict[str, Any] = {
            "max_observation_chars": env.max_observation_chars,
            "venv": env.openhands_venv,
            "full_tool_descriptions": env.full_tool_descriptions,
        }

        def make_openhands(task: tuple[str, int]) -> Environment:
            split, index = _key(task)
            return OpenHandsEnv.from_split(split, index, env.difficulty, **kwargs)

        return make_openhands
    if env.name == "swe":
        from unipost.envs.swe import DockerSWEEnv

        def make_swe(task: tuple[str, int]) -> Environment:
            split, index = _key(task)
            instances = swe_instances(env, split)
            if not 0 <= index < len(instances):
                raise IndexError(
                    f"task ({split!r}, {index}) but {env.tasks_path} has {len(instances)} {split} instances; "
                    f"lower env.{'train' if split == 'train' else 'heldout'}_tasks"
                )
            return DockerSWEEnv(
                instances[index],
                image_scheme=env.image_scheme,
                max_observation_chars=env.max_observation_chars,
                full_tool_descriptions=env.full_tool_descriptions,
                grade=env.swe_grading == "container",
                grading_timeout_s=env.swe_grading_timeout_s,
                agent_user=env.swe_agent_user,
            )

        return make_swe
    raise ValueError(f"unknown env.name {env.name!r}; choose embedded | openhands | swe")


def make_expert(env: Any) -> Any:
    """The scripted expert of ``env``'s world (a ``Policy`` that acts correctly from any state), or None.

    The embedded world and its OpenHands front share one (it reads the task's privileged workspace);
    SWE instances have none: a run there needs an OpenAI-compatible teacher.
    """
    if env.name in ("embedded", "openhands"):
        from unipost.envs.embedded.expert import ScriptedExpert

        return ScriptedExpert()
    return None


def swe_instances(env: Any, split: str) -> tuple[Any, ...]:
    """The instances of ``split`` for an EnvConfig: held-out ones from ``env.heldout_tasks_path`` when set
    (GRPO trains on SkyRL-v0 and is evaluated on SWE-Gym Holdout), else from ``env.tasks_path``."""
    heldout_path = getattr(env, "heldout_tasks_path", None)
    if heldout_path and split == "train" and env.split_file:  # the split file names the other file's ids
        held_out = swe_split(heldout_path, "heldout", env.heldout_fraction, env.split_file)
        held = {i.instance_id for i in held_out}
        return tuple(i for i in swe_split(env.tasks_path, "all", 0.0, None) if i.instance_id not in held)
    path = heldout_path if split == "heldout" and heldout_path else env.tasks_path
    return swe_split(path, split, env.heldout_fraction, env.split_file)


@cache
def swe_split(
    tasks_path: str, split: str, heldout_fraction: float, split_file: str | None
) -> tuple[Any, ...]:
    """The instances of one split of a JSONL (loaded once per process)."""
    from unipost.envs.swe import load_instances, split_instances

    instances = load_instances(tasks_path)
    return tuple(
        split_instances(instances, split, heldout_fraction=heldout_fraction, split_file=split_file)  # type: ignore[arg-type]
    )


def _key(task: Any) -> tuple[str, int]:
    if not (isinstance(task, (tuple, list)) and len(task) == 2 and isinstance(task[1], int)):
        raise TypeError(f"tasks are (split, index) pairs, got {task!r}")
    split, index = task
    if split not in ("train", "heldout"):
        raise ValueError(f"task split must be 'train' or 'heldout', got {split!r}")
    return split, index
