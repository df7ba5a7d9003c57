"""OpenHands-style tools: JSON schemas, argument validation, and their execution on a workspace.

Names, parameter names, types, enums and required fields are those of openhands-tools 1.58.0
(``openhands_tool_schemas.json`` is a verbatim copy of the SDK's schemas), so a policy trained here
speaks the paper's scaffold's action space. The model is offered *compact* descriptions by default: the
real ones are ~4k characters each, too much for tiny models' contexts; ``full=True`` gives the originals.

Observations follow OpenHands' wording (``cat -n`` views, "No replacement was performed, ..." errors,
the ``[The command completed with exit code N.]`` trailer), so traces look like the paper's.
``file_editor`` runs on the host but only on paths that resolve inside the workspace; ``terminal``
commands run in the :mod:`sandbox`.
"""

from __future__ import annotations

import copy
import json
import secrets
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from unipost.envs.embedded.sandbox import WORKSPACE, Sandbox

TOOL_ALIASES = {"execute_bash": "terminal", "str_replace_editor": "file_editor"}
EDITOR_COMMANDS = ("view", "create", "str_replace", "insert", "undo_edit")
SNIPPET_LINES = 4
CLIPPED_NOTE = (
    "<response clipped><NOTE>Due to the max output limit, only part of this file has been shown to you. "
    "You should retry this tool after you have searched inside the file with `grep -n` in order to find "
    "the line numbers of what you are looking for.</NOTE>"
)

_COMPACT_DESCRIPTIONS = {
    "terminal": "Execute a bash command in the terminal (the cwd persists). Long output is truncated.",
    "file_editor": "View, create and edit files. `view` shows a file with `cat -n` line numbers or lists a "
    "directory; `str_replace` replaces an exact, unique `old_str` with `new_str`; `insert` adds "
    "`new_str` after line `insert_line`; `undo_edit` reverts the last edit. Absolute paths only.",
    "finish": "Signal that the task is complete.",
    "think": "Log a thought; no effect on the repository.",
}
_COMPACT_PARAMS = {
    "security_risk": "Security risk of the action.",
    "summary": "A ~10-word summary of the action.",
    "command": None,  # per tool below
    "is_input": "If true, send the command as input to the running process.",
    "timeout": "Optional time limit in seconds.",
    "reset": "If true, start a fresh terminal session.",
    "path": "Absolute path to a file or directory.",
    "file_text": "Content of the file to `create`.",
    "old_str": "Exact text to replace (`str_replace`).",
    "new_str": "Replacement text (`str_replace`) or text to insert (`insert`).",
    "insert_line": "Insert `new_str` after this line (`insert`).",
    "view_range": "Optional [start, end] lines for `view`; end -1 means to the end of the file.",
    "message": "Final message to the user.",
    "thought": "The thought to log.",
}


@cache
def _full_schemas() -> dict[str, dict[str, Any]]:
    text = resources.files("unipost.envs.embedded").joinpath("openhands_tool_schemas.json").read_text()
    return json.loads(text)


def tool_schemas(full: bool = False) -> list[dict[str, Any]]:
    """The four tools as OpenAI-style schemas; ``full`` keeps OpenHands' original descriptions."""
    schemas = copy.deepcopy(_full_schemas())
    out = []
    for name in ("terminal", "file_editor", "think", "finish"):
        schema = schemas[name]
        if not full:
            fn = schema["function"]
            fn["description"] = _COMPACT_DESCRIPTIONS[name]
            for pname, prop in fn["parameters"]["properties"].items():
                if pname == "command":
                    prop["description"] = (
                        "The bash command to run." if name == "terminal" else "One of the editor commands."
                    )
                else:
                    prop["description"] = _COMPACT_PARAMS[pname]
        out.append(schema)
    return out


class ToolError(Exception):
    """Bad tool call or arguments: becomes an error observation and ``StepResult.tool_error``."""


@dataclass
class ToolCall:
    id: str
    name: str  # canonical name (aliases resolved)
    arguments: dict[str, Any]


