"""unipost.eval: how a trained student is judged, as in the paper.

evaluate_policy(env_factory, student, tasks, max_turns=...)   greedy held-out rollouts -> EvalResult
                                                               (resolve rate + Wilson 95%, submission
                                                               rate, Table-4 failure modes, turns)
collect_student_states(env_factory, student, tasks, ...)       one sampled student rollout per task
reverse_kl_on_student_states(student, teacher, trajs, renderer) exact token-level KL(pi_s || pi_T) on
                                                               student-visited contexts (paper §4.4)
failure_table / to_markdown / summary                          paper Table 4 for several methods
"""

from unipost.eval.evaluate import (
    NO_SUBMISSION_MODES,
    SUBMITTED_UNRESOLVED_MODES,
    EvalResult,
    evaluate_policy,
    wilson_interval,
)
from unipost.eval.kl import (
    KLResult,
    VocabularyMismatchError,
    collect_student_states,
    reverse_kl_on_student_states,
    student_action_documents,
)
from unipost.eval.report import COLUMNS, MODE_TITLES, failure_table, summary, table_rows, to_markdown

__all__ = [
    "COLUMNS",
    "MODE_TITLES",
    "NO_SUBMISSION_MODES",
    "SUBMITTED_UNRESOLVED_MODES",
    "EvalResult",
    "KLResult",
    "VocabularyMismatchError",
    "collect_student_states",
    "evaluate_policy",
    "failure_table",
    "reverse_kl_on_student_states",
    "student_action_documents",
    "summary",
    "table_rows",
    "to_markdown",
    "wilson_interval",
]
