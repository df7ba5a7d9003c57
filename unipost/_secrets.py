"""One credential scrubber for everything unipost writes or raises: stores, checkpoints, metrics, logs.

Why one module: the store and the checkpoint manager used to have their own, different checks, and
each missed what the other caught (keys inside lists, URL userinfo, ``--api-key`` in a saved argv, an
``Authorization`` header in an echoed error, a key a server sent back base64-encoded). Everything
that leaves the process goes through the two functions here:

- :func:`check_no_secrets` refuses (``ValueError``, naming the key path) a structure that *holds* a
  credential: a credential-named key with a non-empty string value (``api_key``, ``hf_token``,
  ``Authorization``; not ``eos_token`` or ``api_key_env``), at any depth of dicts and lists, or a
  string that carries one (URL userinfo, an ``Authorization`` header, an ``--api-key`` flag, a
  configured key's value). Used where the caller can fix its input: checkpoint state, run configs.
- :func:`scrub` / :func:`scrub_data` replace every credential they find in text with ``***``: the
  values of configured keys (registered with :func:`register_secret`, and secret-named environment
  variables such as ``OPENAI_API_KEY``), also base64-encoded at any alignment, URL passwords,
  ``Authorization`` header values, ``--api-key``/``--token``/``--password`` argv values. Used where
  the text is not ours to refuse: trajectories, error messages, log lines.

Nothing here imports from the rest of unipost (it is the bottom layer), and it never recurses: the
walks are iterative, so a hostile structure nested 100,000 levels deep cannot crash them.
"""

from __future__ import annotations

import base64
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
MIN_SECRET_CHARS = 8  # shorter values are not treated as secrets (they would redact ordinary words)

# A key is a credential when one of its words is one of these (``openai_api_key``, ``db_password``,
# ``client_secret``, ``Authorization``) ...
_SECRET_WORDS = {
    "apikey",
    "password",
    "passwd",
    "secret",
    "authorization",
    "bearer",
    "credential",
    "credentials",
    "cookie",
}
# ... or it is a ``token`` that is not a tokenizer's special token or a count (``pad_token``,
# ``eos_token``, ``max_tokens`` are configuration, not secrets; ``token``, ``hf_token``,
# ``access_token`` are).
_SPECIAL_TOKEN_PREFIXES = {
    "pad",
    "eos",
    "bos",
    "unk",
    "sep",
    "cls",
    "mask",
    "start",
    "end",
    "stop",
    "special",
}
# A key that *names where* a secret lives (``api_key_env="OPENAI_API_KEY"``, ``token_file``) is not one.
_REFERENCE_SUFFIXES = {"env", "var", "envvar", "variable", "file", "path", "name"}


def _key_words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    words = [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]
    # "api_key" / "api-key" / "apiKey" all become one word so they match "apikey".
    merged: list[str] = []
    for word in words:
        if word == "key" and merged and merged[-1] == "api":
            merged[-1] = "apikey"
        else:
            merged.append(word)
    return merged


def looks_like_secret(key: str) -> bool:
    """Whether a dict key / variable / flag name names a credential (see the module docstring)."""
    words = _key_words(key)
    if len(words) > 1 and words[-1] in _REFERENCE_SUFFIXES:
        return False
    if any(w in _SECRET_WORDS for w in words):
        return True
    for i, word in enumerate(words):
        if word == "token" and not (i > 0 and words[i - 1] in _SPECIAL_TOKEN_PREFIXES):
            return True
    return False


