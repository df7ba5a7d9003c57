"""Statistics of one rollout collection: what a user checks first after an iteration's rollouts.

The teacher-executed fraction is the empirical beta of the context distribution (Eq. 8): if it does
not track the schedule, the mixture is wrong. Submission / resolve rates and the Table-4 failure modes
say what the student does with its turns; tool errors say whether it can even speak the tool format.
Throughput (episodes/s, env steps/s) and the time split between generation, teacher and environment
say where an iteration's wall time goes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from unipost.data import Trajectory

# Counters decided by which thread finished first, not by the run's data: two identical runs (a resumed one
# and its uninterrupted twin, two seeds-equal runs on a loaded machine) may differ in them, as in the ``_s``
# times. Compare runs without them (unipost.train.metrics.depends_on_timing). Not in the set, on purpose:
# deferred labels' teacher_requests / label_cache_hits / label_failures, which are exact counts in a run
# whose teacher answers, but may vary with when a transient failure happened under on_missing="skip".
RACE_COUNTERS: frozenset[str] = frozenset({"ticks_blocked_on_teacher"})


@dataclass
class RolloutStats:
    """Counts and rates over one ``RolloutEngine.collect`` call (all rates in [0, 1])."""

    episodes: int = 0
    turns: int = 0  # total executed turns
    turns_mean: float = 0.0
    teacher_turns: int = 0
    teacher_fraction: float = 0.0  # teacher-executed turns / all turns (the realised beta)
    teacher_queries: int = 0  # states the teacher was asked at (executed turns and labels)
    teacher_requests: int = 0  # teacher calls actually made (deferred labels: one per distinct state)
    label_cache_hits: int = 0  # deferred labels answered by an earlier request for the same state
    label_failures: int = 0  # labels left out after the teacher's retries (TeacherLabels(on_missing="skip"))
    deferred_labels: bool = False  # labels were taken off the tick's critical path (RolloutEngine)
    student_queries: int = 0  # states the student generated at
    student_calls: int = 0  # batched student.act calls (one per tick with student work)
    tool_errors: int = 0  # turns whose action was a malformed or invalid tool call
    tool_error_rate: float = 0.0  # per turn
    submitted: int = 0
    resolved: int = 0
    submission_rate: float = 0.0
    resolve_rate: float = 0.0
    mean_reward: float = 0.0
    failure_modes: dict[str, int] = field(default_factory=dict)
    ended_by: dict[str, int] = field(default_factory=dict)  # turn_budget / context_budget / finished
    env_errors: int = 0  # episodes ended by an exception inside their environment
    env_steps: int = 0
    wall_time_s: float = 0.0
    student_time_s: float = 0.0  # inside student.act (the teacher runs in parallel with it)
    teacher_time_s: float = 0.0  # inside teacher.act (deferred labels: summed over concurrent requests)
    env_time_s: float = 0.0  # wall time of the env phases (reset, step, verify; run concurrently)
    ticks: int = 0  # the engine's lock-step rounds
    ticks_blocked_on_teacher: int = 0  # ticks whose student work was done before the teacher's answers
    teacher_wait_s: float = 0.0  # time the engine blocked on the teacher (ticks and the final drain)
    label_drain_s: float = 0.0  # of which after the last tick, resolving deferred labels still in flight
    episodes_per_s: float = 0.0
    env_steps_per_s: float = 0.0

    @classmethod
    def from_trajectories(cls, trajectories: Sequence[Trajectory], **counters: Any) -> RolloutStats:
        """Rates from finished trajectories; ``counters`` are the engine's own (queries, steps, times)."""
        stats = cls(**counters)
        n = stats.episodes = len(trajectories)
        stats.turns = sum(len(t.turns) for t in trajectories)
        stats.teacher_turns = sum(turn.executor == "teacher" for t in trajectories for turn in t.turns)
        stats.tool_errors = sum(turn.tool_error for t in trajectories for turn in t.turns)
        stats.submitted = sum(t.outcome.submitted for t in trajectories)
        stats.resolved = sum(t.outcome.resolved for t in trajectories)
        stats.failure_modes = dict(
            sorted(Counter(t.outcome.failure_mode for t in trajectories if t.outcome.failure_mode).items())
        )
        stats.ended_by = dict(
            sorted(Counter(str(t.meta.get("ended_by") or "finished") for t in trajectories).items())
        )
        stats.env_errors = sum(bool(t.meta.get("env_error")) for t in trajectories)
        if n:
            stats.turns_mean = stats.turns / n
            stats.submission_rate = stats.submitted / n
            stats.resolve_rate = stats.resolved / n
            stats.mean_reward = sum(t.outcome.reward for t in trajectories) / n
        if stats.turns:
            stats.teacher_fraction = stats.teacher_turns / stats.turns
            stats.tool_error_rate = stats.tool_errors / stats.turns
        if stats.wall_time_s > 0:
            stats.episodes_per_s = n / stats.wall_time_s
            stats.env_steps_per_s = stats.env_steps / stats.wall_time_s
        return stats

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for logs and benchmark results)."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs."""
        modes = ", ".join(f"{k} {v}" for k, v in self.failure_modes.items()) or "none"
        return (
            f"{self.episodes} episodes, {self.turns_mean:.1f} turns/ep, teacher {self.teacher_fraction:.2f}, "
            f"teacher queries {self.teacher_queries}, tool errors {self.tool_errors}, "
            f"submitted {self.submission_rate:.0%}, resolved {self.resolve_rate:.0%}, "
            f"failures [{modes}], {self.wall_time_s:.1f}s ({self.episodes_per_s:.2f} ep/s, "
            f"{self.env_steps_per_s:.1f} steps/s)"
        )
