"""Paper Table 4 for any set of evaluated methods: a rich table for the terminal, Markdown for files.

Columns follow the paper exactly: Resolve, Submission (Yes / No), then "Submitted but Unresolved"
(wrong solution, wrong file, syntax or runtime error; fractions of that block) and "No Submission"
(tool-use error, repetitive loop, context overflow, budget exhaustion, no edit; fractions of that
block). An empty block shows "–" rather than 0%, since its fractions are undefined, not zero.
"""

from __future__ import annotations

from collections.abc import Mapping

from rich.table import Table

from unipost.eval.evaluate import NO_SUBMISSION_MODES, SUBMITTED_UNRESOLVED_MODES, EvalResult

MODE_TITLES: dict[str, str] = {
    "wrong_solution": "Wrong Solution",
    "wrong_file": "Wrong File",
    "syntax_or_runtime_error": "Syntax or Runtime Error",
    "tool_use_error": "Tool-Use Error",
    "repetitive_loop": "Repetitive Loop",
    "context_overflow": "Context Overflow",
    "budget_exhaustion": "Budget Exhaustion",
    "no_edit": "No Edit",
}
"""Column titles of paper Table 4, by failure mode."""

COLUMNS: tuple[str, ...] = (
    "Method",
    "Resolve",
    "Submission Yes",
    "Submission No",
    *(MODE_TITLES[m] for m in SUBMITTED_UNRESOLVED_MODES),
    *(MODE_TITLES[m] for m in NO_SUBMISSION_MODES),
)
"""The table's column titles, left to right."""


def _check(results: Mapping[str, EvalResult]) -> dict[str, EvalResult]:
    if not isinstance(results, Mapping) or not results:
        raise ValueError("the failure table needs a non-empty {method name: EvalResult} mapping")
    for name, result in results.items():
        if not isinstance(result, EvalResult):
            raise TypeError(f"results[{name!r}] is a {type(result).__name__}, not an EvalResult")
    return dict(results)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table_rows(results: Mapping[str, EvalResult]) -> list[list[str]]:
    """The cells of the table (one row per method, in ``COLUMNS`` order), as strings."""
    rows = []
    for name, r in _check(results).items():
        if r.n == 0:
            rows.append([name, *["–"] * (len(COLUMNS) - 1)])
            continue
        left = [
            _pct(r.submitted_unresolved_modes[m]) if r.submitted_unresolved else "–"
            for m in SUBMITTED_UNRESOLVED_MODES
        ]
        right = [_pct(r.no_submission_modes[m]) if r.no_submission else "–" for m in NO_SUBMISSION_MODES]
        rows.append(
            [
                name,
                _pct(r.resolve_rate),
                _pct(r.submission_rate),
                _pct(1.0 - r.submission_rate),
                *left,
                *right,
            ]
        )
    return rows


def failure_table(results: Mapping[str, EvalResult], *, title: str | None = None) -> Table:
    """A rich Table in the layout of paper Table 4, one row per method (insertion order)."""
    rows = table_rows(results)
    n = {r.n for r in results.values()}
    caption = (
        "Failure-mode fractions are of their block: submitted-but-unresolved, or no submission; "
        f"n = {', '.join(str(x) for x in sorted(n))} held-out tasks"
    )
    table = Table(title=title or "Held-out evaluation (paper Table 4 layout)", caption=caption)
    for i, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if i == 0 else "right", style="bold" if i == 0 else None)
    for row in rows:
        table.add_row(*row)
    return table


def to_markdown(results: Mapping[str, EvalResult]) -> str:
    """The same table as GitHub Markdown, followed by a note on what the fractions are of."""
    rows = table_rows(results)
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join([":---", *["---:"] * (len(COLUMNS) - 1)]) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"{', '.join(MODE_TITLES[m] for m in SUBMITTED_UNRESOLVED_MODES)}: fractions of the submitted "
        f"but unresolved episodes; {', '.join(MODE_TITLES[m] for m in NO_SUBMISSION_MODES)}: fractions "
        "of the episodes without a submission (paper Table 4). – marks an empty block.",
    ]
    return "\n".join(lines) + "\n"


def summary(results: Mapping[str, EvalResult]) -> str:
    """One line comparing methods: resolve rate [Wilson 95%], submission rate, per method."""
    parts = []
    for name, r in _check(results).items():
        lo, hi = r.resolve_ci
        parts.append(
            f"{name} resolve {r.resolve_rate:.1%} [{lo:.1%}, {hi:.1%}] submit {r.submission_rate:.1%}"
        )
    n = sorted({r.n for r in results.values()})
    return f"held-out (n={'/'.join(map(str, n))}): " + " | ".join(parts)