def parse_tool_call(call: Any) -> ToolCall:
    """Validate one OpenAI-style tool call against the schemas (names, required params, types, enums)."""
    if not isinstance(call, dict):
        raise ToolError(f"Tool call must be an object, got {type(call).__name__}.")
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    call_id = str(call.get("id") or "call_0")
    if not isinstance(name, str) or not name:
        raise ToolError("Tool call has no function name.")
    canonical = TOOL_ALIASES.get(name, name)
    schemas = _full_schemas()
    if canonical not in schemas:
        raise ToolError(f"Tool {name!r} does not exist. Available tools: {', '.join(schemas)}.")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolError(
                f"Failed to parse tool call arguments as JSON: {exc}. Arguments: {args[:200]}"
            ) from exc
    if not isinstance(args, dict):
        raise ToolError(f"Tool call arguments must be a JSON object, got {type(args).__name__}.")
    params = schemas[canonical]["function"]["parameters"]
    for req in params.get("required", []):
        if req not in args:
            raise ToolError(f"Missing required argument {req!r} for tool {canonical!r}.")
    types = {"string": str, "boolean": bool, "integer": int, "number": (int, float), "array": list}
    for key, value in args.items():
        prop = params["properties"].get(key)
        if prop is None:
            raise ToolError(f"Unexpected argument {key!r} for tool {canonical!r}.")
        want = types.get(prop.get("type"))
        if value is not None and want is not None and not isinstance(value, want):
            raise ToolError(f"Argument {key!r} of tool {canonical!r} must be of type {prop['type']}.")
        if "enum" in prop and value not in prop["enum"]:
            raise ToolError(
                f"Invalid value {value!r} for argument {key!r}; allowed values: {', '.join(prop['enum'])}."
            )
    return ToolCall(call_id, canonical, args)


