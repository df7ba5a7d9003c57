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


# Which log-probs a part's per-token value reads, from least to most: "none" (known before the step: a
# constant, a reward, a group advantage), "token" (the token's own log-prob and entropy: OPD's teacher
# log-ratio, PPO's clipped ratio, the k3 KL, the entropy bonus), "batch" (other tokens' too: e.g. a
# weight normalised over the batch, a sequence-level ratio). Up to "token" the loss is a sum of per-token
# terms, so the fused three-GEMM head can form its gradient row chunk by row chunk
# (unipost.kernels.fused_loss); "batch" needs every log-prob first (token_logprobs, four GEMMs).
LOGP_SCOPES: tuple[str, ...] = ("none", "token", "batch")


def logp_scope_of(*parts: object) -> str:
    """The widest ``logp_scope`` of the given parts (``None`` parts are skipped).

    A part that does not declare one (a user's own score or regulariser) counts as ``"batch"``: the
    four-GEMM head is right for any loss, the three-GEMM one only for losses known to be per-token.
    """
    widest = 0
    for part in parts:
        if part is not None:
            scope = getattr(part, "logp_scope", "batch")
            widest = max(widest, LOGP_SCOPES.index(scope) if scope in LOGP_SCOPES else len(LOGP_SCOPES) - 1)
    return LOGP_SCOPES[widest]
