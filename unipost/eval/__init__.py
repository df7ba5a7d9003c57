"""unipost.eval: how a trained student is judged, as in the paper.

evaluate_policy(env_factory, student, tasks, max_turns=...)   greedy held-out rollouts -> EvalResult
                                                               (resolve rate + Wilson 95%, submission
                                                               rate, Table-4 failure modes, turns)
collect_student_states(env_factory, student, tasks, ...)       one sampled student rollout per task
reverse_kl_on_student_states(student, teacher, trajs, renderer) exact token-level KL(pi_s || pi_T) on
                                                               student-visited contexts (paper §4.4)
failure_table / to_markdown / summary                          paper Table 4 for several methods
paired_comparison(outcomes_a, outcomes_b)                      A - B on the same tasks: paired diff,
                                                               bootstrap 95% over tasks, exact McNemar,
                                                               gained / lost (paired.py says why)
save_eval_outcomes / load_eval_outcomes                        per-task outcomes of an evaluation, on
                                                               disk under a run's eval/ (unipost compare)
"""

from unipost.eval.evaluate import (
    EVAL_OUTCOMES_DIR,
    MECHANISM_KEYS,
    NO_SUBMISSION_MODES,
    SUBMITTED_UNRESOLVED_MODES,
    EvalResult,
    SavedEval,
    eval_outcome_steps,
    evaluate_policy,
    load_eval_outcomes,
    mechanism_metrics,
    outcomes_by_task,
    prune_eval_outcomes,
    save_eval_outcomes,
    wilson_interval,
)
from unipost.eval.kl import (
    KLResult,
    VocabularyMismatchError,
    collect_student_states,
    reverse_kl_on_student_states,
    student_action_documents,
)
from unipost.eval.paired import PairedComparison, TaskSetMismatchError, mcnemar_exact, paired_comparison
from unipost.eval.report import (
    COLUMNS,
    MECHANISM_TITLES,
    MODE_TITLES,
    failure_table,
    mechanism_table,
    paired_table,
    plot_paired,
    summary,
    table_rows,
    to_markdown,
)

__all__ = [
    "COLUMNS",
    "EVAL_OUTCOMES_DIR",
    "MECHANISM_KEYS",
    "MECHANISM_TITLES",
    "MODE_TITLES",
    "NO_SUBMISSION_MODES",
    "SUBMITTED_UNRESOLVED_MODES",
    "EvalResult",
    "KLResult",
    "PairedComparison",
    "SavedEval",
    "TaskSetMismatchError",
    "VocabularyMismatchError",
    "collect_student_states",
    "eval_outcome_steps",
    "evaluate_policy",
    "failure_table",
    "load_eval_outcomes",
    "mcnemar_exact",
    "mechanism_metrics",
    "mechanism_table",
    "outcomes_by_task",
    "paired_comparison",
    "paired_table",
    "plot_paired",
    "prune_eval_outcomes",
    "reverse_kl_on_student_states",
    "save_eval_outcomes",
    "student_action_documents",
    "summary",
    "table_rows",
    "to_markdown",
    "wilson_interval",
]
