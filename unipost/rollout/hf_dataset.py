"""Trajectories to and from a Hugging Face ``datasets.Dataset`` in the ecosystem's chat format.

One row per trajectory, with the columns other tools read (TRL's ``SFTTrainer``, the hub's agent
datasets):

- ``messages``: the executed conversation as OpenAI-style messages (``role``, ``content``,
  ``tool_calls`` with JSON-string ``arguments``, ``tool_call_id``, ``name``);
- ``tools``: the OpenAI-style JSON tool schemas the agent was offered (when given);
- ``task_id``, ``resolved``, ``submitted``, ``reward``: the episode's identity and verdict;
- ``unipost_trajectory`` (``lossless=True``, the default): the trajectory's own JSON, so a
  unipost -> dataset -> unipost round trip is exact (executor of each turn, teacher labels, sampled
  token ids and log-probs, meta).

:func:`from_hf_dataset` reads either kind of row. With the exact copy it returns it; without it (data
from elsewhere, or that column dropped) every assistant message becomes a teacher-executed turn
whose observation is the messages up to the next assistant message, the messages before the first
assistant message are the prompt, and the verdict comes from the columns above (unverified when they
are absent: train such data with ``SFT(rejection_sampling=False)``). Write the trajectories to a
:class:`~unipost.rollout.store.TrajectoryStore` and ``OfflineData(path)`` trains on them through the
same batch path as the Trainer's own rollouts.

Arrow stores a column of dicts as one struct type, filling keys a row lacks with ``None``; reading back,
dict entries that are ``None`` are dropped (so a tool schema's explicit ``"default": null`` does not
survive the lossy path). ``datasets`` is imported only when these functions are called.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from unipost.data import Message, Outcome, Trajectory, Turn

LOSSLESS_COLUMN = "unipost_trajectory"
_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


def to_hf_dataset(
    trajectories: Iterable[Trajectory],
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    lossless: bool = True,
) -> Any:
    """A ``datasets.Dataset`` with one row per trajectory (columns in the module docstring).

    Args:
        trajectories: finished trajectories (e.g. ``TrajectoryStore.load().trajectories``).
        tools: the tool schemas the episodes were run with (a trajectory does not carry them); every
            row gets the same list. None leaves the ``tools`` column out.
        lossless: add the ``unipost_trajectory`` column for an exact round trip.
    """
    from datasets import Dataset

    rows = []
    for t in trajectories:
        if not isinstance(t, Trajectory):
            raise TypeError(f"to_hf_dataset takes Trajectory objects, got {type(t).__name__}")
        row: dict[str, Any] = {
            "messages": [_wire_message(m) for m in t.messages()],
            "task_id": t.task_id,
            "resolved": t.outcome.resolved,
            "submitted": t.outcome.submitted,
            "reward": float(t.outcome.reward),
        }
        if tools is not None:
            row["tools"] = [dict(schema) for schema in tools]
        if lossless:
            row[LOSSLESS_COLUMN] = t.model_dump_json()
        rows.append(row)
    if not rows:
        raise ValueError("to_hf_dataset needs at least one trajectory (an empty dataset has no columns)")
    return Dataset.from_list(rows)


def from_hf_dataset(dataset: Any, *, lossless: bool = True) -> list[Trajectory]:
    """Trajectories from a dataset with a ``messages`` column (and optionally the others above).

    ``lossless=False`` ignores an ``unipost_trajectory`` column and rebuilds every trajectory from its
    messages, as for data from elsewhere.
    """
    columns = set(getattr(dataset, "column_names", None) or [])
    if "messages" not in columns and LOSSLESS_COLUMN not in columns:
        raise ValueError(
            f"the dataset has no 'messages' column (columns: {sorted(columns)}); unipost reads OpenAI-style "
            "chat rows: messages=[{'role': ..., 'content': ..., 'tool_calls': [...]}, ...]"
        )
    out = []
    for i, row in enumerate(dataset):
        if lossless and row.get(LOSSLESS_COLUMN):
            out.append(Trajectory.model_validate_json(row[LOSSLESS_COLUMN]))
        else:
            out.append(_trajectory_from_row(row, i))
    return out


def _wire_message(message: Message) -> Message:
    """A canonical message in the OpenAI wire shape: known keys only, JSON-string tool arguments."""
    out = {k: message[k] for k in _MESSAGE_KEYS if k in message}
    if message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            fn = call.get("function", call)
            args = fn.get("arguments", "{}")
            wire = {"type": "function", **{k: v for k, v in call.items() if k != "function"}}
            wire["function"] = {
                "name": fn.get("name", ""),
                "arguments": args if isinstance(args, str) else json.dumps(args),
            }
            calls.append(wire)
        out["tool_calls"] = calls
    return out


def _drop_none(value: Any) -> Any:
    """Undo Arrow's struct unification: dict entries that are None were absent in the source row."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _trajectory_from_row(row: dict[str, Any], index: int) -> Trajectory:
    messages = [_drop_none(m) for m in row.get("messages") or []]
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"row {index}: message role must be system/user/assistant/tool, got {m!r:.120}")
        if m.get("role") == "assistant" and "content" not in m:
            m["content"] = ""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    turns: list[Turn] = []
    for m in messages[first:]:
        if m["role"] == "assistant":
            turns.append(Turn(index=len(turns), executor="teacher", action=m))
        else:
            turns[-1].observation.append(m)
    outcome = Outcome(
        resolved=bool(row.get("resolved") or False),
        submitted=bool(row.get("submitted") or False),
        reward=float(row.get("reward") or 0.0),
    )
    meta: dict[str, Any] = {"source": "hf_dataset", "row": index}
    if row.get("tools"):
        meta["tools"] = _drop_none(row["tools"])
    return Trajectory(
        task_id=str(row.get("task_id") or f"row-{index}"),
        prompt=messages[:first],
        turns=turns,
        outcome=outcome,
        meta=meta,
    )
