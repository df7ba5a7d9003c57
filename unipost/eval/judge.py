"""An optional LLM judge of failure modes (paper §4.5): one primary Table-4 mode per unresolved episode.

The paper: "Following SWE-Agent [40], we use Claude Opus 4.7 as an LLM judge to assign one primary
failure mode to each unresolved trajectory on SWE-Bench Verified, separating failures into
submitted-but-unresolved and no-submission cases." :class:`FailureJudge` does that over any
OpenAI-compatible chat endpoint (a vLLM server, a gateway in front of Claude): the episode's block is
decided by the verifier (did it submit?), the judge picks one of that block's categories, with the
categories' definitions in its prompt. Answers outside the block are refused, never guessed.

The rule-based classifier of each environment (``Outcome.failure_mode``) stays the default: the judge
costs one call per unresolved episode and needs an endpoint. Its verdicts are cached per trajectory
(a hash of the judge model and the exact prompt) in a JSONL file, so re-evaluating a run, or a crash
mid-way, never pays for an episode twice. :meth:`FailureJudge.relabel` returns copies whose
``failure_mode`` is the judge's (the rule's kept in ``meta['rule_failure_mode']``), ready for
:meth:`~unipost.eval.evaluate.EvalResult.from_trajectories` and the Table-4 report.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from unipost._secrets import scrub
from unipost.data import Trajectory
from unipost.eval.evaluate import NO_SUBMISSION_MODES, SUBMITTED_UNRESOLVED_MODES

MODE_DEFINITIONS: dict[str, str] = {
    "wrong_solution": "the patch edits the right place but the fix is incorrect or incomplete",
    "wrong_file": "the patch misses the code that needed changing (wrong file or function localised)",
    "syntax_or_runtime_error": "the patch breaks the code: it does not parse, import or run",
    "tool_use_error": "the agent failed because its tool calls were malformed or misused",
    "repetitive_loop": "the agent repeated the same actions without making progress",
    "context_overflow": "the episode ended because the interaction outgrew the context window",
    "budget_exhaustion": "the agent made progress but ran out of turns before submitting",
    "no_edit": "the agent never changed the repository (no attempt at a fix)",
}
"""What each paper Table-4 category means, as the judge is told."""


class JudgeError(RuntimeError):
    """The judge endpoint failed, or answered with no category of the episode's block."""


def _block(trajectory: Trajectory) -> tuple[str, tuple[str, ...]]:
    if trajectory.outcome.submitted:
        return "submitted a patch, but the patch does not resolve the issue", SUBMITTED_UNRESOLVED_MODES
    return "ended without submitting a patch", NO_SUBMISSION_MODES


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - limit} characters omitted ...]\n{text[-half:]}"


def render_episode(trajectory: Trajectory, *, max_chars: int = 60_000, per_message: int = 4_000) -> str:
    """The episode as the judge reads it: the task, every action and observation, the outcome."""
    parts = []
    for message in trajectory.messages():
        body = str(message.get("content") or "")
        for call in message.get("tool_calls") or []:
            fn = call.get("function", {})
            body += f"\n[tool call] {fn.get('name')}({fn.get('arguments')})"
        parts.append(f"## {message.get('role')}\n{_clip(body, per_message)}")
    outcome = trajectory.outcome
    ended = trajectory.meta.get("ended_by")
    parts.append(
        f"## outcome\nsubmitted: {bool(outcome.submitted)}; resolved: {bool(outcome.resolved)}; "
        f"turns: {len(trajectory.turns)}; ended by: {ended or 'the agent'}\n"
        f"final patch / verifier detail:\n{_clip(str(outcome.detail or ''), per_message)}"
    )
    return _clip("\n\n".join(parts), max_chars)


def judge_messages(trajectory: Trajectory, *, max_chars: int = 60_000) -> list[dict[str, str]]:
    """The chat request for one unresolved episode: its block's categories and the episode."""
    what, modes = _block(trajectory)
    categories = "\n".join(f"- {m}: {MODE_DEFINITIONS[m]}" for m in modes)
    system = (
        "You analyse failed runs of a software-engineering agent, as in SWE-agent's failure analysis. "
        f"This episode {what}. Assign exactly ONE primary failure mode from this list:\n{categories}\n"
        'Answer with JSON only: {"failure_mode": "<one of the names above>", "reason": "<one sentence>"}.'
    )
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": render_episode(trajectory, max_chars=max_chars)},
    ]


