"""Environment workers on a Ray cluster, driven by the unchanged :class:`~unipost.rollout.RolloutEngine`.

    pool = RayEnvPool(env_factory, num_workers=16)            # actors on any node of the cluster
    engine = RolloutEngine(pool.factory, student=..., teacher=RemoteExpert(pool), recipe=...)
    engine.collect(tasks, iteration, store=store)

Why a pool of host actors: each of ``num_workers`` actors (``num_cpus`` each, placed by Ray on any
node, e.g. the nodes with Docker for SWE-Gym images) builds the *real* environments with the user's
own ``env_factory`` inside its process and keeps many episodes (``max_concurrency`` threads: env steps
are subprocesses, so threads overlap them). One actor per episode would pay a worker-process start per
episode, and with fewer free CPUs than episodes in flight the engine would wait on actors that can only
be placed once its own episodes finish. The engine sees a :class:`RemoteEnv` proxy whose ``reset`` /
``step`` / ``verify`` / ``close`` are ``ray.get`` calls; it already calls them from its thread pool, so
remote episodes step in parallel exactly as local ones.

Who writes the trajectory store: the driver. The engine assembles every trajectory in the driver
(the policies' tokens and log-probs, the teacher's labels, the actors' observations and outcome) and
appends it to the one :class:`~unipost.rollout.store.TrajectoryStore` as it finishes. A store actor
would add a second writer and a network hop for data the driver already holds, and would give up the
store's single-writer guarantees (append + fsync, torn-tail repair on resume).

Privileged scripted experts read the environment's workspace, which lives on the actor's node:
:class:`RemoteExpert` runs the expert next to its environment, inside the actor.

Ray is optional (``pip install 'unipost[ray]'``); nothing here imports it before a pool is built.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

from unipost._optional import require
from unipost.data import Message, Outcome
from unipost.envs.base import Environment, StepResult
from unipost.rollout.policy import AgentState, PolicyOutput


class _EnvHost:
    """Ray actor body: hosts many environments built with the user's factory, keyed by episode id."""

    def __init__(self, env_factory: Callable[[Any], Environment]) -> None:
        self.env_factory = env_factory
        self.envs: dict[int, Environment] = {}
        self.lock = threading.Lock()

    def open(self, env_id: int, task: Any) -> dict[str, Any]:
        env = self.env_factory(task)
        with self.lock:
            self.envs[env_id] = env
        return self._describe(env)

    def _describe(self, env: Environment) -> dict[str, Any]:
        task = getattr(env, "task", None)
        return {
            "tools": list(getattr(env, "tools", []) or []),
            "task_id": getattr(env, "task_id", None) or getattr(task, "task_id", None),
        }

    def reset(self, env_id: int) -> tuple[list[Message], dict[str, Any]]:
        env = self.envs[env_id]
        prompt = list(env.reset())
        return prompt, self._describe(env)

    def step(self, env_id: int, action: Message) -> StepResult:
        return self.envs[env_id].step(action)

    def verify(self, env_id: int, ended_by: str | None) -> Outcome:
        from unipost.rollout.engine import verify_episode  # the engine's ended_by handling, by the env

        return verify_episode(self.envs[env_id], ended_by)

    def close(self, env_id: int) -> None:
        with self.lock:
            env = self.envs.pop(env_id, None)
        if env is not None:
            env.close()

    def expert_action(
        self, env_id: int, expert: Any, messages: list[Message], tools: list, turn: int, greedy: bool
    ) -> PolicyOutput:
        state = AgentState(messages, tools, self.envs[env_id], turn)
        return expert.act([state], greedy=greedy)[0]

    def live(self) -> int:
        return len(self.envs)


class RemoteEnv:
    """The engine-side proxy of one environment living in a :class:`RayEnvPool` actor."""

    def __init__(self, pool: RayEnvPool, actor: Any, env_id: int, task: Any) -> None:
        self._pool, self._actor, self.env_id = pool, actor, env_id
        self._ray = pool.ray
        info = self._ray.get(actor.open.remote(env_id, task))
        self.tools: list[dict[str, Any]] = info["tools"]
        self.task_id: str | None = info["task_id"]
        self.closed = False

    def reset(self) -> list[Message]:
        prompt, info = self._ray.get(self._actor.reset.remote(self.env_id))
        self.tools, self.task_id = info["tools"], info["task_id"] or self.task_id
        return prompt

    def step(self, action: Message) -> StepResult:
        return self._ray.get(self._actor.step.remote(self.env_id, action))

    def verify(self, ended_by: str | None = None) -> Outcome:
        return self._ray.get(self._actor.verify.remote(self.env_id, ended_by))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._ray.get(self._actor.close.remote(self.env_id))

    def expert_action(self, expert: Any, messages: list[Message], turn: int, greedy: bool = False) -> Any:
        """A ref to ``expert``'s action at this state, computed inside the actor (next to the env)."""
        return self._actor.expert_action.remote(self.env_id, expert, messages, self.tools, turn, greedy)

    def __repr__(self) -> str:
        return f"RemoteEnv(env_id={self.env_id}, task_id={self.task_id!r})"


