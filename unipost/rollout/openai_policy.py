"""A black-box policy for any OpenAI-compatible chat endpoint (``vllm serve``, SGLang, hosted APIs).

DAgger and AggreVaTe need only the teacher's *actions* (paper §3.3), so the teacher can be a served
model behind ``POST /v1/chat/completions`` with OpenAI function calling. This policy sends canonical
messages and tool schemas, runs up to ``concurrency`` requests at once from a thread pool, retries
connection errors, timeouts, 5xx and 429 with exponential backoff, and raises a clear
:class:`TeacherUnavailableError` when the endpoint stays down: a DAgger run whose teacher silently
vanished would train on nothing. ``check()`` lets a trainer fail at start-up instead of mid-iteration.

The API key comes from the argument or the environment (``UNIPOST_TEACHER_API_KEY``, then
``OPENAI_API_KEY``). It is held as a ``pydantic.SecretStr``, sent only in the Authorization header, and
never appears in ``repr``, ``config()`` (what a run saves), log records or exception messages: any
text we raise or log is scrubbed of it, even when a server echoes it back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from pydantic import SecretStr

from unipost._secrets import register_secret, scrub
from unipost.data import Message
from unipost.rendering.toolcalls import ToolCallStyle, call_error, make_tool_call, parse_assistant
from unipost.rollout.policy import AgentState, PolicyOutput

logger = logging.getLogger(__name__)

DEFAULT_KEY_ENVS = ("UNIPOST_TEACHER_API_KEY", "OPENAI_API_KEY")
_WIRE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")
_CONTEXT_ERROR = re.compile(
    r"context length|context window|maximum context|too many tokens|prompt is too long", re.I
)


class TeacherUnavailableError(RuntimeError):
    """The endpoint did not answer (connection refused, timeouts, 5xx, 429) after all retries."""


class TeacherRequestError(RuntimeError):
    """The endpoint answered with a non-retryable error (bad request, auth, unknown model, bad JSON)."""


class OpenAIChatPolicy:
    """Teacher (or student) behind an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000`` or ``http://host:8000/v1`` (``/v1`` is added if absent).
        model: the served model name (``vllm serve MODEL --served-model-name NAME``).
        api_key: the key; None reads ``api_key_env`` and then ``OPENAI_API_KEY``; none at all sends no
            Authorization header (a local ``vllm serve`` without ``--api-key``).
        concurrency: requests in flight at once (one thread each).
        timeout_s: per-request timeout (connect, read, write).
        max_retries: retries after the first try (so ``max_retries + 1`` tries in all).
        backoff_s, max_backoff_s: wait ``backoff_s * 2**k`` (capped) before retry k + 1.
        temperature, top_p, max_tokens: sampling parameters (``greedy=True`` sends temperature 0).
        style: the tool-call text format to parse when a server returns calls as raw text instead of
            ``tool_calls`` (a vLLM started without ``--tool-call-parser``); XML is recognised anyway.
        max_calls, require_call: the same action rules as a student's (``parse_assistant``).
        extra_body: extra request fields (e.g. ``{"chat_template_kwargs": {"enable_thinking": False}}``).
    """

    white_box = False
    # Each answer is a function of the state's messages, tools and turn alone (one HTTP request per
    # state, its own retries): the rollout engine may ask for DAgger's labels later, off the tick's
    # critical path (unipost.rollout.label_queue).
    messages_only = True

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str = DEFAULT_KEY_ENVS[0],
        concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 1024,
        name: str = "teacher",
        style: ToolCallStyle = "hermes",
        max_calls: int | None = 1,
        require_call: bool = False,
        extra_body: dict[str, Any] | None = None,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self.api_key_env = api_key_env
        key = api_key
        for env in (api_key_env, *DEFAULT_KEY_ENVS):
            key = key or os.environ.get(env) or None
        self._api_key = SecretStr(key) if key else None
        register_secret(key)  # so stores, checkpoints and logs scrub it wherever it shows up
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.name = name
        self.style: ToolCallStyle = style
        self.max_calls = max_calls
        self.require_call = require_call
        self.extra_body = dict(extra_body or {})
        self._client = httpx.Client(
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- what may be shown, saved and logged ------------------------------------------------------

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return (
            f"OpenAIChatPolicy(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key=<{key}>, concurrency={self.concurrency})"
        )

    def config(self) -> dict[str, Any]:
        """The settings a run may save and reproduce: everything but the key (only where to find it)."""
        return {
            "kind": "openai_chat",
            "base_url": self.base_url,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "concurrency": self.concurrency,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
            "backoff_s": self.backoff_s,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "style": self.style,
            "max_calls": self.max_calls,
            "require_call": self.require_call,
            "extra_body": self.extra_body,
        }

    def _scrub(self, text: str) -> str:
        # the shared scrubber: the key plain and base64-encoded, Authorization headers, URL userinfo
        extra = {self._api_key.get_secret_value()} if self._api_key else set()
        return scrub(text, extra)

    def _headers(self) -> dict[str, str]:
        if self._api_key is None:
            return {}
        return {"Authorization": f"Bearer {self._api_key.get_secret_value()}"}

    # -- transport --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """One request with retries; returns a response with status < 400 or a non-retryable 4xx."""
        url = self.base_url + path
        tries = self.max_retries + 1
        last = "no attempt made"
        for attempt in range(tries):
            if attempt:
                wait = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
                logger.warning(
                    "teacher %s: %s; retry %d/%d in %.2f s",
                    url,
                    self._scrub(last),
                    attempt,
                    self.max_retries,
                    wait,
                )
                time.sleep(wait)
            try:
                response = self._client.request(method, url, json=body, headers=self._headers())
            except httpx.TransportError as exc:  # connection refused/reset, DNS, timeouts
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            return response
        raise TeacherUnavailableError(
            self._scrub(f"teacher endpoint {url} did not answer after {tries} tries: {last}")
        ) from None

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise TeacherRequestError(
                self._scrub(
                    f"teacher endpoint {response.request.url} returned non-JSON: {response.text[:300]!r}"
                )
            )
        return data

    # -- public -----------------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Fail fast at start-up: the endpoint answers and serves ``model``. Returns the served ids."""
        response = self._request("GET", "/models")
        if response.status_code >= 400:
            raise TeacherRequestError(
                self._scrub(f"teacher endpoint {self.base_url}/models answered HTTP {response.status_code}: ")
                + self._scrub(response.text[:300])
            )
        served = [m.get("id") for m in self._json(response).get("data", []) if isinstance(m, dict)]
        if served and self.model not in served:
            raise TeacherRequestError(
                f"model {self.model!r} is not served by {self.base_url} "
                f"(served: {', '.join(map(str, served))})"
            )
        return served

    ping = check

    def act(self, states: list[AgentState], *, greedy: bool = False) -> list[PolicyOutput]:
        """One assistant turn per state, up to ``concurrency`` requests in flight; order is kept."""
        if not states:
            return []
        if len(states) == 1 or self.concurrency == 1:
            return [self._act_one(s, greedy) for s in states]
        return list(self._executor().map(lambda s: self._act_one(s, greedy), states))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._client.close()

    def __enter__(self) -> OpenAIChatPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"unipost-{self.name}")
            return self._pool

    def request_body(self, state: AgentState, *, greedy: bool = False) -> dict[str, Any]:
        """The JSON sent for one state (canonical messages are already OpenAI wire format)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [_wire_message(m) for m in state.messages],
            "max_tokens": self.max_tokens,
            "temperature": 0.0 if greedy else self.temperature,
            "top_p": 1.0 if greedy else self.top_p,
        }
        if state.tools:
            body["tools"] = list(state.tools)
        body.update(self.extra_body)
        return body

    def _act_one(self, state: AgentState, greedy: bool) -> PolicyOutput:
        response = self._request("POST", "/chat/completions", self.request_body(state, greedy=greedy))
        if response.status_code >= 400:
            text = self._scrub(response.text[:500])
            if response.status_code == 400 and _CONTEXT_ERROR.search(text):
                return PolicyOutput(
                    {"role": "assistant", "content": ""}, tool_error="context_overflow", raw=text
                )
            raise TeacherRequestError(
                f"teacher endpoint {self.base_url}/chat/completions answered "
                f"HTTP {response.status_code}: {text}"
            )
        data = self._json(response)
        try:
            message = data["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise TeacherRequestError(
                self._scrub(f"teacher response has no choices[0].message: {json.dumps(data)[:300]}")
            ) from None
        output = self._to_output(message, state)
        # the server stopped at max_tokens: an incomplete call is a "truncated" tool error, not a bad one
        output.truncated = data["choices"][0].get("finish_reason") == "length"
        return output

    def _to_output(self, message: dict[str, Any], state: AgentState) -> PolicyOutput:
        content = message.get("content") or ""
        wire_calls = message.get("tool_calls") or []
        tools = state.tools or None
        if not wire_calls:
            # a server without a tool-call parser returns the calls as text: parse them like a student's
            style = "qwen3_coder" if "<function=" in content else self.style
            parsed = parse_assistant(
                content,
                style,
                tools=tools,
                max_calls=self.max_calls,
                require_call=self.require_call,
                id_prefix=f"call_t{state.turn}",
            )
            out = dict(parsed.message)
            if message.get("reasoning_content"):
                out["reasoning_content"] = message["reasoning_content"]
            return PolicyOutput(out, tool_error=parsed.error, raw=content, tool_error_kind=parsed.kind)
        calls, ids = [], []
        for i, call in enumerate(wire_calls, start=1):
            fn = call.get("function") or {}
            name, args = fn.get("name"), fn.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError as exc:
                    error = (
                        f"tool call {i} ({name}): arguments are not valid JSON ({exc.msg}): {args[:160]!r}"
                    )
                    return self._failed(content, wire_calls, error)
            if not isinstance(name, str) or not isinstance(args, dict):
                return self._failed(content, wire_calls, f"tool call {i}: needs a name and object arguments")
            calls.append((name, args))
            ids.append(call.get("id") or f"call_t{state.turn}_{i - 1}")
        problem = call_error(calls, tools, max_calls=self.max_calls)
        if problem is not None:
            return self._failed(content, wire_calls, *problem)
        out: Message = {
            "role": "assistant",
            "content": content,
            "tool_calls": [make_tool_call(n, a, cid) for (n, a), cid in zip(calls, ids, strict=True)],
        }
        if message.get("reasoning_content"):
            out["reasoning_content"] = message["reasoning_content"]
        return PolicyOutput(out, raw=content)

    @staticmethod
    def _failed(
        content: str, wire_calls: Sequence[dict[str, Any]], error: str, kind: str = "unparseable"
    ) -> PolicyOutput:
        raw = content + ("\n" if content else "") + json.dumps(wire_calls, ensure_ascii=False)
        return PolicyOutput(
            {"role": "assistant", "content": raw}, tool_error=error, raw=raw, tool_error_kind=kind
        )


def _wire_message(message: Message) -> dict[str, Any]:
    """Only the standard OpenAI message fields (servers may reject unknown ones)."""
    out = {k: message[k] for k in _WIRE_KEYS if k in message}
    if out.get("tool_calls"):
        calls = []
        for call in out["tool_calls"]:
            fn = dict(call.get("function", {}))
            if not isinstance(fn.get("arguments"), str):
                fn["arguments"] = json.dumps(fn.get("arguments") or {}, ensure_ascii=False)
            calls.append({"id": call.get("id"), "type": "function", "function": fn})
        out["tool_calls"] = calls
    return out
