"""What a part of the objective needs collected, so the engine gathers exactly that and no more.

Each rollout protocol, label source, score and regulariser declares a ``needs: frozenset[Need]``; a
:class:`~unipost.objective.Recipe` takes their union. The rollout engine reads it to decide, e.g.,
whether to query the teacher at every visited state (DAgger, Eq. 10-11) or to score the student's
sampled tokens under the teacher (OPD), and the batch builder to decide which per-token tensors to
compute. Declaring needs up front is what lets an unsatisfiable recipe (teacher log-probs from an
API-only teacher) fail at construction instead of after an hour of rollouts.
"""

from __future__ import annotations

import enum


class Need(enum.Enum):
    """One kind of data a part of the objective needs the rollout engine or batch builder to provide."""

    TEACHER_ACTIONS = "teacher_actions"
    """The teacher's action a*_t at EVERY visited state, student-executed ones included (Eq. 10-11).

    On teacher-executed turns the executed action is that label, so only student turns cost an extra
    teacher call. Any teacher that can ``act`` serves it (black-box API teachers included).
    """

    TEACHER_LOGPROBS = "teacher_logprobs"
    """log pi_T of the label tokens (OPD's score): needs a white-box teacher."""

    STUDENT_LOGPROBS = "student_logprobs"
    """The student's sampled token ids and their sampling-time log-probs (exact re-scoring, ratios)."""

    REWARDS = "rewards"
    """The verifier's outcome per trajectory (reward, resolved, submitted)."""

    GROUPS = "groups"
    """Several samples of the same task, with a group id per trajectory (GRPO's baseline)."""

    REFERENCE_LOGPROBS = "reference_logprobs"
    """log pi_ref of the label tokens under a frozen reference model (KL regulariser)."""

    ENTROPY = "entropy"
    """The student's per-token entropy at label positions (entropy bonus), differentiable."""

    def __repr__(self) -> str:  # shorter in error messages and describe()
        return f"Need.{self.name}"


def needs_of(*parts: object) -> frozenset[Need]:
    """Union of the ``needs`` of the given parts (``None`` parts are skipped)."""
    out: frozenset[Need] = frozenset()
    for part in parts:
        if part is not None:
            out |= frozenset(getattr(part, "needs", frozenset()))
    return out