class RayEnvPool:
    """``num_workers`` Ray actors hosting environments; :meth:`factory` is the engine's ``env_factory``.

    Args:
        env_factory: ``task -> Environment``, called inside the actors (must be picklable: a module
            level function or a ``functools.partial`` of one; closures work through cloudpickle).
        num_workers: host actors; episodes are spread over them, fewest live episodes first.
        max_concurrency: episodes one actor steps at once (threads inside the actor).
        num_cpus: CPUs Ray reserves per actor (placement only).
        actor_options: more ``ray.remote`` options (``resources={"docker": 1}``, ``runtime_env``...).

    ``ray.init`` is the caller's (``ray.init(address="auto")`` on a cluster); if Ray is not yet
    initialised, a local one is started.
    """

    def __init__(
        self,
        env_factory: Callable[[Any], Environment],
        *,
        num_workers: int = 2,
        max_concurrency: int = 8,
        num_cpus: float = 1.0,
        actor_options: dict[str, Any] | None = None,
    ) -> None:
        if not callable(env_factory):
            raise TypeError(f"env_factory must be callable (task -> Environment), got {env_factory!r}")
        for name, value in (("num_workers", num_workers), ("max_concurrency", max_concurrency)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.ray = ray = require("ray")
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        options = {"num_cpus": num_cpus, "max_concurrency": max_concurrency, **(actor_options or {})}
        host = ray.remote(_EnvHost).options(**options)
        self.actors = [host.remote(env_factory) for _ in range(num_workers)]
        self._live = [0] * num_workers
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def factory(self, task: Any) -> RemoteEnv:
        """Open one episode's environment on the least-loaded actor (the engine's ``env_factory``)."""
        with self._lock:
            k = min(range(len(self.actors)), key=self._live.__getitem__)
            self._live[k] += 1
            env_id = next(self._ids)
        env = _PooledEnv(self, self.actors[k], env_id, task, slot=k)
        return env

    def _released(self, slot: int) -> None:
        with self._lock:
            self._live[slot] -= 1

    def shutdown(self) -> None:
        """Kill the actors (their environments' workspaces go with their processes' cleanup)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def __enter__(self) -> RayEnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class _PooledEnv(RemoteEnv):
    """A RemoteEnv that gives its actor slot back to the pool's load count when closed."""

    def __init__(self, pool: RayEnvPool, actor: Any, env_id: int, task: Any, *, slot: int) -> None:
        self._slot = slot
        try:
            super().__init__(pool, actor, env_id, task)
        except BaseException:
            pool._released(slot)
            raise

    def close(self) -> None:
        was_closed = self.closed
        try:
            super().close()
        finally:
            if not was_closed:
                self._pool._released(self._slot)


class RemoteExpert:
    """A privileged scripted expert (e.g. ``ScriptedExpert``) run inside the actors, next to each env.

    ``act`` sends every state's messages to its environment's actor and gathers the actions in one
    ``ray.get``, so a tick's teacher queries run in parallel across actors.
    """

    white_box = False

    def __init__(self, expert: Any | None = None) -> None:
        if expert is None:
            from unipost.envs.embedded.expert import ScriptedExpert

            expert = ScriptedExpert()
        self.expert = expert
        self.name = str(getattr(expert, "name", type(expert).__name__))

    def act(self, states: list[AgentState], *, greedy: bool = False) -> list[PolicyOutput]:
        refs = []
        for state in states:
            if not isinstance(state.env, RemoteEnv):
                raise TypeError(
                    f"RemoteExpert needs AgentState.env to be a RemoteEnv from a RayEnvPool, got "
                    f"{type(state.env).__name__}; use the expert itself for local environments"
                )
            refs.append(state.env.expert_action(self.expert, state.messages, state.turn, greedy))
        if not refs:
            return []
        return list(states[0].env._ray.get(refs))
