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

import contextlib
import copy
import errno
import itertools
import json
import math
import os
import secrets
import stat
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from unipost.envs.embedded.sandbox import MAX_TIMEOUT_FACTOR, WORKSPACE, Limits, Sandbox, workspace_usage
from unipost.rendering.toolcalls import loads_bounded

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
    """Bad tool call or arguments: becomes an error observation and ``StepResult.tool_error``.

    ``kind`` (one of ``unipost.data.TOOL_ERROR_KINDS``) is set by the subclasses below where the raise
    site knows it; None lets the environment decide by where it was raised: while validating the call
    against its schema (``invalid_arguments``) or while the tool ran (``tool_failure``).
    """

    kind: str | None = None


class UnknownToolError(ToolError):
    """The call names a tool that does not exist."""

    kind = "unknown_tool"


class InvalidArgumentsError(ToolError):
    """The arguments are wrong whatever the workspace holds (a missing per-command parameter, a
    relative path, a malformed range): the model's call is at fault, not the world it acts on."""

    kind = "invalid_arguments"


@dataclass
class ToolCall:
    id: str
    name: str  # canonical name (aliases resolved)
    arguments: dict[str, Any]


MAX_STRING_CHARS = 1_000_000  # any one string argument (a file's text, old_str/new_str)
MAX_COMMAND_CHARS = 100_000  # a terminal command (the kernel refuses argv strings over 128 KiB)
MAX_PATH_CHARS = 4096
MAX_ARGUMENT_JSON_CHARS = 4_000_000  # the whole JSON text of one call's arguments
MAX_JSON_DEPTH = 32  # the schemas are flat: nothing legitimate nests deeper than 2
_STRING_LIMITS = {"command": MAX_COMMAND_CHARS, "path": MAX_PATH_CHARS}
_JSON_TYPES: dict[str, Any] = {"string": str, "boolean": bool, "integer": int, "number": (int, float)}


def _type_ok(value: Any, want: str) -> bool:
    """JSON-schema type check; ``True`` is not an integer and NaN/inf are not numbers here."""
    if want in ("integer", "number") and isinstance(value, bool):
        return False
    if want == "number" and isinstance(value, float) and not math.isfinite(value):
        return False
    if want == "array":
        return isinstance(value, list)
    py = _JSON_TYPES.get(want)
    return py is None or isinstance(value, py)


def has_surrogates(text: str) -> bool:
    """Lone surrogates (undecodable bytes smuggled into text) cannot be written as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_tool_call(call: Any) -> ToolCall:
    """Validate one OpenAI-style tool call against its schema before anything acts on it.

    Names, required params, types (``True`` is not an integer, NaN and inf are not numbers), enums,
    array item types and sizes (string lengths, total argument size, JSON nesting depth, checked
    without recursion) are all checked here, so every malformed call becomes a :class:`ToolError`
    observation rather than an exception deeper in a tool.
    """
    if not isinstance(call, dict):
        raise ToolError(f"Tool call must be an object, got {type(call).__name__}.")
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    call_id = call_id_of(call, 0)
    if not isinstance(name, str) or not name:
        raise ToolError("Tool call has no function name.")
    canonical = TOOL_ALIASES.get(name, name)
    schemas = _full_schemas()
    if canonical not in schemas:
        raise UnknownToolError(f"Tool {name[:100]!r} does not exist. Available tools: {', '.join(schemas)}.")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        if len(args) > MAX_ARGUMENT_JSON_CHARS:
            raise ToolError(f"Tool call arguments are too long ({len(args)} characters).")
        try:
            args = loads_bounded(args, MAX_JSON_DEPTH) if args.strip() else {}
        except ValueError as exc:
            raise ToolError(
                f"Failed to parse tool call arguments as JSON: {exc}. Arguments: {args[:200]}"
            ) from exc
    if not isinstance(args, dict):
        raise ToolError(f"Tool call arguments must be a JSON object, got {type(args).__name__}.")
    params = schemas[canonical]["function"]["parameters"]
    for req in params.get("required", []):
        if args.get(req) is None:
            raise ToolError(f"Missing required argument {req!r} for tool {canonical!r}.")
    for key, value in args.items():
        prop = params["properties"].get(key) if isinstance(key, str) else None
        if prop is None:
            raise ToolError(f"Unexpected argument {str(key)[:100]!r} for tool {canonical!r}.")
        if value is None:  # an optional argument given as null means "not given"
            continue
        want = prop.get("type")
        if not _type_ok(value, want):
            raise ToolError(f"Argument {key!r} of tool {canonical!r} must be of type {want}.")
        if isinstance(value, str):
            limit = _STRING_LIMITS.get(key, MAX_STRING_CHARS)
            if len(value) > limit:
                raise ToolError(f"Argument {key!r} is too long ({len(value)} characters; at most {limit}).")
            if has_surrogates(value) or (key == "path" and "\x00" in value):
                raise ToolError(f"Argument {key!r} is not valid text (undecodable or NUL characters).")
        if want == "array":
            item = (prop.get("items") or {}).get("type")
            if len(value) > 16 or (item and not all(_type_ok(v, item) for v in value)):
                raise ToolError(f"Argument {key!r} of tool {canonical!r} must be a short array of {item}.")
        if "enum" in prop and value not in prop["enum"]:
            raise ToolError(
                f"Invalid value {str(value)[:100]!r} for argument {key!r}; "
                f"allowed values: {', '.join(prop['enum'])}."
            )
    return ToolCall(call_id, canonical, args)


def call_id_of(call: Any, i: int) -> str:
    """The call's id when it is a short string, else a positional one (an id is echoed back)."""
    cid = call.get("id") if isinstance(call, dict) else None
    if isinstance(cid, str) and cid and len(cid) <= 200 and not has_surrogates(cid):
        return cid
    return f"call_{i}"


