"""The Policy protocol: batched ``act`` for everyone, ``score`` for white-box models.

A state carries the canonical messages s_t and the tool schemas; scripted experts additionally get the
environment handle (they are privileged: they may read the workspace and know the ground truth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from unipost.data import Message

if TYPE_CHECKING:
    from unipost.envs.base import Environment


@dataclass
class AgentState:
    messages: list[Message]  # s_t: prompt + executed history
    tools: list[dict[str, Any]] = field(default_factory=list)
    env: Environment | None = None  # only privileged (scripted) policies may look at it
    turn: int = 0


@dataclass
class PolicyOutput:
    message: Message  # canonical assistant message (content + tool_calls); malformed calls -> tool_error
    token_ids: list[int] | None = None  # sampled tokens (white-box policies)
    logprobs: list[float] | None = None  # log-probs of those tokens at sampling time
    tool_error: str | None = None  # why the raw output did not parse into a valid tool call
    raw: str | None = None  # raw generated text, for debugging


@runtime_checkable
class Policy(Protocol):
    name: str
    white_box: bool  # can return per-token log-probs of given actions (needed by OPD's score)

    def act(self, states: list[AgentState], *, greedy: bool = False) -> list[PolicyOutput]: ...