def parse_mode(text: str, allowed: Sequence[str]) -> str | None:
    """The category in a judge's answer: the JSON field if present, else the one allowed name it mentions."""
    match = re.search(r"\{.*\}", text, flags=re.S)
    if match:
        try:
            value = json.loads(match.group(0)).get("failure_mode")
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, str):
            return value.strip() if value.strip() in allowed else None
    named = {m for m in allowed if re.search(rf"\b{re.escape(m)}\b", text)}
    return named.pop() if len(named) == 1 else None


class FailureJudge:
    """One primary failure mode per unresolved episode from an LLM over an OpenAI-compatible endpoint.

    Args:
        base_url: the endpoint (``.../v1`` is appended when missing).
        model: the judge model's name at that endpoint.
        api_key_env: environment variable holding the key (never stored, scrubbed from errors).
        cache_path: JSONL cache of verdicts, keyed by (model, prompt) hash; None = in memory only.
        timeout_s, max_retries: per request; transport errors and 5xx are retried with backoff.
        max_chars: the rendered episode is clipped in the middle to this many characters.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "UNIPOST_JUDGE_API_KEY",
        cache_path: str | Path | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        max_chars: int = 60_000,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_chars = max_chars
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.cache_path is not None and self.cache_path.exists():
            for line in self.cache_path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self._cache[record["key"]] = record["failure_mode"]

    def __repr__(self) -> str:
        return f"FailureJudge({self.base_url!r}, {self.model!r})"

    def _key(self, messages: list[dict[str, str]]) -> str:
        blob = json.dumps({"model": self.model, "messages": messages}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def classify(self, trajectory: Trajectory) -> str | None:
        """The judge's primary failure mode for ``trajectory``; None for a resolved one (not judged)."""
        if trajectory.outcome.resolved:
            return None
        _, allowed = _block(trajectory)
        messages = judge_messages(trajectory, max_chars=self.max_chars)
        key = self._key(messages)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        answer = self._complete(messages)
        mode = parse_mode(answer, allowed)
        if mode is None:
            raise JudgeError(
                f"{self!r} answered {answer[:200]!r} for {trajectory.task_id!r}: no single category of "
                f"its block ({', '.join(allowed)})"
            )
        with self._lock:
            self._cache[key] = mode
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a") as fh:
                    fh.write(
                        json.dumps({"key": key, "task_id": trajectory.task_id, "failure_mode": mode}) + "\n"
                    )
        return mode

    def relabel(self, trajectories: Sequence[Trajectory]) -> list[Trajectory]:
        """Copies of ``trajectories`` whose unresolved outcomes carry the judge's failure mode."""
        out = []
        for traj in trajectories:
            mode = self.classify(traj)
            if mode is None:
                out.append(traj)
                continue
            copy = traj.model_copy(deep=True)
            copy.meta["rule_failure_mode"] = traj.outcome.failure_mode
            copy.outcome.failure_mode = mode  # type: ignore[assignment]  # checked against the block
            out.append(copy)
        return out

    def _complete(self, messages: list[dict[str, str]]) -> str:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": 0.0,
            "max_tokens": 512,
        }
        error = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)))
            try:
                response = httpx.post(
                    f"{self.base_url}/chat/completions", json=body, headers=headers, timeout=self.timeout_s
                )
            except httpx.TransportError as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code >= 500 or response.status_code == 429:
                error = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise JudgeError(scrub(f"{self!r}: HTTP {response.status_code}: {response.text[:300]}"))
            try:
                return str(response.json()["choices"][0]["message"]["content"] or "")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise JudgeError(f"{self!r}: not a chat completion: {response.text[:200]!r}") from exc
        raise JudgeError(scrub(f"{self!r} did not answer after {self.max_retries + 1} tries: {error}"))
