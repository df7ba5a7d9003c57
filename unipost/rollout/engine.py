"""The rollout engine: many episodes at once, one batched policy call per tick (paper Eq. 8-11).

Why ticks: generation is the expensive part and it batches (one left-padded ``generate`` over many
prompts costs little more than one), while environment steps are subprocesses that run in parallel
threads. So the engine advances all live episodes in lock step: every tick it

1. starts episodes into free slots (``env_factory(task)`` then ``reset``, in a thread pool);
2. asks each episode's :class:`~unipost.objective.EpisodePlan` who executes turn t, and makes ONE
   ``student.act`` call over the student's states and ONE ``teacher.act`` call over the states where
   the teacher executes or, when the recipe needs ``Need.TEACHER_ACTIONS``, labels a student state
   (DAgger / AggreVaTe, Eq. 10-11); the teacher call runs in a thread, in parallel with the student;
3. executes the actions with ``env.step`` in the thread pool and records one :class:`~unipost.data.Turn`
   per episode (executor, action, label, observation, the student's sampled tokens and log-probs);
4. verifies finished episodes (``env.verify``), appends them to the store *as they finish*, and frees
   their slots.

Which algorithm runs is entirely the recipe's business: the engine only reads ``plan.executor(t)`` and
``Need.TEACHER_ACTIONS in recipe.needs``. Teacher log-probs (OPD) are not collected here: the trainer
computes them on the packed batch with the white-box teacher, which is cheaper than per-turn scoring.

Deferred labels (``defer_labels``): a label is not read until the batch is packed, so when the teacher's
answer depends on the messages alone (``messages_only = True``: an API teacher, paper §3.3) the engine
does not wait for it in the tick. Each student state is handed to a
:class:`~unipost.rollout.label_queue.LabelQueue` the moment it exists (bounded concurrency, one request
per distinct state, the teacher's own retries), the tick goes on, and a finished episode is stored and
returned only once all its labels have resolved, in the order episodes finished (the store's order is
the synchronous path's; a crash also loses the finished episodes still waiting for a label: every one
behind the oldest unresolved label, one API latency's worth while the API keeps up, more when the student
outpaces its throughput). Labels equal the synchronous path's for a deterministic (greedy) teacher
(tested); a sampling teacher's answer is shared by identical states, so a group's identical states get
one sampled label where the synchronous path draws one each. A teacher-executed turn that fails stops
the collection with ``LabelFailedError`` whatever ``on_missing`` says, finished episodes kept. A
label that fails after the teacher's retries follows the recipe's ``TeacherLabels.on_missing``: "error"
(default) stops the collection with :class:`~unipost.rollout.label_queue.LabelFailedError`, after
storing every episode whose labels all resolved; "skip" keeps the turn without a label and records why
in ``meta["label_errors"]``. The scripted expert reads the live workspace, so its labels stay synchronous.

Robustness rules (a rollout run is hours long; one bad episode must not end it):

* a ``PolicyOutput`` with ``tool_error`` (a malformed tool call) is executed as a message *without* tool
  calls, so the environment's own error path records a tool-use error, and the observation starts with
  ``ERROR: ...`` saying what was wrong; the action is recorded with ``tool_error=True`` and a
  ``tool_error_kind`` (``unipost.data.TOOL_ERROR_KINDS``) from whoever detected it: the policy's parser
  (``PolicyOutput.tool_error_kind``, "truncated" when generation hit max_new_tokens) or the environment
  (``StepResult.info["tool_error_kind"]``);
* an exception inside one environment (factory, reset, step, verify) ends that episode only, with
  ``meta["env_error"]`` saying what happened;
* the turn budget (``max_turns``) and the context budget (tokens of the rendered student prompt, via
  ``count_tokens``) end an episode *before* it exceeds them, and ``env.verify(ended_by=...)`` turns that
  into the paper's ``budget_exhaustion`` / ``context_overflow`` failure modes.

Reproducibility: each episode's plan is drawn from its own generator seeded by (seed, iteration, task
index, sample), so executors and prefix lengths do not depend on concurrency, batching or finish order;
with ``greedy=True`` and deterministic policies whole trajectories do not either (tested).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unipost.data import TOOL_ERROR_KINDS, Message, Outcome, Trajectory, Turn
from unipost.envs.base import Environment, StepResult
from unipost.objective import EpisodePlan, Need, Recipe, RolloutProtocol
from unipost.rollout.chat_policy import CONTEXT_OVERFLOW  # a policy refused an overlong prompt
from unipost.rollout.label_queue import LabelFailedError, LabelQueue, labels_deferrable
from unipost.rollout.policy import AgentState, Policy, PolicyOutput
from unipost.rollout.stats import RolloutStats
from unipost.rollout.store import TrajectoryStore

CountTokens = Callable[[list[Message], list[dict[str, Any]]], int]
logger = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """The trajectories of one ``collect`` call, in task order (task index, then sample), and stats."""

    trajectories: list[Trajectory]
    stats: RolloutStats

    def __len__(self) -> int:
        return len(self.trajectories)


@dataclass
class _Episode:
    """One live episode's mutable state (the engine's bookkeeping, never exposed)."""

    task_index: int
    sample: int
    task: Any
    plan: EpisodePlan
    meta: dict[str, Any]
    env: Environment | None = None
    prompt: list[Message] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    done: bool = False  # the environment said the episode is over (finish)
    ended_by: str | None = None  # "turn_budget" | "context_budget"
    env_error: str | None = None
    trajectory: Trajectory | None = None  # set when finished
    # deferred teacher labels of student turns: (turn index, the label's future)
    pending_labels: list[tuple[int, Future[PolicyOutput]]] = field(default_factory=list)

    @property
    def over(self) -> bool:
        return self.done or self.ended_by is not None or self.env_error is not None

    def state(self) -> AgentState:
        tools = list(getattr(self.env, "tools", []) or [])
        return AgentState(list(self.messages), tools, self.env, len(self.turns))


class _TeacherTurnFailedError(Exception):
    """Inside the engine: a teacher-executed turn's deferred request failed (becomes LabelFailedError)."""

    def __init__(self, episode: _Episode, turn: int, error: BaseException):
        super().__init__(str(error))
        self.episode, self.turn, self.error = episode, turn, error


