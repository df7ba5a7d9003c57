"""Canonical, model-agnostic data model for agent interaction (paper §3.1, App. G).

Messages are OpenAI-style dicts: ``{"role": "system"|"user"|"assistant"|"tool", "content": str,
"tool_calls": [...], "tool_call_id": str, "name": str}``. Rendering into a model's native chat and tool
format happens only when a training batch is built, through that model's own chat template, so one
stored trajectory can train students of different families (paper App. G).

A ``Trajectory`` is the unit of storage: the initial messages (system + issue), then one ``Turn`` per
agent step. Each turn records who executed it (the rollout protocol's indicator z_t of Eq. 8-9), the
executed action, the teacher's label at that state when the recipe queried it (Eq. 10-11: DAgger asks
the teacher at EVERY visited state), the sampled token log-probs the engine saw, and the observation.

The two protocols the rollout engine talks to live here too, at the bottom of the layering, because
both sides use them: ``Environment`` (with ``StepResult``) and ``Policy`` (with ``AgentState`` and
``PolicyOutput``). A scripted expert inside an environment package and the engine above it share
them without the envs layer importing the rollout layer. ``unipost.envs.base`` and
``unipost.rollout.policy`` re-export them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

Message = dict[str, Any]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The directory unipost caches built artefacts under (tokenizers, warm starts, model copies).

    ``cache_dir`` wins, then ``$UNIPOST_CACHE``, then ``~/.cache/unipost``. It lives in the bottom layer
    because both model loading (``models``) and run set-up (``train``) cache there.
    """
    root = Path(cache_dir or os.environ.get("UNIPOST_CACHE") or Path.home() / ".cache" / "unipost")
    root.mkdir(parents=True, exist_ok=True)
    return root


Executor = Literal["teacher", "student"]

FAILURE_MODES = (
    # submitted but unresolved (paper Table 4, left block)
    "wrong_solution",
    "wrong_file",
    "syntax_or_runtime_error",
    # no submission (paper Table 4, right block)
    "tool_use_error",
    "repetitive_loop",
    "context_overflow",
    "budget_exhaustion",
    "no_edit",
)
FailureMode = Literal[
    "wrong_solution",
    "wrong_file",
    "syntax_or_runtime_error",
    "tool_use_error",
    "repetitive_loop",
    "context_overflow",
    "budget_exhaustion",
    "no_edit",
]

TOOL_ERROR_KINDS = (
    "unparseable",  # no valid tool call in the model's text: malformed <tool_call> markup, bad JSON, none
    "unknown_tool",  # a well-formed call to a tool that does not exist
    "invalid_arguments",  # a schema violation: missing required / unexpected / mistyped argument
    "truncated",  # generation hit max_new_tokens before the end-of-turn token (so the call is incomplete)
    "tool_failure",  # a valid call that the tool ran and reported failed (missing path, old_str not found)
    "other",  # anything else (an environment fault, an environment that does not say the kind)
)
"""Why a turn was a tool-use error, recorded where it is detected (policy parser, engine, environment),
so evaluation can say *why* a student fails without anyone reading its trajectories."""


class Turn(BaseModel):
    """One agent step t: state s_t -> executed action a_t -> observation o_t."""

    model_config = ConfigDict(extra="forbid")

    index: int
    executor: Executor
    action: Message  # the executed assistant message (content + tool_calls)
    label: Message | None = None  # teacher's action a*_t at s_t, when queried
    observation: list[Message] = Field(default_factory=list)  # tool / user messages after the action
    action_token_ids: list[int] | None = None  # sampled tokens of a student action (exact re-scoring)
    action_logprobs: list[float] | None = None  # log pi_old of those tokens at sampling time
    teacher_logprobs: list[float] | None = None  # log pi_T of the action's tokens (OPD), when collected
    tool_error: bool = False  # the action's tool call was malformed or invalid
    # which of TOOL_ERROR_KINDS when tool_error (None on turns stored before kinds were recorded)
    tool_error_kind: str | None = None

    @property
    def label_equals_action(self) -> bool:
        """True when imitating the label means imitating what was executed (teacher turns)."""
        return self.label is not None and _same_action(self.label, self.action)


class Outcome(BaseModel):
    """The verifier's verdict on a finished episode; ``failure_mode`` uses paper Table 4's categories."""

    model_config = ConfigDict(extra="forbid")

    resolved: bool = False
    submitted: bool = False
    reward: float = 0.0
    failure_mode: FailureMode | None = None
    detail: str = ""


