"""Append-only trajectory store: one finished :class:`~unipost.data.Trajectory` per JSONL line.

Why JSONL with an fsync per record: rollouts are the expensive part of an iteration (minutes to hours
of generation and sandboxed execution). Writing each trajectory the moment it finishes, as one
``write`` of ``json + "\\n"`` followed by ``flush`` and ``os.fsync``, means a crash (OOM kill, pre-empted
node, power loss) loses at most the episodes still in flight, never a finished one.

A crash in the middle of a write leaves a torn LAST line. The loader detects it, keeps every complete
record before it, and reports it (a ``logging`` warning plus ``LoadResult.truncated_tail``) instead of
silently dropping it or refusing to load. A bad line anywhere *else* is not a crash artefact but real
corruption (or a foreign file), so it raises a :class:`StoreCorruptError` naming the file and line.

Reopening a store for appending keeps exactly its longest prefix of valid records: from the first line
that is not a valid record (a torn write, garbage, a record that no longer validates) to the end, the
bytes are *moved* to ``<store>.corrupt`` (appended there, never deleted) with a warning, so garbage is
never counted as records and new records never follow it.

Everything an environment can produce is storable. Text with lone surrogates (undecodable bytes
decoded with ``surrogateescape``, or a lone surrogate in a model's action), which UTF-8 JSON cannot
hold, is written with backslash escapes: a surrogate-escaped byte ``U+DCXX`` becomes the four
characters ``\\xXX`` (the byte it stands for, as ``backslashreplace`` writes it) and any other lone
surrogate becomes ``\\uXXXX``; nothing else changes. A part nested deeper than 64 levels (a hostile
action; no serializer recurses that far) is stored as the string ``<nested deeper than 64 levels: not
stored>``. A trajectory that still cannot be written is *quarantined*: a line with the reason and a bounded,
scrubbed description goes to ``<store>.quarantine.jsonl``, ``append`` returns without raising, and
the collect goes on (``TrajectoryStore.quarantined`` counts them).

The trainer's checkpoint records :meth:`TrajectoryStore.position` and, on resume, calls
:meth:`TrajectoryStore.truncate_to` so the store holds exactly what the checkpoint saw: no torn tail,
no episodes written after the checkpoint (they would otherwise be trained on twice).

Secrets: trajectories carry messages, actions and outcomes, never credentials. Every record goes
through :mod:`unipost._secrets` before it is written: credential-named ``meta`` values (``api_key``,
``authorization``, ``hf_token``, at any depth, in dicts and lists) become ``***``, and in all the text
the values of configured keys (plain and base64), URL passwords, ``Authorization`` headers and
``--api-key``-style argv values are replaced by ``***``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError

from unipost._secrets import scrub, scrub_data
from unipost.data import Trajectory

log = logging.getLogger(__name__)

_SURROGATE = re.compile("[\ud800-\udfff]")


class StoreCorruptError(ValueError):
    """A line that is not the last one does not hold a valid Trajectory."""


class StorePosition(NamedTuple):
    """Where a store ends: ``records`` complete trajectories in the first ``offset`` bytes."""

    records: int
    offset: int


@dataclass
class LoadResult:
    """What :func:`load` read.

    ``truncated_tail``: the last line was torn (a crash mid-write) and was not returned.
    ``bad_lines``: 1-based line numbers that were not returned (the torn tail, and with
    ``strict=False`` corrupt middle lines).
    ``position``: the end of the last complete record (what :meth:`TrajectoryStore.truncate_to` takes).
    """

    trajectories: list[Trajectory]
    truncated_tail: bool = False
    bad_lines: list[int] = field(default_factory=list)
    position: StorePosition = field(default_factory=lambda: StorePosition(0, 0))

    def __len__(self) -> int:
        return len(self.trajectories)


def _parse(line: bytes) -> Trajectory:
    return Trajectory.model_validate_json(line)


def encode(trajectory: Trajectory) -> bytes:
    """One store line for a trajectory: scrubbed of credentials, valid UTF-8 JSON, checked to load back.

    Raises when the trajectory cannot be stored faithfully (the caller quarantines it).
    """
    meta = scrub_data(trajectory.meta)
    if meta != trajectory.meta:
        trajectory = trajectory.model_copy(update={"meta": meta})
    try:
        data = scrub(trajectory.model_dump_json(), named=False).encode("utf-8") + b"\n"
        _parse(data)  # what we write must load back (NaN log-probs, e.g., are written as null)
        return data
    except ValueError:  # lone surrogates, nesting too deep, values JSON cannot hold as pydantic writes them
        pass
    text = json.dumps(_escape_surrogates(trajectory), ensure_ascii=False, default=str)  # NaN stays NaN
    data = scrub(text, named=False).encode("utf-8") + b"\n"  # JSON escapes newlines: one line
    _parse(data)  # still not loadable: the caller quarantines it rather than corrupt the store
    return data


MAX_DEPTH = 64  # containers nested deeper are stored as a marker string (no serializer recurses further)
DEEP_MARKER = "<nested deeper than 64 levels: not stored>"


def _escape_surrogates(data: Any) -> Any:
    """A copy with lone surrogates in every string written as ``\\xXX`` / ``\\uXXXX``, and any
    container nested deeper than ``MAX_DEPTH`` replaced by ``DEEP_MARKER`` (iterative: any depth)."""

    def fix(text: str) -> str:
        def one(m: re.Match[str]) -> str:
            code = ord(m.group())
            return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

        return _SURROGATE.sub(one, text)

    root: list[Any] = [None]
    todo: list[tuple[Any, Any, Any, int]] = [(data, root, 0, 0)]
    while todo:
        value, parent, slot, depth = todo.pop()
        if isinstance(value, BaseModel):  # the models' own fields (Trajectory, Turn, Outcome): plain data
            value = {name: getattr(value, name) for name in type(value).model_fields}
        if isinstance(value, (dict, list, tuple)) and depth >= MAX_DEPTH:
            parent[slot] = DEEP_MARKER
        elif isinstance(value, dict):
            out: dict[Any, Any] = {}
            parent[slot] = out
            for k, v in value.items():
                key = fix(k) if isinstance(k, str) else str(k)
                out[key] = None
                todo.append((v, out, key, depth + 1))
        elif isinstance(value, (list, tuple)):
            items: list[Any] = [None] * len(value)
            parent[slot] = items
            todo.extend((v, items, i, depth + 1) for i, v in enumerate(value))
        else:
            parent[slot] = fix(value) if isinstance(value, str) else value
    return root[0]


def _describe(value: Any, limit: int) -> str:
    """A bounded, scrubbed, storable description of anything (for the quarantine file)."""
    try:
        text = value if isinstance(value, str) else repr(value)
    except Exception as exc:
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    text = text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
    return scrub(text)


def _keep_valid_prefix(path: Path, fsync: bool) -> tuple[int, int]:
    """(records, offset) of the longest run of valid records at the start of ``path``; whatever
    follows (a torn write, garbage, an invalid record, and anything after it) is moved to
    ``<path>.corrupt`` with a warning, never deleted."""
    records = offset = 0
    bad_line: int | None = None
    for lineno, line, _last in _lines(path):
        if not line.strip():
            if not line.endswith(b"\n"):
                bad_line = lineno
                break
            offset += len(line)
            continue
        if not line.endswith(b"\n"):
            bad_line = lineno
            break
        try:
            _parse(line)
        except (ValidationError, ValueError):
            bad_line = lineno
            break
        records += 1
        offset += len(line)
    size = path.stat().st_size
    if size != offset:
        corrupt = path.with_name(path.name + ".corrupt")
        with path.open("rb") as src, corrupt.open("ab") as dst:
            src.seek(offset)
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            if fsync:
                os.fsync(dst.fileno())
        log.warning(
            "%s: from line %s on, %d bytes are not valid records (a torn write, garbage or a foreign "
            "file); they were moved to %s, and the %d valid records before them are kept",
            path,
            bad_line,
            size - offset,
            corrupt,
            records,
        )
        os.truncate(path, offset)
    return records, offset


def _scan(path: Path, *, parse: bool, strict: bool) -> LoadResult:
    """Read ``path`` line by line; the torn-tail rule is shared by :func:`load` and the store's open."""
    result = LoadResult([])
    records = offset = 0
    for lineno, line, last in _lines(path):
        if not line.strip():  # blank lines (e.g. hand-edited files) are skipped, not records
            if line.endswith(b"\n"):
                offset += len(line)
            continue
        complete = line.endswith(b"\n")
        traj: Trajectory | None = None
        error: Exception | None = None
        if parse or last:
            try:
                traj = _parse(line)
            except (ValidationError, ValueError) as exc:
                error = exc
        if last and (error is not None or not complete):
            # A crash mid-write leaves the final record without its newline (or, after a power loss,
            # with garbage): report and keep everything before it.
            result.truncated_tail = True
            result.bad_lines.append(lineno)
            log.warning(
                "%s: line %d is a truncated trailing record (%d bytes, %s); it was not loaded. This is "
                "what a crash mid-write leaves behind; the %d complete records before it are intact.",
                path,
                lineno,
                len(line),
                "no trailing newline" if not complete else f"invalid: {_short(error)}",
                records,
            )
            break
        if error is not None:
            if strict:
                raise StoreCorruptError(
                    f"{path}:{lineno}: not a valid Trajectory record ({_short(error)}). Only the last line "
                    "of a store can be torn by a crash; a bad line in the middle means the file is corrupt "
                    "or not a unipost trajectory store. Use load(path, strict=False) to skip such lines."
                ) from error
            log.warning("%s:%d: skipping corrupt record (%s)", path, lineno, _short(error))
            result.bad_lines.append(lineno)
            offset += len(line)
            continue
        if parse:
            assert traj is not None
            result.trajectories.append(traj)
        records += 1
        offset += len(line)
    result.position = StorePosition(records, offset)
    return result


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(1-based line number, raw line, is it the last line), streamed: stores can be large."""
    with path.open("rb") as fh:
        prev: bytes | None = None
        lineno = 0
        for line in fh:
            if prev is not None:
                yield lineno, prev, False
            prev, lineno = line, lineno + 1
        if prev is not None:
            yield lineno, prev, True


def _short(exc: Exception | None, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) if exc is not None else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load(path: str | os.PathLike[str], *, strict: bool = True) -> LoadResult:
    """Every complete trajectory in a store file, in write order.

    A torn last line is reported (warning + ``truncated_tail``), never fatal. A corrupt line
    elsewhere raises :class:`StoreCorruptError` naming the file and line, or with ``strict=False``
    is skipped and listed in ``bad_lines``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trajectory store at {str(path)!r}")
    return _scan(path, parse=True, strict=strict)