def truncate_middle(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = max(limit // 2, 1)
    return text[:half] + "\n[... Observation truncated due to length ...]\n" + text[-half:]


def numbered(text: str, start: int = 1) -> str:
    return "\n".join(f"{i:6}\t{line}" for i, line in enumerate(text.split("\n"), start))


_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINK_HOPS = 40  # as the kernel's own limit on symlinks followed in one lookup
_OUTSIDE = "Invalid `path` parameter: {path}. Only paths inside " + WORKSPACE + " can be accessed."


def _display_name(name: str) -> str:
    """A directory entry's name as text: undecodable bytes become ``\\xNN`` escapes, never surrogates."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class FileEditor:
    """OpenHands' ``file_editor`` on a host directory presented as ``/testbed``.

    Every path is opened one component at a time from a descriptor of the workspace root, with
    ``O_NOFOLLOW``: the kernel never follows a symlink for us. Links are resolved here, component by
    component, and only ever inside the workspace (an absolute target must name ``/testbed``; ``..``
    never climbs above the root), so a command that swaps a file for a symlink to a host path, even
    racing with the editor (e.g. a ``renameat2(RENAME_EXCHANGE)`` loop left running), can at worst
    make a call fail: it cannot redirect a read or a write outside the workspace. Only regular files
    are read or written (a FIFO or device never blocks the host), and a file with several hard links
    is not written. Messages name ``/testbed`` paths only.
    """

    root: Path
    max_chars: int = 12_000
    sandbox: Sandbox | None = None  # to hand ownership of written files to the sandbox uid
    owner_uid: int | None = None  # or to this uid (a container's agent user); None: the sandbox's
    # undo history per file (keyed by the normalised /testbed path, so ``/testbed/./a`` is ``/testbed/a``),
    # at most HISTORY_DEPTH entries per file and ``max_history_chars`` in all (oldest dropped first): it is
    # host memory, and an agent can name one 8 MiB file under thousands of spellings in one turn
    history: dict[str, list[str]] = field(default_factory=dict)
    max_file_bytes: int = 8 << 20  # the largest file the editor reads or writes (as Limits.file_bytes)
    max_history_chars: int = 0  # 0: 4 x max_file_bytes
    # the workspace bound (Limits.workspace_bytes / workspace_inodes): the editor writes on the host, so
    # it checks the bound itself before each write, as the copy-out does after each command
    max_workspace_bytes: int = Limits.workspace_bytes
    max_workspace_inodes: int = Limits.workspace_inodes
    _new_entries: int = field(default=0, repr=False)  # entries a write may still create (create_dirs)

    def __post_init__(self) -> None:
        if self.sandbox is not None:
            self.max_file_bytes = self.sandbox.limits.file_bytes
            self.max_workspace_bytes = self.sandbox.limits.workspace_bytes
            self.max_workspace_inodes = self.sandbox.limits.workspace_inodes
        if self.max_history_chars <= 0:
            self.max_history_chars = 4 * self.max_file_bytes
        self._history_seq: dict[str, list[int]] = {}  # push order of each history entry (for eviction)
        self._history_chars = 0
        self._history_count = itertools.count()

    def __call__(self, args: dict[str, Any]) -> str:
        command, path = args["command"], args["path"]
        parts = self.resolve(path)
        try:
            return self._dispatch(command, path, parts, args)
        except OSError as exc:  # never echo a host path: name the agent's own path and the reason
            reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            raise ToolError(f"Cannot access {path}: {reason}.") from None

    def _dispatch(self, command: str, path: str, parts: list[str], args: dict[str, Any]) -> str:
        if command == "view":
            return self.view(path, parts, args.get("view_range"))
        if command == "create":
            if args.get("file_text") is None:
                raise InvalidArgumentsError("Parameter `file_text` is required for command: create.")
            self.create(path, parts, args["file_text"])
            return f"File created successfully at: {path}"
        if command == "str_replace":
            return self.str_replace(path, parts, args.get("old_str"), args.get("new_str"))
        if command == "insert":
            return self.insert(path, parts, args.get("insert_line"), args.get("new_str"))
        if command == "undo_edit":
            self.read(path, parts)  # the path must still be a regular file inside the workspace
            stack = self.history.get(_history_key(parts))
            if not stack:
                raise ToolError(f"No edit history found for {path}.")
            previous = stack.pop()
            if self._history_seq.get(_history_key(parts)):
                self._history_seq[_history_key(parts)].pop()
            self._history_chars = max(self._history_chars - len(previous), 0)
            self.write(path, parts, previous)
            return f"Last edit to {path} undone successfully. {self._snippet_all(path, previous)}"
        raise InvalidArgumentsError(
            f"Unrecognized command {command}. Allowed commands: {', '.join(EDITOR_COMMANDS)}."
        )

    # -- paths --------------------------------------------------------------------------------------
    def resolve(self, path: str) -> list[str]:
        """The components of an absolute /testbed path below the root; refuse anything outside it.

        Lexical only (``..`` is applied to the text); symlinks are resolved later, by :meth:`_open`.
        """
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidArgumentsError(
                f"Invalid `path` parameter: {path}. The path should be an absolute path, starting with `/`."
            )
        if "\x00" in path:
            raise InvalidArgumentsError(f"Invalid `path` parameter: {path!r}. It contains a NUL character.")
        parts = _normalise(path.split("/"))
        if parts is None or parts[:1] != [WORKSPACE.strip("/")]:
            raise ToolError(_OUTSIDE.format(path=path))
        return parts[1:]

    def _walk_to(self, path: str, parts: list[str], *, create_dirs: bool = False) -> tuple[int, str]:
        """(descriptor of the directory holding the last component, its name), links resolved inside.

        The caller owns the returned descriptor. ``parts == []`` (the root itself) gives (root, ".").
        """
        stack = [os.open(self.root, _O_DIR)]
        todo = list(parts)
        hops = 0
        try:
            while todo:
                comp = todo.pop(0)
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if len(stack) == 1:
                        raise ToolError(_OUTSIDE.format(path=path))
                    os.close(stack.pop())
                    continue
                try:
                    st = os.stat(comp, dir_fd=stack[-1], follow_symlinks=False)
                except FileNotFoundError:
                    if not todo:  # a missing last component: the caller decides (create, or an error)
                        return stack.pop(), comp
                    if not create_dirs:
                        raise ToolError(
                            f"Invalid `path` parameter: {path}. The path {path} does not exist. "
                            "Please provide a valid path."
                        ) from None
                    if self._new_entries <= 1:  # keep one for the file itself
                        raise ToolError(self._over_bound(path)) from None
                    self._new_entries -= 1
                    os.mkdir(comp, 0o755, dir_fd=stack[-1])
                    self._give(comp, stack[-1])
                    st = os.stat(comp, dir_fd=stack[-1], follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > _MAX_LINK_HOPS:
                        raise ToolError(
                            f"Invalid `path` parameter: {path}. Too many levels of symbolic links."
                        )
                    target = os.readlink(comp, dir_fd=stack[-1])
                    if target.startswith("/"):
                        inside = _normalise(target.split("/"))
                        if inside is None or inside[:1] != [WORKSPACE.strip("/")]:
                            raise ToolError(_OUTSIDE.format(path=path))
                        while len(stack) > 1:
                            os.close(stack.pop())
                        todo = inside[1:] + todo
                    else:
                        todo = target.split("/") + todo
                    continue
                if not todo:
                    return stack.pop(), comp
                try:
                    stack.append(os.open(comp, _O_DIR, dir_fd=stack[-1]))
                except OSError as exc:  # swapped for a link or a file since the stat: refuse, never follow
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise ToolError(
                            f"Invalid `path` parameter: {path}. A component of it is not a directory."
                        ) from None
                    raise
            return stack.pop(), "."
        finally:
            for fd in stack:
                os.close(fd)

    def _open(self, path: str, parts: list[str], flags: int, *, create_dirs: bool = False, mode: int = 0o644):
        """An fd for ``path`` opened with ``flags | O_NOFOLLOW | O_NONBLOCK`` relative to its parent."""
        parent, name = self._walk_to(path, parts, create_dirs=create_dirs)
        try:
            if name == ".":
                return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
            try:
                fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=parent)
            except FileNotFoundError:
                raise ToolError(
                    f"Invalid `path` parameter: {path}. The path {path} does not exist. "
                    "Please provide a valid path."
                ) from None
            except FileExistsError:
                raise ToolError(
                    f"Invalid `path` parameter: {path}. File already exists at: {path}. "
                    "Cannot overwrite files using command `create`."
                ) from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # became a link after we looked: refuse
                    raise ToolError(
                        f"Invalid `path` parameter: {path}. It changed while being opened."
                    ) from None
                if exc.errno == errno.EISDIR:
                    raise ToolError(
                        f"Invalid `path` parameter: {path}. The path {path} is a directory."
                    ) from None
                raise
            if flags & os.O_CREAT:
                self._give(fd, None)
            return fd
        finally:
            os.close(parent)

    def _give(self, target: int | str, dir_fd: int | None) -> None:
        """Hand what the editor created (as root) to the sandbox uid, so commands can modify it."""
        uid = self.owner_uid
        if uid is None and self.sandbox is not None:
            uid = self.sandbox._drop_to
        if uid is None:
            return
        if isinstance(target, int):
            os.fchown(target, uid, uid)
        else:
            os.chown(target, uid, uid, dir_fd=dir_fd, follow_symlinks=False)

    # -- reading and writing ------------------------------------------------------------------------
    def _read_fd(self, path: str, fd: int) -> str:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ToolError(f"Invalid `path` parameter: {path}. The path {path} is not a regular file.")
        if st.st_size > self.max_file_bytes:
            raise ToolError(f"Cannot open {path}: the file is larger than {self.max_file_bytes} bytes.")
        chunks, total = [], 0
        while total <= self.max_file_bytes:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > self.max_file_bytes:
            raise ToolError(f"Cannot open {path}: the file is larger than {self.max_file_bytes} bytes.")
        try:
            return b"".join(chunks).decode("utf-8")
        except UnicodeDecodeError:
            raise ToolError(f"Cannot open {path}: not a UTF-8 text file.") from None

    def read(self, path: str, parts: list[str]) -> str:
        fd = self._open(path, parts, os.O_RDONLY)
        try:
            return self._read_fd(path, fd)
        finally:
            os.close(fd)

    def write(self, path: str, parts: list[str], text: str, *, create: bool = False) -> None:
        data = text.encode("utf-8")
        if len(data) > self.max_file_bytes:
            raise ToolError(f"Cannot write {path}: the result would exceed {self.max_file_bytes} bytes.")
        used, count = workspace_usage(self.root, stop_after=self.max_workspace_inodes + 1)
        if create and count >= self.max_workspace_inodes:
            raise ToolError(self._over_bound(path))
        self._new_entries = self.max_workspace_inodes - count
        flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = self._open(path, parts, flags, create_dirs=create)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ToolError(f"Invalid `path` parameter: {path}. The path {path} is not a regular file.")
            if st.st_nlink > 1:  # a hard link may share its inode with a file outside the workspace
                raise ToolError(f"Cannot write {path}: the file has several hard links.")
            if used - _pages(st.st_size) + _pages(len(data)) > self.max_workspace_bytes:
                if create:  # nothing of a refused write stays behind
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, 0)
                    self._unlink_created(parts)
                raise ToolError(self._over_bound(path))
            os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def _over_bound(self, path: str) -> str:
        return (
            f"Cannot write {path}: the workspace would exceed its bound of {self.max_workspace_bytes} bytes "
            f"and {self.max_workspace_inodes} files and directories."
        )

    def _unlink_created(self, parts: list[str]) -> None:
        """Remove a file this call just created (O_EXCL) and refused to fill."""
        with contextlib.suppress(OSError, ToolError):
            parent, name = self._walk_to("/".join(parts), parts)
            try:
                os.unlink(name, dir_fd=parent)
            finally:
                os.close(parent)

    def create(self, path: str, parts: list[str], text: str) -> None:
        if not parts:
            raise ToolError(f"Invalid `path` parameter: {path}. The path {path} is a directory.")
        self.write(path, parts, text, create=True)

    # -- commands -----------------------------------------------------------------------------------
    def view(self, path: str, parts: list[str], view_range: Any) -> str:
        fd = self._open(path, parts, os.O_RDONLY)
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                if view_range:
                    raise ToolError(
                        "The `view_range` parameter is not allowed when `path` points to a directory."
                    )
                base = WORKSPACE + "".join("/" + p for p in _normalise(parts) or [])
                lines = [base + "/"]
                lines += sorted(self._listing(fd, base, 2))
                return (
                    f"Here's the files and directories up to 2 levels deep in {path}, excluding hidden "
                    f"items:\n{self._clip(chr(10).join(lines))}"
                )
            content = self._read_fd(path, fd)
        finally:
            os.close(fd)
        lines = content.split("\n")
        start = 1
        if view_range:
            if len(view_range) != 2 or not all(type(i) is int for i in view_range):
                raise InvalidArgumentsError(
                    "Invalid `view_range` parameter. It should be a list of two integers."
                )
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

    def _listing(self, dir_fd: int, base: str, depth: int, budget: list[int] | None = None) -> list[str]:
        """Entries below a directory descriptor, never following links (a link is listed, not entered,
        and never gets a trailing ``/``: that would tell which host directories exist)."""
        budget = budget if budget is not None else [2000]
        out: list[str] = []
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                if budget[0] <= 0:
                    break
                name = entry.name
                if name.startswith(".") or name == "__pycache__":
                    continue
                budget[0] -= 1
                shown = f"{base}/{_display_name(name)}"
                is_dir = entry.is_dir(follow_symlinks=False)
                out.append(shown + ("/" if is_dir else ""))
                if is_dir and depth > 1:
                    try:
                        child = os.open(name, _O_DIR, dir_fd=dir_fd)
                    except OSError:
                        continue
                    try:
                        out += self._listing(child, shown, depth - 1, budget)
                    finally:
                        os.close(child)
        return out

    def str_replace(self, path: str, parts: list[str], old: Any, new: Any) -> str:
        if old is None:
            raise InvalidArgumentsError("Parameter `old_str` is required for command: str_replace.")
        new = "" if new is None else new
        content = self.read(path, parts)
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
            raise InvalidArgumentsError(
                "No replacement was performed. `new_str` and `old_str` must be different."
            )
        at = content.index(old)
        updated = content.replace(old, new, 1)
        self.write(path, parts, updated)
        self._push(parts, content)
        first = content[:at].count("\n")
        snippet = self._snippet(updated, first - SNIPPET_LINES, first + SNIPPET_LINES + new.count("\n"))
        return (
            f"The file {path} has been edited. Here's the result of running `cat -n` on a snippet of "
            f"{path}:\n{snippet}\nReview the changes and make sure they are as expected. "
            "Edit the file again if necessary."
        )

    def insert(self, path: str, parts: list[str], line: Any, new: Any) -> str:
        if line is None:
            raise InvalidArgumentsError("Parameter `insert_line` is required for command: insert.")
        if new is None:
            raise InvalidArgumentsError("Parameter `new_str` is required for command: insert.")
        content = self.read(path, parts)
        lines = content.split("\n") if content else []
        if not 0 <= line <= len(lines):
            raise ToolError(
                f"Invalid `insert_line` parameter: {line}. It should be within the range of allowed values: "
                f"[0, {len(lines)}]"
            )
        new_lines = new.split("\n")
        updated = "\n".join(lines[:line] + new_lines + lines[line:])
        self.write(path, parts, updated)
        self._push(parts, content)
        snippet = self._snippet(updated, line - SNIPPET_LINES, line + len(new_lines) + SNIPPET_LINES - 1)
        return (
            f"The file {path} has been edited. Here's the result of running `cat -n` on a snippet of the "
            f"edited file:\n{snippet}\nReview the changes and make sure they are as expected (correct "
            "indentation, no duplicate lines, etc). Edit the file again if necessary."
        )

    # -- helpers ------------------------------------------------------------------------------------
    def _push(self, parts: list[str], content: str) -> None:
        key = _history_key(parts)
        stack, seqs = self.history.setdefault(key, []), self._history_seq.setdefault(key, [])
        stack.append(content)
        seqs.append(next(self._history_count))
        self._history_chars += len(content)
        while len(stack) > HISTORY_DEPTH:
            self._history_chars -= len(stack.pop(0))
            seqs.pop(0)
        while self._history_chars > self.max_history_chars:  # drop the oldest entry of any file
            queued = [(q[0], k) for k, q in self._history_seq.items() if q and self.history.get(k)]
            if not queued:
                break
            oldest = min(queued)[1]
            self._history_chars -= len(self.history[oldest].pop(0))
            self._history_seq[oldest].pop(0)

    @staticmethod
    def _snippet(text: str, lo: int, hi: int) -> str:
        lines = text.split("\n")
        lo = max(lo, 0)
        return numbered("\n".join(lines[lo : hi + 1]), lo + 1)

    def _snippet_all(self, path: str, text: str) -> str:
        return f"Here's the result of running `cat -n` on {path}:\n{self._clip(numbered(text))}\n"

    def _clip(self, text: str) -> str:
        return text if len(text) <= self.max_chars else text[: self.max_chars] + CLIPPED_NOTE


HISTORY_DEPTH = 10  # undo entries kept per file


def _history_key(parts: list[str]) -> str:
    return WORKSPACE + "".join("/" + p for p in parts)


def _pages(n: int) -> int:
    """Bytes ``n`` bytes of file take as the workspace bound counts them (whole 4 KiB pages, as tmpfs)."""
    return -(-n // 4096) * 4096


def _normalise(parts: list[str]) -> list[str] | None:
    """Apply ``.`` and ``..`` to path components; None when ``..`` climbs above ``/``."""
    out: list[str] = []
    for p in parts:
        if p in ("", "."):
            continue
        if p == "..":
            if not out:
                return None
            out.pop()
        else:
            out.append(p)
    return out


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
        timeout = args.get("timeout")
        top = max(self.sandbox.limits.timeout_s, 1.0) * MAX_TIMEOUT_FACTOR
        if timeout is not None and not (
            isinstance(timeout, (int, float))
            and not isinstance(timeout, bool)
            and math.isfinite(timeout)
            and 1 <= timeout <= top
        ):
            raise InvalidArgumentsError(
                f"Invalid `timeout` parameter: {timeout!r}. It should be a number in [1, {top:g}]."
            )
        marker = f"__UNIPOST_CWD_{secrets.token_hex(6)}__"
        script = f'{command}\n__rc=$?\nprintf "\\n{marker}%s\\n" "$PWD"\nexit $__rc'
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
            text, code = f"{out}\n[The command timed out after {limit:g} seconds and was killed.]", -1
        else:
            text = f"{out}\n[The command completed with exit code {result.exit_code}.]"
            code = result.exit_code
        if result.workspace_error:  # over a bound, or a copy-out that cannot be trusted: an error turn
            raise ToolError(f"{result.workspace_error} /testbed is as it was before the command.\n{text}")
        return text, code
