"""Iteration-indexed schedules: the mixing rate beta_i (DAgger) and prefix-length laws rho_i (AggreVaTe).

Both rollout protocols of paper §3.2 are "early training leans on the teacher, later training on the
student". The schedule objects below are what moves them along: plain, frozen values so a recipe is a
hashable, printable config, and pure functions of the iteration so a resumed run reproduces them.

Paper App. F: beta starts high and decays linearly per iteration to a floor, beta_i = max(floor,
beta_0 - i * step) (:class:`LinearDecay`); the prefix length k is drawn from a law over {low..high}
whose mass shifts toward longer student prefixes across iterations (:class:`ShiftingPrefix`). The
text extraction lost the paper's numbers for both, so every default here is ours: beta_0 = 1.0,
step = 0.1, floor = 0.2 in ``DAgger()``, and the prefix law's support and shift
(experiments/README.md lists each value with its source).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


def check_iteration(iteration: int) -> int:
    """``iteration`` as an int, or a ValueError: schedules and rollout protocols index by it."""
    if isinstance(iteration, bool) or not isinstance(iteration, (int, np.integer)) or iteration < 0:
        raise ValueError(f"iteration must be a non-negative integer, got {iteration!r}")
    return int(iteration)


def _check_unit(owner: str, name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{owner}.{name} must be a probability in [0, 1], got {value!r}")


def _check_nonneg_int(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{owner}.{name} must be a non-negative integer, got {value!r}")


# ---------------------------------------------------------------------------------------------------
# beta schedules: iteration -> float


@runtime_checkable
class Schedule(Protocol):
    """iteration (0-based) -> value, e.g. the probability beta_i that the teacher executes a turn."""

    def __call__(self, iteration: int) -> float: ...


@dataclass(frozen=True)
class Constant:
    """The same value every iteration (``TurnMixture(0.5)`` wraps its float in one)."""

    value: float

    def __post_init__(self) -> None:
        _check_unit("Constant", "value", self.value)

    def __call__(self, iteration: int) -> float:
        check_iteration(iteration)
        return float(self.value)


@dataclass(frozen=True)
class LinearDecay:
    """beta_i = max(floor, start - i * step): the shape of paper App. F's DAgger schedule.

    ``DAgger()`` uses (1.0, 0.1, 0.2); those numbers are ours (the paper's were lost in extraction).

    The floor keeps some teacher-executed turns forever, so late iterations still see the teacher's
    recoveries instead of collapsing to pure on-policy rollouts.
    """

    start: float = 1.0
    step: float = 0.1
    floor: float = 0.0

    def __post_init__(self) -> None:
        _check_unit("LinearDecay", "start", self.start)
        _check_unit("LinearDecay", "floor", self.floor)
        if not isinstance(self.step, (int, float)) or not math.isfinite(self.step) or self.step < 0:
            raise ValueError(f"LinearDecay.step must be a finite non-negative number, got {self.step!r}")
        if self.floor > self.start:
            raise ValueError(
                f"LinearDecay.floor must be <= start (got floor={self.floor}, start={self.start})"
            )

    def __call__(self, iteration: int) -> float:
        i = check_iteration(iteration)
        return max(float(self.floor), float(self.start) - i * float(self.step))


@dataclass(frozen=True)
class Cosine:
    """Half-cosine from ``start`` to ``end`` over ``iterations``, then constant at ``end``.

    A smoother alternative to :class:`LinearDecay` (not in the paper): it spends more iterations near
    both ends, i.e. longer teacher-heavy warm-up and longer near-final mixing.
    """

    start: float = 1.0
    end: float = 0.0
    iterations: int = 10

    def __post_init__(self) -> None:
        _check_unit("Cosine", "start", self.start)
        _check_unit("Cosine", "end", self.end)
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations <= 0:
            raise ValueError(f"Cosine.iterations must be a positive integer, got {self.iterations!r}")

    def __call__(self, iteration: int) -> float:
        i = min(check_iteration(iteration), self.iterations)
        return float(
            self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * i / self.iterations))
        )


def as_schedule(value: Schedule | float, *, owner: str = "schedule") -> Schedule:
    """A float becomes :class:`Constant`; a schedule passes through; anything else is an error."""
    if isinstance(value, bool):
        raise ValueError(f"{owner} must be a float in [0, 1] or a Schedule, got {value!r}")
    if isinstance(value, (int, float)):
        _check_unit(owner, "value", value)
        return Constant(float(value))
    if isinstance(value, Schedule):
        return value
    if isinstance(value, dict) and set(value) <= {"start", "step", "floor"}:
        # the JSON form a TrainConfig's recipe_kwargs can carry (and a saved config reproduces)
        return LinearDecay(**value)
    raise ValueError(
        f"{owner} must be a float in [0, 1], a Schedule (iteration -> float) or a LinearDecay as a dict "
        f"{{'start', 'step', 'floor'}}, got {value!r}"
    )


# ---------------------------------------------------------------------------------------------------
# prefix-length laws: (iteration, rng) -> k


@runtime_checkable
class PrefixSchedule(Protocol):
    """rho_i: a law over the student-prefix length k in {low, ..., high} (AggreVaTe, Eq. 9).

    ``probs(i)[j]`` is P(k = low + j) at iteration i; calling the schedule draws k from it.
    """

    low: int
    high: int

    def probs(self, iteration: int) -> np.ndarray:
        """P_i(k = low + j) for j = 0..high-low; sums to 1."""

    def __call__(self, iteration: int, rng: np.random.Generator) -> int: ...


class _PrefixLaw:
    """Shared sampling and summaries for laws defined by ``probs``."""

    low: int
    high: int

    def probs(self, iteration: int) -> np.ndarray:  # pragma: no cover - overridden
        """P_i(k = low + j) for j = 0..high-low; sums to 1."""
        raise NotImplementedError

    def support(self) -> np.ndarray:
        """The values k can take, aligned with ``probs``."""
        return np.arange(self.low, self.high + 1)

    def mean(self, iteration: int) -> float:
        """E[k] at this iteration."""
        return float(np.dot(self.support(), self.probs(iteration)))

    def __call__(self, iteration: int, rng: np.random.Generator) -> int:
        p = self.probs(iteration)
        return int(self.low + rng.choice(p.size, p=p))


def _check_range(owner: str, low: int, high: int) -> None:
    _check_nonneg_int(owner, "low", low)
    _check_nonneg_int(owner, "high", high)
    if low > high:
        raise ValueError(f"{owner}.low must be <= high (got low={low}, high={high})")


@dataclass(frozen=True)
class FixedPrefix(_PrefixLaw):
    """k is always the same (``PrefixSwitch(3)`` wraps its int in one)."""

    k: int

    def __post_init__(self) -> None:
        _check_nonneg_int("FixedPrefix", "k", self.k)

    @property
    def low(self) -> int:  # type: ignore[override]
        """k itself."""
        return int(self.k)

    @property
    def high(self) -> int:  # type: ignore[override]
        """k itself."""
        return int(self.k)

    def probs(self, iteration: int) -> np.ndarray:
        """P_i(k = low + j) for j = 0..high-low; sums to 1."""
        check_iteration(iteration)
        return np.ones(1)


@dataclass(frozen=True)
class UniformPrefix(_PrefixLaw):
    """k ~ Uniform{low, ..., high} (both ends included), the same every iteration."""

    low: int
    high: int

    def __post_init__(self) -> None:
        _check_range("UniformPrefix", self.low, self.high)

    def probs(self, iteration: int) -> np.ndarray:
        """P_i(k = low + j) for j = 0..high-low; sums to 1."""
        check_iteration(iteration)
        n = self.high - self.low + 1
        return np.full(n, 1.0 / n)


@dataclass(frozen=True)
class ShiftingPrefix(_PrefixLaw):
    """A truncated geometric law on {low..high} whose mass moves to longer prefixes each iteration.

    Exactly: with n = max(high - low, 1) and tilt tau_i = initial_tilt + shift_per_iter * i,

        P_i(k) = exp(tau_i * (k - low) / n) / sum_{k'=low..high} exp(tau_i * (k' - low) / n)

    i.e. an exponential tilt of the uniform law (a geometric law with ratio exp(tau_i / n), truncated
    to the support). tau = 0 is uniform; tau -> +inf puts all mass on ``high`` (pure student
    rollouts); a negative ``initial_tilt`` starts teacher-heavy (short prefixes). Because
    d E_i[k] / d tau = Var_i[k] / n > 0, the mean prefix length strictly increases with i whenever
    ``shift_per_iter > 0`` and ``low < high``: the paper's "shifting probability mass toward longer
    student prefixes over training" (App. F), with the exact law stated.
    """

    low: int
    high: int
    shift_per_iter: float = 0.5
    initial_tilt: float = 0.0

    def __post_init__(self) -> None:
        _check_range("ShiftingPrefix", self.low, self.high)
        s = self.shift_per_iter
        if not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise ValueError(f"ShiftingPrefix.shift_per_iter must be a finite non-negative number, got {s!r}")
        t = self.initial_tilt
        if not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"ShiftingPrefix.initial_tilt must be a finite number, got {t!r}")

    def tilt(self, iteration: int) -> float:
        """tau_i, the log-odds slope of the law at this iteration."""
        return float(self.initial_tilt) + float(self.shift_per_iter) * check_iteration(iteration)

    def probs(self, iteration: int) -> np.ndarray:
        """P_i(k = low + j) for j = 0..high-low; sums to 1."""
        tau = self.tilt(iteration)
        n = max(self.high - self.low, 1)
        logits = tau * np.arange(self.high - self.low + 1, dtype=np.float64) / n
        logits -= logits.max()  # stable for large tilts
        p = np.exp(logits)
        return p / p.sum()


def as_prefix_schedule(value: PrefixSchedule | int, *, owner: str = "k") -> PrefixSchedule:
    """An int becomes :class:`FixedPrefix`; a prefix schedule passes through."""
    if isinstance(value, bool):
        raise ValueError(f"{owner} must be a non-negative int or a PrefixSchedule, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return FixedPrefix(int(value))
    if isinstance(value, PrefixSchedule):
        return value
    raise ValueError(
        f"{owner} must be a non-negative int or a PrefixSchedule ((iteration, rng) -> k), got {value!r}"
    )