# -------------------------------------------------------------------------------------- known values
_registered: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember a configured credential so that :func:`scrub` removes its value wherever it appears."""
    if value and len(value) >= MIN_SECRET_CHARS:
        with _lock:
            _registered.add(value)


def known_secrets() -> set[str]:
    """Registered credentials plus the values of secret-named environment variables."""
    found = {v for k, v in os.environ.items() if len(v) >= MIN_SECRET_CHARS and looks_like_secret(k)}
    with _lock:
        return found | _registered


def _base64_cores(secret: str) -> set[str]:
    """Substrings present in ANY base64 (standard or url-safe) encoding of a text containing ``secret``.

    A secret inside a larger blob (``base64("user:" + key)``) is encoded differently depending on its
    offset modulo 3; for each of the three offsets we keep the characters that depend on the secret's
    bytes only.
    """
    raw = secret.encode("utf-8", "surrogatepass")
    cores = set()
    for k in range(3):
        enc = base64.b64encode(b"\0" * k + raw).decode()
        # character j holds bits [6j, 6j + 6); keep those entirely inside the secret's bits
        first = -(-8 * k // 6)
        last = (8 * (k + len(raw)) - 6) // 6
        core = enc[first : last + 1]
        if len(core) >= MIN_SECRET_CHARS:
            cores.add(core)
            cores.add(core.replace("+", "-").replace("/", "_"))
    return cores


# -------------------------------------------------------------------------------------- text patterns
# Character classes stop at quotes and backslashes, so scrubbing JSON text keeps it valid JSON.
_VALUE = r"[^\s\"'\\,;&<>]+"
_PATTERNS = [
    # scheme://user:password@host  ->  scheme://user:***@host
    (re.compile(r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:\"'\\]*:)[^\s/@\"'\\]+(?=@)"), None),
    # Authorization: Bearer xyz / "authorization": "Basic xyz" / Proxy-Authorization
    (
        re.compile(
            r"(?P<keep>(?i:authorization)[\"']?\s*[:=]\s*[\"']?(?:(?i:bearer|basic|token|digest)\s+)?)"
            + _VALUE
        ),
        None,
    ),
    # Bearer xyz on its own (an echoed header value)
    (re.compile(r"(?P<keep>\b(?i:bearer)\s+)" + _VALUE), None),
    # argv flags: --api-key xyz, --api_key=xyz, --token xyz, --password=xyz, -p? (no: too broad)
    (
        re.compile(
            r"(?P<keep>--?(?i:[a-z0-9_-]*(?:api[_-]?key|token|password|passwd|secret|credentials?))"
            r"(?:=|\s+))(?!-)" + _VALUE
        ),
        None,
    ),
    # key=value / "key": "value" pairs whose key names a credential (api_key=..., "hf_token": "...")
    (
        re.compile(
            r"(?P<keep>[\"']?(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)[\"']?\s*(?:=|:)\s*[\"']?)"
            r"(?P<value>[^\s\"'\\,;&<>]{" + str(MIN_SECRET_CHARS) + r",})"
        ),
        "named",
    ),
]


# an argv flag on its own (its value is the next argv item): ["--api-key", "sk-..."]
_FLAG_ONLY = re.compile(r"--?(?i:[a-z0-9_-]*(?:api[_-]?key|token|password|passwd|secret|credentials?))")


def _flag_values(items: list[Any] | tuple[Any, ...]) -> set[int]:
    """Indices of list items that are the value of a preceding credential flag (a saved argv)."""
    return {
        i + 1
        for i, item in enumerate(items[:-1])
        if isinstance(item, str) and _FLAG_ONLY.fullmatch(item) and isinstance(items[i + 1], str)
    }


def scrub(text: str, extra: set[str] | None = None, *, named: bool = True) -> str:
    """``text`` with every credential it carries replaced by ``***`` (see the module docstring).

    ``named=False`` leaves ``password = ...``-style assignments alone: in a trajectory they are usually
    code the agent read or wrote (training data), not a credential of ours; known key values, URL
    userinfo, Authorization headers and argv flags are still removed.
    """
    if not text:
        return text
    for pattern, kind in _PATTERNS:
        if kind == "named" and not named:
            continue
        if kind == "named":

            def named(m: re.Match[str]) -> str:
                if looks_like_secret(m.group("name")):
                    return m.group("keep") + REDACTED
                return m.group(0)

            text = pattern.sub(named, text)
        else:
            text = pattern.sub(lambda m: m.group("keep") + REDACTED, text)
    for secret in sorted(known_secrets() | (extra or set()), key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
        for core in _base64_cores(secret):
            if core in text:
                text = text.replace(core, REDACTED)
    return text


def scrub_data(data: Any, *, named: bool = True) -> Any:
    """A copy of a JSON-like structure with credential-named values and every string scrubbed.

    Iterative (no recursion), so any depth is fine; non-container leaves other than str pass through.
    ``named`` is passed to :func:`scrub` for the strings.
    """
    secrets = known_secrets()
    root: list[Any] = [None]
    todo: list[tuple[Any, Any, Any]] = [(data, root, 0)]
    while todo:
        value, parent, slot = todo.pop()
        if isinstance(value, Mapping):
            out: dict[Any, Any] = {}
            parent[slot] = out
            for k, v in value.items():
                if looks_like_secret(str(k)) and isinstance(v, (str, bytes)) and v:
                    out[k] = REDACTED
                else:
                    out[k] = None
                    todo.append((v, out, k))
        elif isinstance(value, (list, tuple)):
            items: list[Any] = [None] * len(value)
            parent[slot] = items
            flagged = _flag_values(value)
            for i, v in enumerate(value):
                if i in flagged:
                    items[i] = REDACTED
                else:
                    todo.append((v, items, i))
        elif isinstance(value, str):
            parent[slot] = scrub(value, secrets, named=named)
        else:
            parent[slot] = value
    return root[0]


def find_secret(data: Any, where: str = "state") -> str | None:
    """The key path of the first credential held by ``data`` (see :func:`check_no_secrets`), or None."""
    secrets = known_secrets()
    todo: list[tuple[Any, str]] = [(data, where)]
    while todo:
        value, path = todo.pop()
        if isinstance(value, Mapping):
            for k, v in value.items():
                sub = f"{path}[{k!r}]"
                if looks_like_secret(str(k)) and isinstance(v, (str, bytes)) and len(v) > 0:
                    return sub
                todo.append((v, sub))
        elif isinstance(value, (list, tuple)):
            flagged = _flag_values(value)
            if flagged:
                return f"{path}[{min(flagged)}]"
            todo.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, str) and value and scrub(value, secrets) != value:
            return path
    return None


def check_no_secrets(data: Any, where: str = "state") -> None:
    """Raise ``ValueError`` if ``data`` holds a credential (a credential-named key with a non-empty
    string value, or a string carrying one), naming the full key path so the caller knows what to
    remove. Nested dicts and lists are searched without recursion."""
    path = find_secret(data, where)
    if path is not None:
        raise ValueError(
            f"refusing to write {path}: it looks like a credential (api key / token / password / "
            "secret, URL userinfo, Authorization header or --api-key flag) and credentials must never "
            "be written to checkpoints, stores or logs; remove it or set it to None (read secrets from "
            "the environment instead)"
        )
