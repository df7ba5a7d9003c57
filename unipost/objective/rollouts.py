"""Rollout protocols: who executes each turn, hence the context distribution d_C (paper Eq. 8-9).

A protocol turns (iteration, the episode's rng) into an :class:`EpisodePlan` whose ``executor(t)`` says
whether the teacher or the student acts at turn t. The engine asks the plan at every turn; it never
needs to know which algorithm it is running. That is the whole difference between SFT, on-policy RL,
DAgger and AggreVaTe as far as data collection goes (the teacher's *labels* are a separate part:
:mod:`unipost.objective.labels`).

Reproducibility: ``plan`` draws one 63-bit seed from the rng it is given and keeps its own generator,
so an episode's indicators depend only on the rng state at planning time, not on what else the
engine later draws from the same rng, nor on the order in which turns are asked about.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np

from unipost.objective.needs import Need
from unipost.objective.schedules import (
    PrefixSchedule,
    Schedule,
    as_prefix_schedule,
    as_schedule,
    check_iteration,
)

Executor = Literal["teacher", "student"]


def _check_group_size(owner: str, group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{owner}.group_size must be a positive integer, got {group_size!r}")


def _check_turn(t: int) -> int:
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
        raise ValueError(f"turn index t must be a non-negative integer, got {t!r}")
    return int(t)


def _check_rng(rng: np.random.Generator) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {rng!r}")
    return rng


class EpisodePlan:
    """Who executes each turn of one episode, plus what to record in ``Trajectory.meta``.

    ``executor(t)`` is deterministic per plan: asking twice, or out of order, gives the same answer.
    ``meta`` holds ``iteration``, ``beta`` (the teacher-execution probability used, when it is a
    per-turn law) and ``prefix_k`` (the student-prefix length, for prefix protocols), else ``None``.
    """

    def __init__(self, rule: Any, meta: dict[str, Any]) -> None:
        self._rule = rule
        self.meta = meta

    def executor(self, t: int) -> Executor:
        """ "teacher" or "student": who executes turn t (0-based)."""
        return self._rule(_check_turn(t))

    def executors(self, num_turns: int) -> list[Executor]:
        """The first ``num_turns`` indicators, as a list (handy for logging and tests)."""
        return [self.executor(t) for t in range(num_turns)]

    def __repr__(self) -> str:
        return f"EpisodePlan(meta={self.meta})"


class _LazyBernoulli:
    """z_t ~ Bernoulli(p) i.i.d., drawn in turn order on first use so results are order-independent."""

    def __init__(self, p: float, rng: np.random.Generator) -> None:
        self.p = p
        self.rng = rng
        self.z: list[bool] = []

    def __call__(self, t: int) -> Executor:
        while len(self.z) <= t:
            self.z.append(bool(self.rng.random() < self.p))
        return "teacher" if self.z[t] else "student"


@runtime_checkable
class RolloutProtocol(Protocol):
    """Who executes each turn. ``group_size`` = samples per task (GRPO groups; 1 otherwise).

    Executing turns with the teacher is ``uses_teacher``, not a :class:`Need`: ``Need.TEACHER_ACTIONS``
    means "the teacher's label at every visited state" and comes from the label source, so a mixture
    rollout trained on its own samples (mixture OPD) does not pay for teacher labels at student turns.
    The built-in protocols need nothing extra; ``needs`` is there for protocols that do.
    """

    needs: frozenset[Need]
    group_size: int
    uses_teacher: bool  # the teacher executes some turns (a live teacher is needed)
    uses_student: bool  # the student executes some turns (own samples exist)
    collects: bool  # runs episodes (False for stored data)

    def plan(self, iteration: int, rng: np.random.Generator) -> EpisodePlan:
        """Plan one episode of this iteration; draws only from ``rng``."""


@dataclass(frozen=True)
class TeacherRollout:
    """The teacher executes every turn: d_C = d_{pi_T} (SFT / behaviour cloning)."""

    group_size: int = 1
    needs: ClassVar[frozenset[Need]] = frozenset()

    def __post_init__(self) -> None:
        _check_group_size("TeacherRollout", self.group_size)

    uses_teacher: ClassVar[bool] = True
    uses_student: ClassVar[bool] = False
    collects: ClassVar[bool] = True

    def plan(self, iteration: int, rng: np.random.Generator) -> EpisodePlan:
        """Plan one episode of this iteration; draws only from ``rng``."""
        meta = {"iteration": check_iteration(iteration), "beta": 1.0, "prefix_k": None}
        _check_rng(rng)
        return EpisodePlan(lambda t: "teacher", meta)


@dataclass(frozen=True)
class StudentRollout:
    """The student executes every turn: d_C = d_{pi_theta} (policy gradient, GRPO, OPD)."""

    group_size: int = 1
    needs: ClassVar[frozenset[Need]] = frozenset()

    def __post_init__(self) -> None:
        _check_group_size("StudentRollout", self.group_size)

    uses_teacher: ClassVar[bool] = False
    uses_student: ClassVar[bool] = True
    collects: ClassVar[bool] = True

    def plan(self, iteration: int, rng: np.random.Generator) -> EpisodePlan:
        """Plan one episode of this iteration; draws only from ``rng``."""
        meta = {"iteration": check_iteration(iteration), "beta": 0.0, "prefix_k": None}
        _check_rng(rng)
        return EpisodePlan(lambda t: "student", meta)


@dataclass(frozen=True)
class TurnMixture:
    """DAgger's turn-level mixture (Eq. 8): the teacher executes turn t iff z_t ~ Bernoulli(beta_i).

    The z_t are independent across turns and drawn lazily from the episode's own generator. ``beta``
    is a float (constant) or a :class:`~unipost.objective.schedules.Schedule`; the paper decays it
    linearly to a floor, ``DAgger()`` with our numbers ``LinearDecay(1.0, 0.1, 0.2)``.
    """

    beta: Schedule | float = 0.5
    group_size: int = 1
    needs: ClassVar[frozenset[Need]] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", as_schedule(self.beta, owner="TurnMixture.beta"))
        _check_group_size("TurnMixture", self.group_size)

    uses_teacher: ClassVar[bool] = True
    uses_student: ClassVar[bool] = True
    collects: ClassVar[bool] = True

    def beta_at(self, iteration: int) -> float:
        """beta_i, checked to be a probability (a custom schedule could stray)."""
        beta = float(self.beta(iteration))  # type: ignore[operator]
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"TurnMixture.beta({iteration}) = {beta} is not a probability in [0, 1]")
        return beta

    def plan(self, iteration: int, rng: np.random.Generator) -> EpisodePlan:
        """Plan one episode of this iteration; draws only from ``rng``."""
        beta = self.beta_at(check_iteration(iteration))
        seed = int(_check_rng(rng).integers(2**63 - 1))
        meta = {"iteration": int(iteration), "beta": beta, "prefix_k": None, "plan_seed": seed}
        return EpisodePlan(_LazyBernoulli(beta, np.random.default_rng(seed)), meta)


@dataclass(frozen=True)
class PrefixSwitch:
    """AggreVaTe's trajectory-level switch (Eq. 9): student for turns t < k, teacher for t >= k.

    k is drawn once per episode from ``k`` (a prefix schedule rho_i, or a fixed int). k = 0 is a pure
    teacher rollout; k at or beyond the episode's length a pure student one.
    """

    k: PrefixSchedule | int = 0
    group_size: int = 1
    needs: ClassVar[frozenset[Need]] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", as_prefix_schedule(self.k, owner="PrefixSwitch.k"))
        _check_group_size("PrefixSwitch", self.group_size)

    uses_teacher: ClassVar[bool] = True
    uses_student: ClassVar[bool] = True
    collects: ClassVar[bool] = True

    def plan(self, iteration: int, rng: np.random.Generator) -> EpisodePlan:
        """Plan one episode of this iteration; draws only from ``rng``."""
        i = check_iteration(iteration)
        k = int(self.k(i, _check_rng(rng)))  # type: ignore[operator]
        if k < 0:
            raise ValueError(f"PrefixSwitch.k drew a negative prefix length {k} at iteration {i}")
        meta = {"iteration": i, "beta": None, "prefix_k": k}
        return EpisodePlan(lambda t: "student" if t < k else "teacher", meta)


@dataclass(frozen=True)
class OfflineData:
    """Contexts come from a stored dataset (JSONL of :class:`~unipost.data.Trajectory`): no rollouts.

    ``teacher_actions`` says whether every stored state carries the teacher's action (turns executed
    by the teacher, or a stored ``label``): :class:`~unipost.objective.TeacherLabels` needs it. A
    dataset of earlier student rollouts without labels supports only ``OwnSamples`` with a
    non-score-function weight.
    """

    path: str | Path
    teacher_actions: bool = True
    group_size: int = 1
    needs: ClassVar[frozenset[Need]] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)) or not str(self.path):
            raise ValueError(f"OfflineData.path must be a non-empty path to a JSONL file, got {self.path!r}")
        _check_group_size("OfflineData", self.group_size)

    uses_teacher: ClassVar[bool] = False
    uses_student: ClassVar[bool] = False
    collects: ClassVar[bool] = False

    def plan(self, iteration: int, rng: np.random.Generator) -> EpisodePlan:
        """Plan one episode of this iteration; draws only from ``rng``."""
        raise RuntimeError(
            f"OfflineData({str(self.path)!r}) collects no rollouts; read its trajectories with "
            ".trajectories() and build batches from them"
        )

    def trajectories(self):
        """Yield the stored trajectories, one JSON object per line (blank lines skipped)."""
        from unipost.data import Trajectory

        path = Path(self.path)
        if not path.is_file():
            raise FileNotFoundError(f"OfflineData: no trajectory file at {str(path)!r}")
        with path.open() as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield Trajectory.model_validate_json(line)
                    except ValueError as exc:
                        raise ValueError(f"{path}:{lineno}: not a valid Trajectory: {exc}") from exc
