"""Training metrics: one JSON line per log call (the source of truth), mirrored to TensorBoard/wandb/trackio.

Why JSONL first: it is the only sink that needs nothing installed, survives a ``kill -9`` (each record is
one ``write`` + ``flush`` + ``fsync``), can be read back by :func:`read_metrics` for plots and summaries,
and can be truncated to a checkpoint's step on resume. TensorBoard is a core dependency because people
expect ``tensorboard --logdir runs/`` to work; wandb and trackio are forwarded to only when asked for
*and* installed, and asking for a missing one warns (it never fails a training run over a dashboard).

Resume contract: a run killed during iteration ``k+1`` has JSONL records (and TensorBoard events) for
steps up to ``k+1``, but its last checkpoint is ``k``. ``MetricsLogger(run_dir, resume_from_step=k)``
rewrites ``metrics.jsonl`` atomically without the records with ``step > k`` and opens TensorBoard with
``purge_step=k+1``, so the resumed run's curves have no duplicated or orphaned points.

Record format (one line)::

    {"step": 3, "time": 1718000000.0, "train/loss": 0.41, "heldout/resolve_rate": 0.25}

``prefix="heldout"`` turns ``{"resolve_rate": 0.25}`` into ``{"heldout/resolve_rate": 0.25}``; the slash
is TensorBoard's grouping separator.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unipost._optional import available
from unipost.rollout.stats import RACE_COUNTERS

log = logging.getLogger(__name__)

__all__ = ["METRICS_FILE", "MetricsLogger", "depends_on_timing", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "time")
_WANDB_ID_FILE = ".wandb_run_id"


def depends_on_timing(key: str) -> bool:
    """Whether a metric key may differ between two runs that did the same work: wall-clock keys (the
    record's ``time`` stamp, ``time/...``, ``..._s`` seconds and per-second rates) and the rollout
    counters decided by thread timing (``rollout/ticks_blocked_on_teacher``).

    Why: a resumed run is checked against its uninterrupted twin metric by metric; everything else there
    (``train/effective_samples``, ``train/optimizer_steps``, ``rollout/env_steps``, ...) must match.
    """
    name = key.rsplit("/", 1)[-1]
    return key == "time" or key.startswith("time/") or key.endswith("_s") or name in RACE_COUNTERS


def _metrics_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p / METRICS_FILE if p.is_dir() else p


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (or of a run directory holding one), in file order.

    A torn *last* line (the process died mid-write) is dropped with a warning; a bad line anywhere else
    is real corruption and raises ``ValueError`` naming the file and line. A missing file gives ``[]``.
    """
    file = _metrics_path(path)
    scan = _scan(file)
    if scan.torn:
        warnings.warn(f"{file}: ignoring a torn last line (the run was interrupted mid-write)", stacklevel=2)
    return scan.records


@dataclass
class _Scan:
    records: list[dict[str, Any]]
    offset: int  # bytes covered by complete, newline-terminated lines
    torn: bool = False  # unparseable bytes after the last newline: a kill mid-write
    unterminated: bool = False  # a complete record after the last newline, only the newline missing


def _scan(path: Path) -> _Scan:
    if not path.is_file():
        return _Scan([], 0)
    data = path.read_bytes()
    *complete, tail = data.split(b"\n")  # `tail` is what follows the last newline (b"" if none)
    scan = _Scan([], 0)
    for lineno, line in enumerate(complete, start=1):
        if line.strip():
            record = _parse(line)
            if record is None:
                raise ValueError(f"{path}, line {lineno}: not a JSON metrics record; the file is corrupt")
            scan.records.append(record)
        scan.offset += len(line) + 1
    if tail.strip():
        record = _parse(tail)
        if record is None:
            scan.torn = True
        else:
            scan.records.append(record)
            scan.unterminated = True
    return scan


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)  # numpy scalars, 0-d tensors/arrays
    if callable(item):
        try:
            out = item()
        except (ValueError, RuntimeError) as exc:
            raise ValueError(
                f"metric {key!r} must be a scalar, got an array/tensor with several values"
            ) from exc
        if isinstance(out, numbers.Real):
            return float(out)
    raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__} ({value!r:.60})")


