"""The Environment protocol every environment (embedded, OpenHands, SWE-Gym Docker) implements.

The rollout engine only talks to this protocol, so the same engine drives the embedded mini-SWE world
on a laptop and the paper's OpenHands scaffold on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from unipost.data import Message, Outcome


@dataclass
class StepResult:
    """What the environment returns after executing one assistant action."""

    observation: list[Message]  # tool messages (role "tool", with tool_call_id), as OpenHands returns them
    done: bool = False  # the agent called `finish` (or the environment ended the episode)
    tool_error: bool = False  # malformed/unknown tool call or invalid arguments
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """One episode's world. ``reset`` -> prompt messages; ``step`` per action; ``verify`` at the end."""

    tools: list[dict[str, Any]]  # OpenAI-style JSON tool schemas offered to the model

    def reset(self) -> list[Message]: ...

    def step(self, action: Message) -> StepResult: ...

    def verify(self) -> Outcome: ...

    def close(self) -> None: ...