class RolloutEngine:
    """Collects trajectories for a recipe: who acts is the recipe's rollout protocol, labels its needs.

    Args:
        env_factory: ``task -> Environment`` (e.g. ``lambda t: EmbeddedEnv.from_split(*t)``); called
            once per episode, so each episode has its own world.
        student: the policy being trained (needed when the protocol lets the student act).
        teacher: the expert (needed when it executes turns or labels states). Scripted experts get the
            environment handle in ``AgentState.env``; model policies ignore it.
        recipe: the method; ``recipe.rollout`` plans episodes, ``recipe.group_size`` samples per task,
            ``Need.TEACHER_ACTIONS in recipe.needs`` asks the teacher at every visited state.
        max_turns: turn budget per episode.
        context_budget: end an episode before its student prompt exceeds this many tokens.
        count_tokens: ``(messages, tools) -> tokens of the rendered student prompt``; defaults to the
            student's own ``prompt_ids`` (a :class:`TransformersPolicy`) when a budget is set.
        concurrency: episodes in flight at once (the student's batch size, and env worker threads).
        seed: base seed of the per-episode plan generators.
        progress: show a rich progress bar.
        defer_labels: take teacher labels off the tick's critical path (module docstring). None: when
            the teacher declares ``messages_only = True`` (``OpenAIChatPolicy``); False: the
            synchronous path (the tick waits for its labels); True: required (an error for a teacher
            whose labels may read the environment).
        label_concurrency: deferred teacher requests in flight at once; None: the teacher's own
            ``concurrency`` (its connection pool), else 8.
    """

    def __init__(
        self,
        env_factory: Callable[[Any], Environment],
        *,
        student: Policy | None,
        teacher: Policy | None,
        recipe: Recipe,
        max_turns: int = 30,
        context_budget: int | None = None,
        count_tokens: CountTokens | None = None,
        concurrency: int = 8,
        seed: int = 0,
        progress: bool = True,
        defer_labels: bool | None = None,
        label_concurrency: int | None = None,
    ) -> None:
        if not callable(env_factory):
            raise TypeError(f"env_factory must be callable (task -> Environment), got {env_factory!r}")
        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be a unipost.objective.Recipe, got {type(recipe).__name__}")
        for name, value, low in (("max_turns", max_turns, 1), ("concurrency", concurrency, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if context_budget is not None and (
            isinstance(context_budget, bool) or not isinstance(context_budget, int) or context_budget < 1
        ):
            raise ValueError(f"context_budget must be a positive integer or None, got {context_budget!r}")
        if context_budget is not None and count_tokens is None:
            prompt_ids = getattr(student, "prompt_ids", None)
            if prompt_ids is None:
                raise ValueError(
                    "context_budget needs count_tokens=(messages, tools) -> int: the student "
                    f"{student!r} cannot render its own prompt"
                )
            count_tokens = lambda messages, tools: len(prompt_ids(AgentState(messages, tools)))
        self.env_factory = env_factory
        self.student = student
        self.teacher = teacher
        self.recipe = recipe
        self.max_turns = max_turns
        self.context_budget = context_budget
        self.count_tokens = count_tokens
        self.concurrency = concurrency
        self.seed = seed
        self.progress = progress
        if defer_labels not in (None, True, False):
            raise ValueError(f"defer_labels must be None, True or False, got {defer_labels!r}")
        if defer_labels and teacher is not None and not labels_deferrable(teacher):
            raise ValueError(
                f"defer_labels=True, but the teacher {_name(teacher)!r} does not declare messages_only = "
                "True: its labels may read the live environment, so they are computed at the state"
            )
        self.defer_labels = labels_deferrable(teacher) if defer_labels is None else defer_labels
        if label_concurrency is None:
            own = getattr(teacher, "concurrency", None)
            label_concurrency = own if isinstance(own, int) and not isinstance(own, bool) and own > 0 else 8
        lc = label_concurrency
        if isinstance(lc, bool) or not isinstance(lc, int) or lc < 1:
            raise ValueError(f"label_concurrency must be an integer >= 1, got {label_concurrency!r}")
        self.label_concurrency = label_concurrency
        self._check_policies(recipe.rollout, Need.TEACHER_ACTIONS in recipe.needs)

    def __repr__(self) -> str:
        return (
            f"RolloutEngine(recipe={self.recipe.display_name!r}, student={_name(self.student)!r}, "
            f"teacher={_name(self.teacher)!r}, max_turns={self.max_turns}, "
            f"context_budget={self.context_budget}, concurrency={self.concurrency}, "
            f"defer_labels={self.defer_labels})"
        )

    def _check_policies(self, protocol: RolloutProtocol, labels: bool) -> None:
        if not getattr(protocol, "collects", True):
            raise ValueError(
                f"{protocol!r} replays stored data and collects no rollouts; read it with "
                ".trajectories() instead of running the engine"
            )
        if protocol.uses_student and self.student is None:
            raise ValueError(f"{protocol!r} lets the student act, but the engine has no student policy")
        if (protocol.uses_teacher or labels) and self.teacher is None:
            why = "executes teacher turns" if protocol.uses_teacher else "needs teacher labels"
            raise ValueError(f"{protocol!r} {why}, but the engine has no teacher policy")

    # -- public -------------------------------------------------------------------------------------

    def collect(
        self,
        tasks: Sequence[Any],
        iteration: int,
        *,
        greedy: bool = False,
        store: TrajectoryStore | None = None,
        protocol_override: RolloutProtocol | None = None,
        teacher_labels: bool | None = None,
    ) -> RolloutBatch:
        """Run ``group_size`` episodes per task and return them in task order, with statistics.

        Args:
            tasks: what ``env_factory`` takes, one per task.
            iteration: the training iteration (schedules of beta and k read it).
            greedy: deterministic decoding (evaluation).
            store: finished trajectories are appended here as they finish, not at the end.
            protocol_override: plan with this protocol instead of the recipe's (e.g. evaluate the
                student alone with ``StudentRollout()``); its ``group_size`` applies.
            teacher_labels: query the teacher at every student state. Default: what the recipe needs
                (``Need.TEACHER_ACTIONS``), or False under a ``protocol_override`` (evaluation).
        """
        protocol = protocol_override if protocol_override is not None else self.recipe.rollout
        if teacher_labels is None:
            teacher_labels = protocol_override is None and Need.TEACHER_ACTIONS in self.recipe.needs
        self._check_policies(protocol, teacher_labels)
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration must be a non-negative integer, got {iteration!r}")
        tasks = list(tasks)
        return _Run(self, protocol, tasks, iteration, greedy, store, teacher_labels).run()

    def plan_episode(
        self, protocol: RolloutProtocol, iteration: int, task_index: int, sample: int
    ) -> EpisodePlan:
        """The plan of one episode, from its own generator: independent of batching and order."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, iteration, task_index, sample]))
        return protocol.plan(iteration, rng)


class _Run:
    """One ``collect`` call: the tick loop and its counters."""

    def __init__(
        self,
        engine: RolloutEngine,
        protocol: RolloutProtocol,
        tasks: list[Any],
        iteration: int,
        greedy: bool,
        store: TrajectoryStore | None,
        teacher_labels: bool,
    ) -> None:
        self.e = engine
        self.protocol = protocol
        self.tasks = tasks
        self.iteration = iteration
        self.greedy = greedy
        self.store = store
        self.teacher_labels = teacher_labels
        self.defer = teacher_labels and engine.defer_labels
        self.on_missing = getattr(engine.recipe.labels, "on_missing", "error")
        self.counters: dict[str, Any] = dict(
            teacher_queries=0,
            student_queries=0,
            student_calls=0,
            env_steps=0,
            student_time_s=0.0,
            teacher_time_s=0.0,
            env_time_s=0.0,
            ticks=0,
            ticks_blocked_on_teacher=0,
            teacher_wait_s=0.0,
            label_drain_s=0.0,
            label_failures=0,
            deferred_labels=self.defer,
        )
        self.finished: dict[tuple[int, int], Trajectory] = {}
        self.labels: LabelQueue | None = None  # the deferred labels' queue, while run() runs
        self.awaiting: deque[_Episode] = deque()  # finished, in finish order, until their labels resolve
        self.unlabelled: list[tuple[_Episode, int, BaseException]] = []  # failed labels (on_missing error)

    def _episodes(self) -> deque[_Episode]:
        group_size = int(self.protocol.group_size)
        pending: deque[_Episode] = deque()
        for i, task in enumerate(self.tasks):
            for g in range(group_size):
                plan = self.e.plan_episode(self.protocol, self.iteration, i, g)
                meta = {
                    **plan.meta,
                    # Always the collection's iteration, whatever the protocol's plan records: GRPO
                    # groups are keyed by (iteration, group) (``unipost.batch.group_keys``), and group
                    # numbers restart in every collection.
                    "iteration": self.iteration,
                    "group": i,
                    "sample": g,
                    "group_size": group_size,
                    "seed": self.e.seed,
                    "episode_seed": [self.e.seed, self.iteration, i, g],
                    "recipe": self.e.recipe.display_name,
                    "protocol": repr(self.protocol),
                    "student": _name(self.e.student),
                    "teacher": _name(self.e.teacher),
                    "teacher_labels": self.teacher_labels,
                    "greedy": self.greedy,
                }
                pending.append(_Episode(i, g, task, plan, meta))
        return pending

    def run(self) -> RolloutBatch:
        pending = self._episodes()
        total = len(pending)
        live: list[_Episode] = []
        start = time.perf_counter()
        bar = _ProgressBar(total, self.e.progress, f"{self.e.recipe.display_name} episodes")
        pool = ThreadPoolExecutor(max_workers=self.e.concurrency, thread_name_prefix="unipost-env")
        if self.defer:
            assert self.e.teacher is not None
            self.labels = LabelQueue(self.e.teacher, concurrency=self.e.label_concurrency, greedy=self.greedy)
        clean = False
        try:
            with bar:
                while pending or live:
                    self.counters["ticks"] += 1
                    starting = [
                        pending.popleft() for _ in range(min(len(pending), self.e.concurrency - len(live)))
                    ]
                    if starting:
                        self._timed_env(pool, self._start, starting)
                        for ep in starting:
                            self._check_budgets(ep)
                        live += starting
                    acting = [ep for ep in live if not ep.over]
                    if acting:
                        try:
                            stepping = self._act(pool, acting)
                        except _TeacherTurnFailedError as failure:
                            self._abort(live, bar, executed=failure)
                        self._timed_env(pool, self._step, stepping)
                        self.counters["env_steps"] += len(stepping)
                        for ep, _, _ in stepping:  # main thread: tokenizers are not thread-safe
                            self._check_budgets(ep)
                    ended = [ep for ep in live if ep.over]
                    if ended:
                        self._timed_env(pool, self._finish, ended)
                        self.awaiting += ended  # released (stored) once their labels resolve
                        live = [ep for ep in live if not ep.over]
                    self._release(bar, block=False)
                    if self._label_failed(live):
                        self._abort(live, bar)
                t0 = time.perf_counter()
                self._release(bar, block=True)  # the labels still in flight after the last tick
                self.counters["label_drain_s"] = time.perf_counter() - t0
                self.counters["teacher_wait_s"] += self.counters["label_drain_s"]
                if self.unlabelled:
                    self._abort([], bar)
            clean = True
        finally:
            for ep in live:  # a policy raised: do not leak workspaces
                _safe_close(ep.env)
            pool.shutdown(wait=True)
            if self.labels is not None:
                self.labels.close(wait=clean)
        wall = time.perf_counter() - start
        if self.labels is not None:
            self.counters["teacher_requests"] = self.labels.requests
            self.counters["label_cache_hits"] = self.labels.cache_hits
            self.counters["teacher_time_s"] = self.labels.teacher_time_s
        else:
            self.counters["teacher_requests"] = self.counters["teacher_queries"]
        trajectories = [self.finished[k] for k in sorted(self.finished)]
        stats = RolloutStats.from_trajectories(trajectories, wall_time_s=wall, **self.counters)
        return RolloutBatch(trajectories, stats)

    # -- deferred labels ----------------------------------------------------------------------------

    def _release(self, bar: _ProgressBar, *, block: bool) -> None:
        """Store and count finished episodes whose labels have all resolved, in the order they finished.

        ``block``: wait for the labels (the end of the run); otherwise stop at the first episode with a
        label still in flight, so the store's order is the synchronous path's.
        """
        while self.awaiting:
            ep = self.awaiting[0]
            if not block and not all(f.done() for _, f in ep.pending_labels):
                return
            self.awaiting.popleft()
            traj = ep.trajectory
            assert traj is not None
            errors = []
            for t, future in ep.pending_labels:
                try:
                    # a copy: a cached answer may label several episodes' identical states
                    traj.turns[t].label = copy.deepcopy(future.result().message)
                except Exception as exc:  # the teacher's retries are spent (or the request was cancelled)
                    errors.append((t, exc))
            ep.pending_labels = []
            if errors and self.on_missing != "skip":
                self.unlabelled += [(ep, t, exc) for t, exc in errors]
                continue  # never stored: a trajectory with a hole where a required label should be
            if errors:
                self.counters["label_failures"] += len(errors)
                traj.meta["label_errors"] = [{"turn": t, "error": _describe(exc)} for t, exc in errors]
                logger.warning(
                    "%s: %d teacher label(s) failed and are left out (TeacherLabels(on_missing='skip')); "
                    "first, turn %d: %s",
                    traj.task_id,
                    len(errors),
                    errors[0][0],
                    _describe(errors[0][1]),
                )
            self.finished[(ep.task_index, ep.sample)] = traj
            if self.store is not None:
                self.store.append(traj)
            bar.advance(traj)

    def _label_failed(self, live: list[_Episode]) -> bool:
        """Whether a required label failed (then the collection stops, as the synchronous path would)."""
        if self.labels is None or self.on_missing == "skip":
            return False
        if self.unlabelled:
            return True
        return any(
            f.done() and not f.cancelled() and f.exception() is not None
            for ep in (*self.awaiting, *live)
            for _, f in ep.pending_labels
        )

    def _abort(
        self, live: list[_Episode], bar: _ProgressBar, executed: _TeacherTurnFailedError | None = None
    ) -> None:
        """Keep every finished episode whose labels resolve, drop the live ones, raise LabelFailedError.

        ``executed``: a teacher-executed turn failed (the environment had no action to step), which
        stops the collection whatever ``on_missing`` says; finished episodes are kept all the same.
        """
        assert self.labels is not None
        keep = {f for ep in self.awaiting for _, f in ep.pending_labels}
        self.labels.cancel_pending(keep)  # the episodes in flight are dropped: their labels are not needed
        self._release(bar, block=True)
        failed = [(ep, t, exc) for ep, t, exc in self.unlabelled]
        if executed is not None:
            failed = [(executed.episode, executed.turn, executed.error), *failed]
        elif not failed:  # a live episode's label failed: finished ones were all kept
            ep, t, exc = next(
                (ep, t, f.exception())
                for ep in live
                for t, f in ep.pending_labels
                if f.done() and not f.cancelled() and f.exception() is not None
            )
            failed = [(ep, t, exc)]
        ep, t, exc = failed[0]
        kept = [self.finished[k] for k in sorted(self.finished)]
        episodes = len({id(e) for e, _, _ in failed})
        task_id = _task_id(ep.env, ep.task, ep.task_index)
        what = "teacher-executed turn" if executed is not None else "teacher label"
        hint = (
            "A teacher-executed turn cannot be skipped: the episode has no action without it."
            if executed is not None
            else "TeacherLabels(on_missing='skip') trains without the missing labels instead."
        )
        raise LabelFailedError(
            f"a {what} failed after the teacher's retries (task {task_id!r}, turn {t}: "
            f"{_describe(exc)}); {len(failed)} label(s) of {episodes} episode(s) are missing, "
            f"{len(live)} episode(s) in flight were dropped, and the {len(kept)} finished episode(s) with "
            f"every label were stored and are on this error's .trajectories. {hint}",
            kept,
        ) from exc

    # -- phases -------------------------------------------------------------------------------------

    def _timed_env(self, pool: ThreadPoolExecutor, fn: Callable[[Any], None], items: list[Any]) -> None:
        t0 = time.perf_counter()
        list(pool.map(fn, items))
        self.counters["env_time_s"] += time.perf_counter() - t0

    def _start(self, ep: _Episode) -> None:
        try:
            ep.env = self.e.env_factory(ep.task)
            ep.prompt = list(ep.env.reset())
            ep.messages = list(ep.prompt)
        except Exception as exc:
            ep.env_error = f"start: {type(exc).__name__}: {exc}"

    def _check_budgets(self, ep: _Episode) -> None:
        """End the episode before turn ``max_turns`` or before a prompt over the context budget."""
        if ep.over:
            return
        if len(ep.turns) >= self.e.max_turns:
            ep.ended_by = "turn_budget"
        elif self.e.context_budget is not None:
            assert self.e.count_tokens is not None
            state = ep.state()
            if self.e.count_tokens(state.messages, state.tools) > self.e.context_budget:
                ep.ended_by = "context_budget"

    def _act(self, pool: ThreadPoolExecutor, acting: list[_Episode]) -> list[tuple[_Episode, Turn, Message]]:
        """One batched student call and the teacher's answers (in parallel); returns what to step.

        Synchronous labels: one batched teacher call over executed and labelled states, awaited here.
        Deferred: every state goes to the label queue now; the tick waits only for teacher-executed
        turns (urgent requests), and student turns carry their label's future until release.
        """
        executors = [ep.plan.executor(len(ep.turns)) for ep in acting]
        states = [ep.state() for ep in acting]
        s_idx = [i for i, who in enumerate(executors) if who == "student"]
        t_idx = [i for i, who in enumerate(executors) if who == "teacher" or self.teacher_labels]
        teacher_future: Future[tuple[list[PolicyOutput], float]] | None = None
        urgent: dict[int, Future[PolicyOutput]] = {}
        deferred: dict[int, Future[PolicyOutput]] = {}
        if self.labels is not None:  # issued as soon as the states exist, before the student generates
            teacher_idx = [i for i in t_idx if executors[i] == "teacher"]
            urgent = {i: self.labels.request(states[i], urgent=True) for i in teacher_idx}
            deferred = {i: self.labels.request(states[i]) for i in s_idx}
            self.counters["teacher_queries"] += len(t_idx)
        elif t_idx:
            assert self.e.teacher is not None
            teacher_future = pool.submit(_timed_act, self.e.teacher, [states[i] for i in t_idx], self.greedy)
        s_out: dict[int, PolicyOutput] = {}
        try:
            if s_idx:
                assert self.e.student is not None
                outs, dt = _timed_act(self.e.student, [states[i] for i in s_idx], self.greedy)
                s_out = dict(zip(s_idx, _checked(outs, len(s_idx), self.e.student), strict=True))
                self.counters["student_time_s"] += dt
                self.counters["student_queries"] += len(s_idx)
                self.counters["student_calls"] += 1
        finally:
            t_out: dict[int, PolicyOutput] = {}
            waiting = [teacher_future] if teacher_future is not None else list(urgent.values())
            self.counters["ticks_blocked_on_teacher"] += any(not f.done() for f in waiting)
            t0 = time.perf_counter()
            if teacher_future is not None:
                outs, dt = teacher_future.result()
                t_out = dict(zip(t_idx, _checked(outs, len(t_idx), self.e.teacher), strict=True))
                self.counters["teacher_time_s"] += dt
                self.counters["teacher_queries"] += len(t_idx)
            for i, f in urgent.items():
                try:
                    t_out[i] = f.result()
                except Exception as exc:  # the teacher's own retries are spent: no action to execute
                    raise _TeacherTurnFailedError(acting[i], len(acting[i].turns), exc) from exc
            self.counters["teacher_wait_s"] += time.perf_counter() - t0
        stepping = []
        for i, (ep, who) in enumerate(zip(acting, executors, strict=True)):
            out = s_out[i] if who == "student" else t_out[i]
            if out.tool_error == CONTEXT_OVERFLOW:  # the policy refused the prompt: nothing was acted
                ep.ended_by = "context_budget"
                continue
            label = t_out[i].message if i in t_out else None
            if i in deferred:
                ep.pending_labels.append((len(ep.turns), deferred[i]))
            action = _executed_message(out)
            turn = Turn(
                index=len(ep.turns),
                executor=who,
                action=action,
                label=action if who == "teacher" else label,
                action_token_ids=out.token_ids if who == "student" else None,
                action_logprobs=out.logprobs if who == "student" else None,
                tool_error=out.tool_error is not None,
                tool_error_kind=None
                if out.tool_error is None
                else _tool_error_kind(out.tool_error_kind, "unparseable", out.truncated),
            )
            stepping.append((ep, turn, out))
        return stepping

    def _step(self, item: tuple[_Episode, Turn, PolicyOutput]) -> None:
        ep, turn, out = item
        assert ep.env is not None
        try:
            result = ep.env.step(turn.action)
            if not isinstance(result, StepResult):
                raise TypeError(f"env.step returned {type(result).__name__}, not a StepResult")
        except Exception as exc:
            ep.env_error = f"step {turn.index}: {type(exc).__name__}: {exc}"
            ep.turns.append(turn)  # the action and its label at a visited state are still data
            return
        observation = list(result.observation)
        if out.tool_error is not None:
            observation = _with_error_note(observation, out.tool_error)
        turn.observation = observation
        turn.tool_error = turn.tool_error or bool(result.tool_error)
        if turn.tool_error_kind is None and result.tool_error:  # the policy parsed it; the env refused it
            info = result.info if isinstance(result.info, dict) else {}
            turn.tool_error_kind = _tool_error_kind(info.get("tool_error_kind"), "other", out.truncated)
        ep.turns.append(turn)
        ep.messages += [turn.action, *observation]
        ep.done = bool(result.done)

    def _finish(self, ep: _Episode) -> None:
        outcome = Outcome(detail="environment could not be started")
        if ep.env is not None:
            try:
                outcome = verify_episode(ep.env, ep.ended_by)
            except Exception as exc:
                error = f"verify: {type(exc).__name__}: {exc}"
                ep.env_error = f"{ep.env_error}; {error}" if ep.env_error else error
                outcome = Outcome(detail="verification failed")
            _safe_close(ep.env)
        if ep.env_error is not None:
            outcome.detail = f"environment error ({ep.env_error}); {outcome.detail}".rstrip("; ")
        meta = {**ep.meta, "ended_by": ep.ended_by, "env_error": ep.env_error, "num_turns": len(ep.turns)}
        ep.trajectory = Trajectory(
            task_id=_task_id(ep.env, ep.task, ep.task_index),
            prompt=ep.prompt,
            turns=ep.turns,
            outcome=outcome,
            meta=meta,
        )


# -- helpers ----------------------------------------------------------------------------------------


def _name(policy: Any) -> str | None:
    return None if policy is None else str(getattr(policy, "name", type(policy).__name__))


def _timed_act(policy: Policy, states: list[AgentState], greedy: bool) -> tuple[list[PolicyOutput], float]:
    t0 = time.perf_counter()
    outs = policy.act(states, greedy=greedy)
    return outs, time.perf_counter() - t0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _checked(outs: Any, n: int, policy: Any) -> list[PolicyOutput]:
    outs = list(outs)
    if len(outs) != n or not all(isinstance(o, PolicyOutput) for o in outs):
        raise TypeError(
            f"policy {_name(policy)!r}.act returned {len(outs)} items for {n} states; it must return one "
            "PolicyOutput per state, in order"
        )
    return outs


def _executed_message(out: PolicyOutput) -> Message:
    """What reaches the environment: a malformed call is sent without tool calls (never executed)."""
    message = {"role": "assistant", **out.message}
    message.setdefault("content", "")
    if out.tool_error is not None:
        message.pop("tool_calls", None)
    return message


def _tool_error_kind(reported: Any, absent: str, truncated: bool) -> str:
    """A tool-error turn's kind, as its detector (the policy's parser, else the env) reported it.

    ``absent`` stands in for a detector that names no kind (a policy's parse error is "unparseable", an
    env's unexplained error "other"); a kind outside ``TOOL_ERROR_KINDS`` is "other". A missing or
    malformed call from a generation cut at max_new_tokens is "truncated" (a longer budget fixes that,
    not training); a well-formed call the env refused keeps its own kind.
    """
    kind = absent if reported is None else reported if reported in TOOL_ERROR_KINDS else "other"
    return "truncated" if truncated and kind == "unparseable" else kind


def _with_error_note(observation: list[Message], reason: str) -> list[Message]:
    note = f"ERROR: your last message did not contain a valid tool call: {reason}"
    if observation and observation[0].get("role") == "user":
        first = dict(observation[0])
        first["content"] = f"{note}\n{first.get('content') or ''}".rstrip()
        return [first, *observation[1:]]
    return [{"role": "user", "content": note}, *observation]


_VERIFY_TAKES_ENDED_BY: dict[type, bool] = {}


def verify_episode(env: Environment, ended_by: str | None) -> Outcome:
    """``env.verify(ended_by=...)`` where supported; otherwise label budget endings ourselves.

    Public because a remote environment host (``RayEnvPool``'s actors) verifies with the same rules.
    """
    cls = type(env)
    if cls not in _VERIFY_TAKES_ENDED_BY:
        try:
            params = inspect.signature(env.verify).parameters
            _VERIFY_TAKES_ENDED_BY[cls] = "ended_by" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
            )
        except (TypeError, ValueError):
            _VERIFY_TAKES_ENDED_BY[cls] = False
    if _VERIFY_TAKES_ENDED_BY[cls]:
        outcome = env.verify(ended_by=ended_by)  # type: ignore[call-arg]
    else:
        outcome = env.verify()
        if ended_by is not None and not outcome.submitted and outcome.failure_mode is None:
            outcome.failure_mode = "context_overflow" if ended_by == "context_budget" else "budget_exhaustion"
    if not isinstance(outcome, Outcome):
        raise TypeError(f"env.verify returned {type(outcome).__name__}, not an Outcome")
    return outcome


def _safe_close(env: Environment | None) -> None:
    if env is None:
        return
    with contextlib.suppress(Exception):  # best effort: a leaked temp dir must not end the run
        env.close()


def _task_id(env: Any, task: Any, index: int) -> str:
    for candidate in (getattr(env, "task_id", None), getattr(getattr(env, "task", None), "task_id", None)):
        if isinstance(candidate, str) and candidate:
            return candidate
    if isinstance(task, str):
        return task
    if isinstance(task, (tuple, list)) and all(isinstance(x, (str, int)) for x in task):
        return "/".join(map(str, task))
    return f"task-{index}"


class _ProgressBar:
    """A rich progress bar over episodes (or nothing): finished / total, turns, teacher share, errors."""

    def __init__(self, total: int, enabled: bool, title: str = "episodes") -> None:
        self.total = total
        self.title = title
        self.enabled = enabled
        self.turns = self.teacher = self.errors = self.resolved = 0
        self.progress: Any = None

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            # Title and done/total in one column, counters last: a narrow console cuts the counters,
            # never what the bar is or how far it is.
            self.progress = Progress(
                TextColumn("{task.description} {task.completed}/{task.total}", markup=False),
                BarColumn(bar_width=20),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.progress.__enter__()
            self.task = self.progress.add_task(self.title, total=self.total, info="")
        return self

    def advance(self, traj: Trajectory) -> None:
        self.turns += len(traj.turns)
        self.teacher += sum(t.executor == "teacher" for t in traj.turns)
        self.errors += sum(t.tool_error for t in traj.turns)
        self.resolved += traj.outcome.resolved
        if self.progress is not None:
            share = self.teacher / self.turns if self.turns else 0.0
            info = (
                f"turns {self.turns}  teacher {share:.2f}  tool errors {self.errors}  "
                f"resolved {self.resolved}"
            )
            self.progress.update(self.task, advance=1, info=info)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
