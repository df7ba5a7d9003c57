"""Learning curves and final comparison bars from metrics records (``metrics.jsonl``), saved as images.

Why here and why like this: the main job ends with "DAgger vs SFT" on held-out resolve rate and the
§4.4 reverse-KL diagnostic, and a reader should see it without opening a notebook. Figures are built on
a bare :class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``: no global
backend switch, no display needed, safe on a headless CPU box and inside a training process.

Uncertainty: a record may carry ``<key>_lo`` / ``<key>_hi`` next to ``<key>`` (e.g. a Wilson interval
for a resolve rate, computed by the evaluator); curves then get a shaded band and bars get error bars.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_comparison_bars", "plot_learning_curves"]

_LO, _HI = "_lo", "_hi"
_ACRONYMS = {"kl", "lr", "sft", "grpo", "opd", "ess"}


def _label(key: str) -> str:
    """``"heldout/resolve_rate"`` -> ``"heldout: resolve rate"``: readable axis titles from metric names."""
    group, _, name = key.rpartition("/")
    name = " ".join(w.upper() if w in _ACRONYMS else w for w in name.split("_"))
    return f"{group.replace('/', ' ')}: {name}" if group else name


def _load_runs(runs: Mapping[str, Sequence[Mapping[str, Any]] | str | os.PathLike[str]]) -> dict[str, list]:
    from unipost.train.metrics import read_metrics

    if not runs:
        raise ValueError("runs is empty: pass {run name: records or path to metrics.jsonl / run dir}")
    loaded: dict[str, list] = {}
    for name, value in runs.items():
        if isinstance(value, (str, os.PathLike)):
            path = Path(value)
            if not path.exists():
                raise FileNotFoundError(
                    f"run {name!r}: {path} does not exist (expected metrics.jsonl or a run dir)"
                )
            loaded[name] = read_metrics(path)
        else:
            loaded[name] = list(value)
    return loaded


def _new_figure(n_panels: int, *, panel_w: float = 4.6, panel_h: float = 3.4, max_cols: int = 3):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(max_cols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_w * ncols, panel_h * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig, out: str | os.PathLike[str], dpi: int) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out


def plot_learning_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]] | str | os.PathLike[str]],
    keys: Sequence[str],
    out: str | os.PathLike[str],
    x: str = "iteration",
    *,
    title: str | None = "Learning curves",
    dpi: int = 120,
) -> Path:
    """One panel per metric in ``keys``, one line per run; returns the saved image's path.

    ``runs`` maps a legend name (``"DAgger"``, ``"SFT"``) to its records or to a ``metrics.jsonl`` /
    run directory. Records lacking ``x`` or the key are skipped (a run logs training and evaluation
    metrics in different records). If ``x`` is missing from every record, ``"step"`` is used instead.
    A key that no run has raises ``ValueError`` listing the keys that exist (a typo must not produce an
    empty panel that looks like "no progress").
    """
    keys = list(keys)
    if not keys:
        raise ValueError("keys is empty: name at least one metric to plot, e.g. ['heldout/resolve_rate']")
    data = _load_runs(runs)
    all_records = [r for recs in data.values() for r in recs]
    if not any(x in r for r in all_records):
        if x != "step" and any("step" in r for r in all_records):
            x = "step"
        else:
            raise ValueError(f"no record has the x field {x!r}; available fields: {_fields(all_records)}")
    missing = [k for k in keys if not any(_number(r.get(k)) is not None for r in all_records)]
    if missing:
        raise ValueError(f"no run has metric(s) {missing}; available metrics: {_fields(all_records)}")

    fig, axes = _new_figure(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        for name, records in data.items():
            points = sorted(
                (float(r[x]), float(r[key]), _number(r.get(key + _LO)), _number(r.get(key + _HI)))
                for r in records
                if _number(r.get(x)) is not None and _number(r.get(key)) is not None
            )
            if not points:
                continue
            xs = [p[0] for p in points]
            ys = [p[1] for p in points]
            (line,) = ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.6, label=name)
            if all(p[2] is not None and p[3] is not None for p in points):
                ax.fill_between(xs, [p[2] for p in points], [p[3] for p in points], color=line.get_color(),
                                alpha=0.18, linewidth=0)  # fmt: skip
        ax.set_title(_label(key))
        ax.set_xlabel(x)
        if all(float(r[x]).is_integer() for r in all_records if _number(r.get(x)) is not None):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps / iterations: no 0.5 ticks
        ax.set_ylabel(_label(key).split(": ")[-1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, out, dpi)


def plot_comparison_bars(
    results: Mapping[str, Mapping[str, Any]],
    keys: Sequence[str],
    out: str | os.PathLike[str],
    *,
    title: str | None = "Final comparison",
    interval_label: str = "95% intervals",
    dpi: int = 120,
) -> Path:
    """One panel per metric in ``keys``, one bar per run (final values), error bars from ``<key>_lo/_hi``.

    ``results`` maps a run name to its final metrics, e.g. ``{"DAgger": {"heldout/resolve_rate": 0.4,
    "heldout/resolve_rate_lo": 0.3, "heldout/resolve_rate_hi": 0.5, "heldout/reverse_kl": 0.8}}``.
    An interval that does not contain its value raises ``ValueError`` (it would draw a misleading bar).
    ``interval_label`` names what the intervals are in the title (the evaluator's Wilson 95% by default).
    """
    keys = list(keys)
    if not results:
        raise ValueError("results is empty: pass {run name: {metric: value, ...}}")
    if not keys:
        raise ValueError("keys is empty: name at least one metric to compare")
    for key in keys:
        if not any(_number(m.get(key)) is not None for m in results.values()):
            fields = sorted({k for m in results.values() for k in m})
            raise ValueError(f"no run has metric {key!r}; available: {fields}")

    fig, axes = _new_figure(len(keys), panel_w=max(3.2, 1.1 * len(results) + 1.6))
    colors = [f"C{i}" for i in range(len(results))]
    for ax, key in zip(axes, keys, strict=True):
        names, values, err_lo, err_hi = [], [], [], []
        for name, metrics in results.items():
            value = _number(metrics.get(key))
            if value is None:
                continue
            lo, hi = _number(metrics.get(key + _LO)), _number(metrics.get(key + _HI))
            if (lo is None) != (hi is None):
                raise ValueError(f"run {name!r}: {key} has only one of {key + _LO} / {key + _HI}")
            if lo is not None and not (lo <= value <= hi):
                raise ValueError(f"run {name!r}: {key}={value} lies outside its interval [{lo}, {hi}]")
            names.append(name)
            values.append(value)
            err_lo.append(0.0 if lo is None else value - lo)
            err_hi.append(0.0 if hi is None else hi - value)
        positions = range(len(names))
        has_err = any(err_lo) or any(err_hi)
        bars = ax.bar(positions, values, color=colors[: len(names)], width=0.6,
                      yerr=[err_lo, err_hi] if has_err else None, capsize=6)  # fmt: skip
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=3, fontsize="small")
        ax.set_xticks(list(positions), names)
        ax.set_title(_label(key))
        ax.set_ylabel(_label(key).split(": ")[-1])
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    if title:
        with_intervals = any(_has_interval(results, k) for k in keys)
        fig.suptitle(title + (f"  (error bars: {interval_label})" if with_intervals else ""))
    return _save(fig, out, dpi)


def _has_interval(results: Mapping[str, Mapping[str, Any]], key: str) -> bool:
    return any(key + _LO in m for m in results.values())


def _fields(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({k for r in records for k in r if k not in ("time",)})