class TrajectoryStore:
    """An append-only JSONL file of finished trajectories, safe against crashes between appends.

    Opening an existing file continues it. If that file ends in a torn record (the previous run
    crashed mid-write), the torn bytes are cut off with a warning, because appending after them
    would turn a reportable torn tail into corruption in the middle of the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.quarantined = 0
        if self.path.exists():
            self._records, self._offset = _keep_valid_prefix(self.path, self.fsync)
        else:
            self._records = self._offset = 0
        self._fh = self.path.open("ab")

    def __repr__(self) -> str:
        return f"TrajectoryStore({str(self.path)!r}, records={self._records})"

    def __len__(self) -> int:
        return self._records

    # -- writing ------------------------------------------------------------------------------------

    def append(self, trajectory: Trajectory) -> StorePosition:
        """Write one finished trajectory and make it durable before returning; returns the new end.

        Never raises for the trajectory's content: one that cannot be stored is quarantined (see the
        module docstring) and the position is returned unchanged.
        """
        if not isinstance(trajectory, Trajectory):
            raise TypeError(f"TrajectoryStore.append takes a Trajectory, got {type(trajectory).__name__}")
        try:
            data = encode(trajectory)
        except Exception as exc:
            self._quarantine(trajectory, exc)
            return self.position()
        with self._lock:
            self._check_open()
            self._fh.write(data)
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
            self._records += 1
            self._offset += len(data)
            return StorePosition(self._records, self._offset)

    @property
    def quarantine_path(self) -> Path:
        return self.path.with_name(self.path.name + ".quarantine.jsonl")

    def _quarantine(self, trajectory: Trajectory, exc: BaseException) -> None:
        reason = scrub(f"{type(exc).__name__}: {exc}")[:2000]
        record = {
            "time": time.time(),
            "task_id": _describe(getattr(trajectory, "task_id", None), 500),
            "reason": reason,
            "turns": len(getattr(trajectory, "turns", []) or []),
            "trajectory": _describe(trajectory, 100_000),
        }
        line = json.dumps(record, ensure_ascii=True) + "\n"
        with self._lock:
            with self.quarantine_path.open("a", encoding="ascii") as fh:
                fh.write(line)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            self.quarantined += 1
        log.warning(
            "%s: trajectory %s could not be stored (%s); quarantined to %s",
            self.path,
            record["task_id"],
            reason[:200],
            self.quarantine_path,
        )

    def extend(self, trajectories: Iterable[Trajectory]) -> StorePosition:
        """Append several, each made durable on its own (a crash keeps every earlier one)."""
        position = self.position()
        for trajectory in trajectories:
            position = self.append(trajectory)
        return position

    # -- positions ----------------------------------------------------------------------------------

    def position(self) -> StorePosition:
        """The end of the last complete record: record it in a checkpoint, restore with ``truncate_to``."""
        return StorePosition(self._records, self._offset)

    def truncate_to(self, position: StorePosition | tuple[int, int]) -> None:
        """Cut the store back to ``position`` (from :meth:`position`): drops later records and torn bytes.

        Checks that ``position`` really is a record boundary of this file, so a checkpoint from a
        different run cannot silently cut a record in half.
        """
        records, offset = StorePosition(*position)
        with self._lock:
            self._check_open()
            self._fh.flush()
            size = self.path.stat().st_size
            if offset < 0 or records < 0 or offset > size:
                raise ValueError(
                    f"{self.path}: cannot truncate to {StorePosition(records, offset)}: the file has only "
                    f"{size} bytes (was the checkpoint taken with a different store?)"
                )
            head = _scan_prefix(self.path, offset)
            if head != records:
                raise ValueError(
                    f"{self.path}: position {StorePosition(records, offset)} is not a record boundary of "
                    f"this file (the first {offset} bytes hold {head} complete records)"
                )
            self._fh.close()
            os.truncate(self.path, offset)
            self._fh = self.path.open("ab")
            if self.fsync:
                os.fsync(self._fh.fileno())
            self._records, self._offset = records, offset

    # -- reading / lifecycle ------------------------------------------------------------------------

    def load(self, *, strict: bool = True) -> LoadResult:
        """Everything written so far (see :func:`load`)."""
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
        return load(self.path, strict=strict)

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._fh.closed:
            raise ValueError(f"TrajectoryStore({str(self.path)!r}) is closed")


def _scan_prefix(path: Path, offset: int) -> int:
    """Number of complete (non-blank) records in the first ``offset`` bytes; -1 if not on a boundary."""
    records, seen = 0, 0
    with path.open("rb") as fh:
        for line in fh:
            if seen + len(line) > offset:
                return -1 if seen != offset else records
            seen += len(line)
            records += bool(line.strip())
            if seen == offset:
                return records if line.endswith(b"\n") else -1
    return records if seen == offset else -1
