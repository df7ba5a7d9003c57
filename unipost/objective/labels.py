"""Label sources: what is imitated at each visited state, the label distribution d_L (paper Eq. 11, 14).

Given a finished :class:`~unipost.data.Trajectory`, a label source returns one :class:`LabelRef` per
(context, label) transition it wants trained on. The packer consumes these: a label with
``is_executed=True`` already sits in the executed token sequence (loss on spine tokens), any other is a
branch hanging off the end of context s_t (DESIGN §4).

* :class:`TeacherLabels` - the teacher's action a*_t at EVERY visited state (SFT, DAgger, AggreVaTe).
* :class:`OwnSamples` - the executed action itself (policy gradient, GRPO, OPD: y ~ pi_theta).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from unipost.data import Message, Trajectory
from unipost.objective.needs import Need


class LabelError(ValueError):
    """A trajectory lacks what its label source needs (e.g. no teacher label at a student turn)."""


@dataclass(frozen=True)
class LabelRef:
    """One transition to train on: the label for the context s_t = ``trajectory.context(turn)``.

    ``is_executed`` is True when the label is the action that was executed at that turn, so its tokens
    are already in the executed sequence. ``token_ids`` are the exact sampled tokens of an executed
    student action when the engine recorded them (re-scoring them avoids re-tokenisation drift).
    """

    turn: int
    message: Message
    is_executed: bool
    token_ids: tuple[int, ...] | None = None


@runtime_checkable
class LabelSource(Protocol):
    """Chooses the label y for each visited state of a trajectory."""

    needs: frozenset[Need]
    samples_from_student: bool  # labels are y ~ pi_theta (what score-function weights require)

    def select(self, trajectory: Trajectory) -> list[LabelRef]:
        """The (context, label) transitions of this trajectory, in turn order."""


@dataclass(frozen=True)
class TeacherLabels:
    """Imitate the teacher's action at every visited state (Eq. 10-11).

    On a teacher-executed turn the label is the executed action itself. On a student-executed turn it
    is the queried ``turn.label``; when that happens to equal the executed action the label is marked
    executed (no branch needed). A student turn without a label is an error by default: the engine
    should have queried the teacher (``Need.TEACHER_ACTIONS``); ``on_missing="skip"`` drops it instead
    (e.g. for a teacher that failed to answer on a few states).
    """

    on_missing: Literal["error", "skip"] = "error"

    needs = frozenset({Need.TEACHER_ACTIONS})
    samples_from_student = False

    def __post_init__(self) -> None:
        if self.on_missing not in ("error", "skip"):
            raise ValueError(f"TeacherLabels.on_missing must be 'error' or 'skip', got {self.on_missing!r}")

    def select(self, trajectory: Trajectory) -> list[LabelRef]:
        """The (context, label) transitions of this trajectory, in turn order."""
        refs: list[LabelRef] = []
        for t, turn in enumerate(trajectory.turns):
            if turn.executor == "teacher":
                refs.append(LabelRef(t, turn.action, is_executed=True))
            elif turn.label is not None:
                refs.append(LabelRef(t, turn.label, is_executed=turn.label_equals_action))
            elif self.on_missing == "error":
                raise LabelError(
                    f"trajectory {trajectory.task_id!r}, turn {t}: executed by the student but has no "
                    "teacher label; the rollout engine must query the teacher at every visited state "
                    "(Need.TEACHER_ACTIONS), or use TeacherLabels(on_missing='skip')"
                )
        return refs

    def __repr__(self) -> str:
        return "TeacherLabels()" if self.on_missing == "error" else "TeacherLabels(on_missing='skip')"


@dataclass(frozen=True)
class OwnSamples:
    """Imitate the executed actions of turns run by ``executor`` (default: the student's own samples).

    With ``executor="student"`` the labels are samples y ~ pi_theta, which is what score-function
    weights (GRPO's advantage, OPD's log-ratio) need to be unbiased. ``"teacher"`` trains on the
    teacher-executed turns only (behaviour cloning on a mixture's teacher turns); ``"any"`` on every
    executed turn.
    """

    executor: Literal["student", "teacher", "any"] = "student"

    def __post_init__(self) -> None:
        if self.executor not in ("student", "teacher", "any"):
            raise ValueError(
                f"OwnSamples.executor must be 'student', 'teacher' or 'any', got {self.executor!r}"
            )

    @property
    def needs(self) -> frozenset[Need]:
        """Student sampling data, unless only teacher turns are labelled."""
        return frozenset() if self.executor == "teacher" else frozenset({Need.STUDENT_LOGPROBS})

    @property
    def samples_from_student(self) -> bool:
        """True only for the student's own samples (y ~ pi_theta)."""
        return self.executor == "student"

    def select(self, trajectory: Trajectory) -> list[LabelRef]:
        """The (context, label) transitions of this trajectory, in turn order."""
        return [
            LabelRef(
                t,
                turn.action,
                is_executed=True,
                token_ids=tuple(turn.action_token_ids) if turn.action_token_ids is not None else None,
            )
            for t, turn in enumerate(trajectory.turns)
            if self.executor == "any" or turn.executor == self.executor
        ]