def truncate_middle(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = max(limit // 2, 1)
    return text[:half] + "\n[... Observation truncated due to length ...]\n" + text[-half:]


def numbered(text: str, start: int = 1) -> str:
    return "\n".join(f"{i:6}\t{line}" for i, line in enumerate(text.split("\n"), start))


@dataclass
class FileEditor:
    """OpenHands' ``file_editor`` on a host directory presented as ``/testbed``."""

    root: Path
    max_chars: int = 12_000
    sandbox: Sandbox | None = None  # to hand ownership of written files to the sandbox uid
    history: dict[str, list[str]] = field(default_factory=dict)

    def __call__(self, args: dict[str, Any]) -> str:
        command, path = args["command"], args["path"]
        host = self.resolve(path)
        if command == "view":
            return self.view(path, host, args.get("view_range"))
        if command == "create":
            if args.get("file_text") is None:
                raise ToolError("Parameter `file_text` is required for command: create.")
            if host.exists():
                raise ToolError(
                    f"Invalid `path` parameter: {path}. File already exists at: {path}. "
                    "Cannot overwrite files using command `create`."
                )
            self.write(host, args["file_text"], path)
            return f"File created successfully at: {path}"
        if not host.is_file():
            raise ToolError(
                f"Invalid `path` parameter: {path}. The path {path} does not exist or is not a file. "
                "Please provide a valid path."
            )
        if command == "str_replace":
            return self.str_replace(path, host, args.get("old_str"), args.get("new_str"))
        if command == "insert":
            return self.insert(path, host, args.get("insert_line"), args.get("new_str"))
        if command == "undo_edit":
            stack = self.history.get(path)
            if not stack:
                raise ToolError(f"No edit history found for {path}.")
            host.write_text(stack.pop())
            return f"Last edit to {path} undone successfully. {self._snippet_all(path, host)}"
        raise ToolError(f"Unrecognized command {command}. Allowed commands: {', '.join(EDITOR_COMMANDS)}.")

    def resolve(self, path: str) -> Path:
        """Map an absolute /testbed path to the host; refuse anything that resolves outside it."""
        if not isinstance(path, str) or not path.startswith("/"):
            raise ToolError(
                f"Invalid `path` parameter: {path}. The path should be an absolute path, starting with `/`."
            )
        if not (path == WORKSPACE or path.startswith(WORKSPACE + "/")):
            raise ToolError(
                f"Invalid `path` parameter: {path}. Only paths inside {WORKSPACE} can be accessed."
            )
        rel = path[len(WORKSPACE) :].lstrip("/")
        root = self.root.resolve()
        host = (root / rel).resolve()  # follows symlinks: a link to /etc/passwd resolves outside root
        if host != root and root not in host.parents:
            raise ToolError(
                f"Invalid `path` parameter: {path}. Only paths inside {WORKSPACE} can be accessed."
            )
        return host

    def display(self, host: Path) -> str:
        rel = host.relative_to(self.root.resolve()).as_posix()
        return WORKSPACE if rel == "." else f"{WORKSPACE}/{rel}"

    def view(self, path: str, host: Path, view_range: Any) -> str:
        if host.is_dir():
            if view_range:
                raise ToolError(
                    "The `view_range` parameter is not allowed when `path` points to a directory."
                )
            lines = [self.display(host) + "/"]
            for child in sorted(self._walk(host, 2)):
                lines.append(self.display(child) + ("/" if child.is_dir() else ""))
            text = "\n".join(lines)
            return (
                f"Here's the files and directories up to 2 levels deep in {path}, excluding hidden items:\n"
                f"{self._clip(text)}"
            )
        if not host.exists():
            raise ToolError(
                f"Invalid `path` parameter: {path}. The path {path} does not exist. "
                "Please provide a valid path."
            )
        content = self.read(host)
        lines = content.split("\n")
        start = 1
        if view_range:
            if len(view_range) != 2 or not all(isinstance(i, int) for i in view_range):
                raise ToolError("Invalid `view_range` parameter. It should be a list of two integers.")
            start, end = view_range
            n = len(lines)
            if not 1 <= start <= n:
                raise ToolError(
                    f"Invalid `view_range` parameter: {view_range}. Its first element `{start}` should be "
                    f"within the range of lines of the file: [1, {n}]."
                )
            if end != -1 and not start <= end <= n:
                raise ToolError(
                    f"Invalid `view_range` parameter: {view_range}. Its second element `{end}` should be "
                    f"-1 or within [{start}, {n}]."
                )
            lines = lines[start - 1 :] if end == -1 else lines[start - 1 : end]
        body = self._clip(numbered("\n".join(lines), start))
        return f"Here's the result of running `cat -n` on {path}:\n{body}\n"

    def str_replace(self, path: str, host: Path, old: Any, new: Any) -> str:
        if old is None:
            raise ToolError("Parameter `old_str` is required for command: str_replace.")
        new = "" if new is None else new
        content = self.read(host)
        count = content.count(old) if old else 0
        if count == 0:
            raise ToolError(
                f"No replacement was performed, old_str `{old}` did not appear verbatim in {path}."
            )
        if count > 1:
            lines = [i + 1 for i, line in enumerate(content.split("\n")) if old.split("\n")[0] in line]
            raise ToolError(
                f"No replacement was performed. Multiple occurrences of old_str `{old}` in lines {lines}. "
                "Please ensure it is unique."
            )
        if new == old:
            raise ToolError("No replacement was performed. `new_str` and `old_str` must be different.")
        at = content.index(old)
        self._push(path, content)
        self.write(host, content.replace(old, new, 1), path)
        first = content[:at].count("\n")
        snippet = self._snippet(host, first - SNIPPET_LINES, first + SNIPPET_LINES + new.count("\n"))
        return (
            f"The file {path} has been edited. Here's the result of running `cat -n` on a snippet of "
            f"{path}:\n{snippet}\nReview the changes and make sure they are as expected. "
            "Edit the file again if necessary."
        )

    def insert(self, path: str, host: Path, line: Any, new: Any) -> str:
        if line is None:
            raise ToolError("Parameter `insert_line` is required for command: insert.")
        if new is None:
            raise ToolError("Parameter `new_str` is required for command: insert.")
        content = self.read(host)
        lines = content.split("\n") if content else []
        if not 0 <= line <= len(lines):
            raise ToolError(
                f"Invalid `insert_line` parameter: {line}. It should be within the range of allowed values: "
                f"[0, {len(lines)}]"
            )
        new_lines = new.split("\n")
        self._push(path, content)
        self.write(host, "\n".join(lines[:line] + new_lines + lines[line:]), path)
        snippet = self._snippet(host, line - SNIPPET_LINES, line + len(new_lines) + SNIPPET_LINES - 1)
        return (
            f"The file {path} has been edited. Here's the result of running `cat -n` on a snippet of the "
            f"edited file:\n{snippet}\nReview the changes and make sure they are as expected (correct "
            "indentation, no duplicate lines, etc). Edit the file again if necessary."
        )

    # -- helpers ------------------------------------------------------------------------------------
    def read(self, host: Path) -> str:
        try:
            return host.read_text()
        except UnicodeDecodeError as exc:
            raise ToolError(f"Cannot open {self.display(host)}: not a UTF-8 text file.") from exc

    def write(self, host: Path, text: str, path: str) -> None:
        root = self.root.resolve()
        new_dirs = [p for p in host.parents if p != root and root in p.parents and not p.exists()]
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_text(text)
        if self.sandbox is not None:  # the sandboxed uid must be able to modify what the editor wrote
            for p in [*new_dirs, host]:
                self.sandbox.fix_ownership(p)

    def _push(self, path: str, content: str) -> None:
        self.history.setdefault(path, []).append(content)

    def _snippet(self, host: Path, lo: int, hi: int) -> str:
        lines = self.read(host).split("\n")
        lo = max(lo, 0)
        return numbered("\n".join(lines[lo : hi + 1]), lo + 1)

    def _snippet_all(self, path: str, host: Path) -> str:
        return f"Here's the result of running `cat -n` on {path}:\n{self._clip(numbered(self.read(host)))}\n"

    def _clip(self, text: str) -> str:
        return text if len(text) <= self.max_chars else text[: self.max_chars] + CLIPPED_NOTE

    def _walk(self, base: Path, depth: int):
        for child in base.iterdir():
            if child.name.startswith(".") or child.name == "__pycache__":
                continue
            yield child
            if child.is_dir() and depth > 1 and not child.is_symlink():
                yield from self._walk(child, depth - 1)


@dataclass
class Terminal:
    """OpenHands' ``terminal``: one command per call; the working directory persists between calls."""

    sandbox: Sandbox
    max_chars: int = 12_000
    cwd: str = WORKSPACE

    def __call__(self, args: dict[str, Any]) -> tuple[str, int]:
        if args.get("reset"):
            self.cwd = WORKSPACE
            return "Terminal session has been reset.", 0
        if args.get("is_input"):
            raise ToolError("No previous running command to interact with.")
        command = args["command"]
        if not command.strip():
            raise ToolError("No previous running command to retrieve logs from.")
        marker = f"__UNIPOST_CWD_{secrets.token_hex(6)}__"
        script = f'{command}\n__rc=$?\nprintf "\\n{marker}%s\\n" "$PWD"\nexit $__rc'
        timeout = args.get("timeout")
        result = self.sandbox.run(script, cwd=self.cwd, timeout_s=float(timeout) if timeout else None)
        out = result.output
        if marker in out:
            out, _, tail = out.rpartition(marker)
            cwd = tail.strip().splitlines()[0] if tail.strip() else self.cwd
            if cwd == WORKSPACE or cwd.startswith(WORKSPACE + "/"):
                self.cwd = cwd
            out = out[:-1] if out.endswith("\n") else out
        out = truncate_middle(out.rstrip("\n"), self.max_chars)
        if result.timed_out:
            limit = float(timeout) if timeout else self.sandbox.limits.timeout_s
            return f"{out}\n[The command timed out after {limit:g} seconds and was killed.]", -1
        return f"{out}\n[The command completed with exit code {result.exit_code}.]", result.exit_code
