"""Paper Table 4 for any set of evaluated methods: a rich table for the terminal, Markdown for files.

Columns follow the paper exactly: Resolve, Submission (Yes / No), then "Submitted but Unresolved"
(wrong solution, wrong file, syntax or runtime error; fractions of that block) and "No Submission"
(tool-use error, repetitive loop, context overflow, budget exhaustion, no edit; fractions of that
block). An empty block shows "–" rather than 0%, since its fractions are undefined, not zero.

Students evaluated on the same tasks are compared paired (:func:`paired_table`, :func:`plot_paired`:
difference with its task-bootstrap interval, McNemar p, tasks gained / lost), and the tool-error
mechanism metrics get their own table (:func:`mechanism_table`), shared by the main job and
``unipost compare``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from rich.table import Table

from unipost.eval.evaluate import MECHANISM_KEYS, NO_SUBMISSION_MODES, SUBMITTED_UNRESOLVED_MODES, EvalResult
from unipost.eval.paired import PairedComparison

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


MECHANISM_TITLES: dict[str, str] = {
    "episodes_with_tool_error": "episodes w/ tool error",
    "first_tool_error_turn": "first error turn",
    "recovery_rate": "recover (resolve after error)",
    "tool_error_rate_after_first": "errors/turn after first",
    "tool_error_after_error": "error right after error",
}
"""Column titles of :func:`mechanism_table`, by mechanism metric (``MECHANISM_KEYS``)."""


def _mechanism_value(metrics: Mapping[str, float | None], key: str) -> float | None:
    value = metrics.get(key, metrics.get(f"eval/{key}"))
    return None if value is None else float(value)


def mechanism_table(rows: Mapping[str, Mapping[str, float | None]], *, title: str | None = None) -> Table:
    """One row per student of the tool-error mechanism metrics (plain or ``eval/``-prefixed names, e.g.
    a metrics-history record); "n/a" where a metric is undefined (no episode had a tool error) or was
    not recorded (a run from before these metrics)."""
    title = title or "Tool errors: when they start, whether episodes recover, whether they cascade"
    table = Table(title=title)
    table.add_column("student", justify="left", style="bold")
    for key in MECHANISM_KEYS:
        table.add_column(MECHANISM_TITLES[key], justify="right")
    for name, metrics in rows.items():
        cells = []
        for key in MECHANISM_KEYS:
            value = _mechanism_value(metrics, key)
            cells.append(
                "n/a" if value is None else f"{value:.1f}" if key == "first_tool_error_turn" else _pct(value)
            )
        table.add_row(name, *cells)
    return table


def _check_paired(comparisons: Mapping[str, PairedComparison]) -> dict[str, PairedComparison]:
    if not isinstance(comparisons, Mapping) or not comparisons:
        raise ValueError("needs a non-empty {'A - B' label: PairedComparison} mapping")
    for name, c in comparisons.items():
        if not isinstance(c, PairedComparison):
            raise TypeError(f"comparisons[{name!r}] is a {type(c).__name__}, not a PairedComparison")
    return dict(comparisons)


def paired_table(comparisons: Mapping[str, PairedComparison], *, title: str | None = None) -> Table:
    """A rich table of paired comparisons, one row per ``"A - B"`` label: both resolve rates, the paired
    difference with its interval, the exact McNemar p, tasks gained / lost by A, and the pairs counted."""
    table = Table(
        title=title or "Paired on the same held-out tasks (A - B)",
        caption="interval: bootstrap over tasks (seeds kept together); p: exact McNemar on discordant pairs",
    )
    for i, column in enumerate(("A - B", "A", "B", "diff [95% CI]", "McNemar p", "gained / lost", "pairs")):
        table.add_column(column, justify="left" if i == 0 else "right", style="bold" if i == 0 else None)
    for name, c in _check_paired(comparisons).items():
        table.add_row(
            name,
            f"{c.rate_a:.3f}",
            f"{c.rate_b:.3f}",
            f"{c.diff:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
            f"{c.p_mcnemar:.3g}",
            f"+{c.gained} / -{c.lost}",
            str(c.n),
        )
    return table


def plot_paired(comparisons: Mapping[str, PairedComparison], out: str | os.PathLike[str]) -> Path:
    """Save a two-panel figure: left, each paired difference with its interval (a forest plot, 0 marked);
    right, the tasks each A gained and lost against its B. Built on a bare Agg Figure (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = list(_check_paired(comparisons).items())
    fig = Figure(figsize=(11.0, 1.8 + 0.55 * len(items)), layout="constrained")
    FigureCanvasAgg(fig)
    forest, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]}, sharey=True)
    ys = list(range(len(items)))[::-1]  # first comparison on top
    for y, (_, c) in zip(ys, items, strict=True):
        color = "tab:green" if c.ci_low > 0 else "tab:red" if c.ci_high < 0 else "tab:grey"
        forest.errorbar(
            c.diff, y, xerr=[[c.diff - c.ci_low], [c.ci_high - c.diff]], fmt="o", color=color, capsize=4
        )
        forest.annotate(
            f"p={c.p_mcnemar:.2g}", (c.ci_high, y), xytext=(6, 0), textcoords="offset points", va="center"
        )
        bars.barh(y, c.gained, color="tab:green", label="gained" if y == ys[0] else None)
        bars.barh(y, -c.lost, color="tab:red", label="lost" if y == ys[0] else None)
    forest.axvline(0.0, color="black", lw=0.8)
    forest.margins(x=0.2)  # room for the p-value labels right of each interval
    forest.set_yticks(ys, [name if len(name) <= 48 else "…" + name[-47:] for name, _ in items])
    forest.set_xlabel("paired difference in resolve rate (95% CI, bootstrap over tasks)")
    forest.grid(alpha=0.3, axis="x")
    bars.axvline(0.0, color="black", lw=0.8)
    bars.set_xlabel("pairs gained (+) / lost (-) by A")
    bars.legend(fontsize=8, loc="lower right")
    bars.grid(alpha=0.3, axis="x")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