class Trajectory(BaseModel):
    """A finished episode, the unit of the append-only trajectory store."""

    model_config = ConfigDict(extra="forbid")

    task_id: str
    prompt: list[Message]  # x_0: system + user (issue) messages
    turns: list[Turn] = Field(default_factory=list)
    outcome: Outcome = Field(default_factory=Outcome)
    meta: dict[str, Any] = Field(default_factory=dict)  # iteration, beta, prefix_k, seed, group id, ...

    def context(self, t: int) -> list[Message]:
        """s_t: the messages the agent sees before acting at turn t (executed history only)."""
        messages = list(self.prompt)
        for turn in self.turns[:t]:
            messages.append(turn.action)
            messages.extend(turn.observation)
        return messages

    def messages(self) -> list[Message]:
        """The full executed conversation."""
        return self.context(len(self.turns))

    @property
    def teacher_fraction(self) -> float:
        if not self.turns:
            return 0.0
        return sum(t.executor == "teacher" for t in self.turns) / len(self.turns)


def canonical_call(call: dict[str, Any]) -> tuple[str, str]:
    """``(name, arguments as sorted-key JSON)`` of a tool call, so two calls that differ only in argument
    order or whitespace compare equal (label == action here; expert agreement in evaluation)."""
    import json

    fn = call.get("function", call)
    args = fn.get("arguments", "")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return fn.get("name", ""), args
    return fn.get("name", ""), json.dumps(args, sort_keys=True)


def _same_action(a: Message, b: Message) -> bool:
    if (a.get("content") or "") != (b.get("content") or ""):
        return False
    calls_a = [canonical_call(c) for c in a.get("tool_calls") or []]
    calls_b = [canonical_call(c) for c in b.get("tool_calls") or []]
    return calls_a == calls_b


# --- the Environment protocol -------------------------------------------------------------------------
# Every environment (embedded, OpenHands, SWE-Gym Docker) implements it; the rollout engine only talks to
# this protocol, so the same engine drives the embedded mini-SWE world on a laptop and the paper's
# OpenHands scaffold on a cluster.


@dataclass
class StepResult:
    """What the environment returns after executing one assistant action."""

    observation: list[Message]  # tool messages (role "tool", with tool_call_id), as OpenHands returns them
    done: bool = False  # the agent called `finish` (or the environment ended the episode)
    tool_error: bool = False  # malformed/unknown tool call or invalid arguments
    # environment-specific extras; ``info["tool_error_kind"]`` (one of TOOL_ERROR_KINDS) says why a
    # ``tool_error`` turn failed, set where the environment detected it (an absent kind reads as "other")
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """One episode's world. ``reset`` -> prompt messages; ``step`` per action; ``verify`` at the end."""

    tools: list[dict[str, Any]]  # OpenAI-style JSON tool schemas offered to the model

    def reset(self) -> list[Message]: ...

    def step(self, action: Message) -> StepResult: ...

    def verify(self) -> Outcome: ...

    def close(self) -> None: ...


# --- the Policy protocol ------------------------------------------------------------------------------
# Batched ``act`` for everyone, ``score`` for white-box models. A state carries the canonical messages
# s_t and the tool schemas; scripted experts additionally get the environment handle (they are
# privileged: they may read the workspace and know the ground truth).


@dataclass
class AgentState:
    """What a policy sees before acting at turn ``turn``: s_t, the tools, and (privileged) the world."""

    messages: list[Message]  # s_t: prompt + executed history
    tools: list[dict[str, Any]] = field(default_factory=list)
    env: Environment | None = None  # only privileged (scripted) policies may look at it
    turn: int = 0


@dataclass
class PolicyOutput:
    """One action: the canonical message plus, for white-box policies, the sampled tokens and log-probs."""

    message: Message  # canonical assistant message (content + tool_calls); malformed calls -> tool_error
    token_ids: list[int] | None = None  # sampled tokens (white-box policies)
    logprobs: list[float] | None = None  # log-probs of those tokens at sampling time
    tool_error: str | None = None  # why the raw output did not parse into a valid tool call
    raw: str | None = None  # raw generated text, for debugging
    tool_error_kind: str | None = None  # which of TOOL_ERROR_KINDS ``tool_error`` is (None: unparseable)
    # generation stopped at max_new_tokens, not at the end-of-turn token: a call it left incomplete is
    # a "truncated" tool error, which a longer budget (not more training) fixes
    truncated: bool = False


@runtime_checkable
class Policy(Protocol):
    """Anything that acts on a batch of states: a scripted expert, a local model, vLLM or an API."""

    name: str
    white_box: bool  # can return per-token log-probs of given actions (needed by OPD's score)
    # Optional, not part of the structural check: ``messages_only = True`` declares that act() reads
    # only a state's messages, tools and turn (never ``env``) and answers each state independently of
    # the batch, so the rollout engine may ask for its labels later, from another thread
    # (``unipost.rollout.label_queue``). Absent means False.

    def act(self, states: list[AgentState], *, greedy: bool = False) -> list[PolicyOutput]: ...