class MetricsLogger:
    """Append metrics to ``run_dir/metrics.jsonl`` and mirror them to the dashboards that are enabled.

    Args:
        run_dir: the run's directory (created if missing).
        tensorboard: also write TensorBoard scalars under ``run_dir/tensorboard``.
        wandb / trackio: also forward to Weights & Biases / trackio when installed (warns if not).
        config: the run's configuration, sent to wandb/trackio (checked for credentials first).
        resume_from_step: drop records with ``step > resume_from_step`` before appending (see module doc).
        project / run_name: names for wandb/trackio.
        fsync: fsync every record (default) so that a hard kill loses at most the record being written.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        trackio: bool = False,
        config: Mapping[str, Any] | None = None,
        resume_from_step: int | None = None,
        project: str = "unipost",
        run_name: str | None = None,
        fsync: bool = True,
    ) -> None:
        if resume_from_step is not None and (
            isinstance(resume_from_step, bool)
            or not isinstance(resume_from_step, int)
            or resume_from_step < 0
        ):
            raise ValueError(f"resume_from_step must be a non-negative int or None, got {resume_from_step!r}")
        if config is not None:
            from unipost.train.checkpoint import check_no_secrets  # lazy: read_metrics needs no torch

            check_no_secrets(config, "config")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.fsync = fsync
        self.backends: list[str] = ["jsonl"]
        self._prepare_file(resume_from_step)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        self._wandb = None
        self._trackio = None
        name = run_name or self.run_dir.name
        try:
            if tensorboard:
                self._open_tensorboard(resume_from_step)
            if wandb:
                self._open_wandb(project, name, config, resume=resume_from_step is not None)
            if trackio:
                self._open_trackio(project, name, config, resume=resume_from_step is not None)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"MetricsLogger({str(self.run_dir)!r}, backends={self.backends})"

    # ------------------------------------------------------------------------------------ set-up

    def _prepare_file(self, resume_from_step: int | None) -> None:
        scan = _scan(self.path)
        if resume_from_step is not None:
            records = scan.records
            keep = [
                r for r in records if not (isinstance(r.get("step"), int) and r["step"] > resume_from_step)
            ]
            dropped = len(records) - len(keep)
            tmp = self.path.with_name(f".{METRICS_FILE}.tmp-{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in keep)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            if dropped or scan.torn:
                log.info(
                    "%s: dropped %d record(s) after step %d on resume", self.path, dropped, resume_from_step
                )
        elif scan.torn or scan.unterminated:
            # Not resuming, but the previous writer died mid-line: cut the torn bytes (or add the missing
            # newline) so the next record starts on its own line and the file stays readable.
            if scan.torn:
                warnings.warn(
                    f"{self.path}: removing a torn last line left by an interrupted run", stacklevel=3
                )
            with open(self.path, "r+b") as fh:
                if scan.torn:
                    fh.truncate(scan.offset)
                else:
                    fh.seek(0, os.SEEK_END)
                    fh.write(b"\n")

    def _open_tensorboard(self, resume_from_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_from_step is None else resume_from_step + 1
        self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)
        self.backends.append("tensorboard")

    def _open_wandb(self, project: str, name: str, config: Mapping[str, Any] | None, *, resume: bool) -> None:
        if not available("wandb"):
            warnings.warn(
                "wandb=True but the 'wandb' package is not installed (pip install wandb); "
                "logging to metrics.jsonl and TensorBoard only",
                stacklevel=3,
            )
            return
        import wandb

        id_file = self.run_dir / _WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self._wandb = wandb.init(
            project=project,
            name=name,
            config=dict(config or {}),
            dir=str(self.run_dir),
            id=run_id,
            resume="allow" if run_id else None,
        )
        if getattr(self._wandb, "id", None):
            id_file.write_text(str(self._wandb.id))
        self.backends.append("wandb")

    def _open_trackio(
        self, project: str, name: str, config: Mapping[str, Any] | None, *, resume: bool
    ) -> None:
        if not available("trackio"):
            warnings.warn(
                "trackio=True but the 'trackio' package is not installed (pip install trackio); "
                "logging to metrics.jsonl and TensorBoard only",
                stacklevel=3,
            )
            return
        import trackio

        self._trackio = trackio
        trackio.init(
            project=project, name=name, config=dict(config or {}), resume="allow" if resume else "never"
        )
        self.backends.append("trackio")

    # ------------------------------------------------------------------------------------ logging

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """Write one record for ``step`` and return it.

        Values must be real numbers (Python, numpy scalars or one-element tensors); NaN/inf are kept
        (they are information: a diverged loss), written as JSON ``NaN``/``Infinity``.
        """
        if self._fh is None:
            raise RuntimeError(f"{self!r} is closed")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
        values: dict[str, float] = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"metric names must be non-empty strings, got {key!r}")
            name = f"{prefix.rstrip('/')}/{key}" if prefix else key
            if name in _RESERVED:
                raise ValueError(f"metric name {name!r} is reserved for the record itself; rename it")
            values[name] = _to_float(name, value)
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, global_step=step)
            self._tb.flush()
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        if self._wandb is not None:
            self._wandb.log(finite, step=step)
        if self._trackio is not None:
            try:
                self._trackio.log(finite, step=step)
            except TypeError:  # older trackio without an explicit step
                self._trackio.log(finite)
        return record

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        if getattr(self, "_fh", None) is not None:
            self._fh.close()
            self._fh = None
        if getattr(self, "_tb", None) is not None:
            self._tb.close()
            self._tb = None
        if getattr(self, "_wandb", None) is not None:
            self._wandb.finish()
            self._wandb = None
        if getattr(self, "_trackio", None) is not None:
            self._trackio.finish()
            self._trackio = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
