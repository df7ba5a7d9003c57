"""Expert-label NLL on student-visited states: a continuous, teacher-forced secondary metric.

Why: a tiny student can sit at 0% resolve (and emit no valid tool call at all) for a long time while
training still moves it toward or away from the expert *on the states it reaches itself*, which is the
quantity covariate shift is about (paper §3, §4.4). Given greedy held-out rollouts whose student turns
carry the expert's label (``evaluate_policy(..., expert=...)``), this is the student's mean negative
log-likelihood per label token of the expert's action at those states. Lower is better; it needs only
the expert's actions (no teacher log-probs), so it works with a scripted or API expert.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unipost.data import Trajectory
from unipost.objective import Recipe, StudentRollout, TeacherLabels, Uniform
from unipost.rendering.chat import ChatRenderer

_LABELS = Recipe(StudentRollout(), TeacherLabels(on_missing="skip"), Uniform(), name="expert-labels")


@torch.no_grad()
def expert_label_nll(
    student: torch.nn.Module,
    trajectories: Sequence[Trajectory],
    renderer: ChatRenderer,
    *,
    micro_batch_tokens: int = 4096,
) -> float | None:
    """Mean -log pi_student(expert action tokens | student-visited state), in nats per label token.

    ``None`` when no student turn carries an expert label.
    """
    from unipost.batch import make_microbatches
    from unipost.kernels.model import packed_logprobs

    labelled = [t for t in trajectories if any(turn.label is not None for turn in t.turns)]
    if not labelled:
        return None
    was_training = student.training
    student.eval()
    total, tokens = 0.0, 0
    try:
        for batch in make_microbatches(labelled, _LABELS, renderer, max_tokens=micro_batch_tokens):
            logp = packed_logprobs(student, batch.packed).logp_L
            total -= float(logp.double().sum())
            tokens += int(logp.numel())
    finally:
        student.train(was_training)
    return total / tokens if tokens else None
