"""Hidden-test verification and the paper's Table-4 failure classification.

Reward integrity by design: the verdict is computed in the host process, never in a process the
agent's code runs in, and the expected values never reach the sandbox. The hidden tests are plain
``got = f(args)`` / ``assert got == expected`` functions (pytest-compatible); the host reads them with
``ast``, sends only the inputs to a sandboxed runner (``python3 -I -S``) that imports the agent's package
and returns each call's output as JSON over a dedicated pipe, and compares on the host. Importing
pytest or even unittest would dominate the cost of an embedded episode, hence the tiny runner.

Classification (one primary mode per unresolved episode, paper Table 4):

- submitted (the agent called ``finish``) but unresolved:
  ``syntax_or_runtime_error`` if a package module fails to import/compile, or the hidden tests raise
  although the original bug does not; else ``wrong_file`` if the buggy file was left untouched; else
  ``wrong_solution``.
- not submitted, checked in this order: ``tool_use_error`` (most turns were tool errors),
  ``repetitive_loop`` (the last 3 actions are identical), ``context_overflow`` (the rollout engine ended
  the episode on its context budget: ``ended_by="context_budget"``), ``no_edit`` (the workspace was never
  changed), ``budget_exhaustion`` (edits were made but the turn budget ran out, or the engine stopped it).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from unipost.data import Outcome
from unipost.envs.embedded.sandbox import CommandResult, Sandbox
from unipost.envs.embedded.tasks import Task
from unipost.rendering.toolcalls import loads_bounded

EndedBy = Literal["turn_budget", "context_budget"] | None
REPEAT_WINDOW = 3

# The sandboxed half of a verification. It gets only the *inputs* of the hidden cases (spec.json: the
# module, and a list of [function, args]); it never sees an expected value or a test. It imports the
# agent's package (all of it, so a module that does not compile shows up), calls each function, and
# writes what came back, as JSON, to its own result pipe. Package code runs in this process and may
# tamper with anything here (patch json, exit early, print fake lines): that changes only the outputs it
# reports, which the host compares with expected values the sandbox never had.
_RUNNER = """\
import importlib, json, os, sys
fd = int(os.environ["UNIPOST_CHANNEL_FD"])
with open(sys.argv[1]) as fh:
    spec = json.load(fh)
root = sys.argv[2]
sys.path.insert(0, root)
reply = {"import_error": None, "results": []}
try:
    package = spec["package"]
    for name in sorted(os.listdir(os.path.join(root, package))):
        if name.endswith(".py"):
            importlib.import_module(package if name == "__init__.py" else package + "." + name[:-3])
    module = importlib.import_module(spec["module"])
except BaseException as exc:
    reply["import_error"] = (type(exc).__name__ + ": " + str(exc))[:500]
else:
    for fn, args in spec["calls"]:
        try:
            got = getattr(module, fn)(*args)
            reply["results"].append(["ok", type(got).__name__, got])
        except BaseException as exc:
            reply["results"].append(["raise", type(exc).__name__, str(exc)[:300]])
data = json.dumps(reply, default=repr).encode()
while data:
    data = data[os.write(fd, data):]
"""
MAX_REPLY_BYTES = 1 << 20  # what the host reads of the runner's reply; more is not a reply


@dataclass
class TestReport:
    passed: bool
    import_error: str | None
    tests: int
    failures: int
    errors: int
    details: list[str]
    raw: str


@dataclass(frozen=True)
class HiddenCase:
    """One hidden test: ``function(*args)`` must return ``expected`` (held on the host only)."""

    test: str
    function: str
    args: tuple[Any, ...]
    expected: Any


@cache
def _parse_cases(text: str) -> tuple[str, tuple[HiddenCase, ...]]:
    """(module, cases) of a hidden-test file, read on the host with ``ast`` (never executed).

    The embedded tasks' hidden tests are plain ``got = f(args)`` / ``assert got == expected`` functions
    (see tasks._hidden_tests); anything else is refused rather than run where the agent's code runs.
    """
    tree = ast.parse(text)
    module, cases = None, []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
        elif isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            body = [n for n in node.body if not isinstance(n, ast.Expr)]
            ok = (
                len(body) == 2
                and isinstance(body[0], ast.Assign)
                and isinstance(body[0].value, ast.Call)
                and isinstance(body[0].value.func, ast.Name)
                and isinstance(body[1], ast.Assert)
                and isinstance(body[1].test, ast.Compare)
                and len(body[1].test.comparators) == 1
            )
            if not ok:
                raise ValueError(f"hidden test {node.name} is not of the form got = f(...); assert got == x")
            call = body[0].value
            args = tuple(ast.literal_eval(a) for a in call.args)
            expected = ast.literal_eval(body[1].test.comparators[0])
            cases.append(HiddenCase(node.name, call.func.id, args, expected))
    if module is None or not cases:
        raise ValueError("hidden tests name no module or hold no test function")
    return module, tuple(sorted(cases, key=lambda c: c.test))


def hidden_cases(task: Task) -> tuple[str, tuple[HiddenCase, ...]]:
    """The module under test and every hidden case of a task (host side only)."""
    module, cases = None, []
    for _rel, text in sorted(task.hidden_tests.items()):
        module, more = _parse_cases(text)
        cases += more
    assert module is not None
    return module, tuple(cases)


def run_hidden_tests(task: Task, sandbox: Sandbox) -> TestReport:
    """Verify the workspace with the verdict computed here, on the host, never in the sandbox.

    The sandboxed runner receives the inputs of the hidden cases only, imports the agent's package,
    and sends back what each call returned over a dedicated pipe; this function compares those
    outputs with the expected values, which never leave this process. Agent code that forges a
    report, patches the runner or reads the runner's directory learns no expected value and can
    only misreport its own outputs.
    """
    module, cases = hidden_cases(task)
    spec = {"package": task.package, "module": module, "calls": [[c.function, list(c.args)] for c in cases]}
    hidden = Path(tempfile.mkdtemp(prefix="unipost-hidden-"))
    try:
        (hidden / "spec.json").write_text(json.dumps(spec))
        (hidden / "_unipost_runner.py").write_text(_RUNNER)
        os.chmod(hidden, 0o755)
        for f in hidden.iterdir():
            os.chmod(f, 0o644)
        if sandbox.isolated:
            cmd = "cd /testbed && python3 -I -S /hidden/_unipost_runner.py /hidden/spec.json /testbed"
            res = sandbox.run(cmd, ro_binds={str(hidden): "/hidden"}, channel=MAX_REPLY_BYTES)
        else:
            runner, spec_path = hidden / "_unipost_runner.py", hidden / "spec.json"
            cmd = f"cd /testbed && python3 -I -S {runner} {spec_path} /testbed"  # /testbed: translated
            res = sandbox.run(cmd, channel=MAX_REPLY_BYTES)
    finally:
        shutil.rmtree(hidden, ignore_errors=True)
    return _judge(cases, res)


def _judge(cases: tuple[HiddenCase, ...], res: CommandResult) -> TestReport:
    """Compare the runner's reported outputs with the expected values (host side)."""
    raw = res.output[-2000:]
    try:
        reply = loads_bounded(res.channel.decode("utf-8"), 64) if res.channel else None
    except (UnicodeDecodeError, ValueError):
        reply = None
    if not isinstance(reply, dict) or not isinstance(reply.get("results", []), list):
        why = "timed out" if res.timed_out else f"exit code {res.exit_code}"
        return TestReport(False, f"hidden test run produced no report ({why})", 0, 0, 0, [], raw)
    if reply.get("import_error"):
        return TestReport(False, str(reply["import_error"])[:500], 0, 0, 0, [], raw)
    results = reply.get("results", [])
    failures, errors, details = 0, 0, []
    for i, case in enumerate(cases):
        got = results[i] if i < len(results) else None
        if not (isinstance(got, list) and len(got) == 3 and got[0] in ("ok", "raise")):
            errors += 1
            details.append(f"{case.test}: no result reported")
        elif got[0] == "raise" and got[1] != "AssertionError":
            errors += 1
            details.append(f"{case.test}: {got[1]}: {got[2]}"[:300])
        elif got[0] == "raise" or got[1] != type(case.expected).__name__ or got[2] != case.expected:
            failures += 1
            details.append(f"{case.test}: returned {str(got[2])[:100]}, expected {case.expected!r}"[:300])
    passed = bool(cases) and failures == 0 and errors == 0 and not res.timed_out
    return TestReport(passed, None, len(cases), failures, errors, details[:5], raw)


def workspace_files(root: Path, max_files: int = 5000) -> dict[str, str]:
    """Text files of a workspace (relative path -> content), ignoring bytecode caches.

    Only regular files are read, opened without following links and without blocking (a FIFO or a
    link to a host file planted by the agent must neither hang nor leak into the verdict).
    """
    out: dict[str, str] = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not enter symlinked directories
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if len(out) >= max_files:
                return out
            path = Path(dirpath) / name
            if path.suffix == ".pyc":
                continue
            rel = path.relative_to(root).as_posix().encode("utf-8", "surrogateescape")
            out[rel.decode("utf-8", "backslashreplace")] = _read_regular(path)
    return out


def _read_regular(path: Path, limit: int = 1_000_000) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return "<unreadable>"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "<not a regular file>"
        if st.st_size > limit:
            return "<large file>"
        data = os.read(fd, limit + 1)
        return data.decode("utf-8") if len(data) <= limit else "<large file>"
    except UnicodeDecodeError:
        return "<binary file>"
    except OSError:
        return "<unreadable>"
    finally:
        os.close(fd)


def verify_episode(env: Any, ended_by: EndedBy = None) -> Outcome:
    """The one verify path of the environments built on the embedded world (``EmbeddedEnv``,
    ``OpenHandsEnv``): the hidden tests in the sandbox when the agent submitted, then the Table-4
    classification. ``env`` has ``task``, ``workspace``, ``sandbox``, ``submitted``,
    ``turn_tool_errors`` and ``actions``; ``ended_by`` comes from the rollout engine."""
    if env.workspace is None or env.sandbox is None:
        raise RuntimeError(f"{type(env).__name__}.verify() called before reset().")
    # The workspace as the agent left it, read before the hidden tests run: package code run by the
    # verifier can change /testbed (its changes are copied back like any command's), never the verdict
    # and never what the classification sees.
    files = workspace_files(env.workspace)
    report = run_hidden_tests(env.task, env.sandbox) if env.submitted else None
    return classify(
        env.task,
        env.workspace,
        report,
        submitted=env.submitted,
        turn_tool_errors=env.turn_tool_errors,
        actions=env.actions,
        ended_by=ended_by,
        files=files,
    )


def classify(
    task: Task,
    workspace: Path,
    report: TestReport | None,
    *,
    submitted: bool,
    turn_tool_errors: list[bool],
    actions: list[str],
    ended_by: EndedBy = None,
    files: dict[str, str] | None = None,
) -> Outcome:
    """Outcome with resolved/submitted/reward and one Table-4 failure mode when unresolved.

    ``files``: the workspace's files as read before verification (default: read ``workspace`` now)."""
    files = workspace_files(workspace) if files is None else files
    edited = {p for p in set(files) | set(task.files) if files.get(p) != task.files.get(p)}
    resolved = bool(submitted and report is not None and report.passed)
    if resolved:
        return Outcome(resolved=True, submitted=True, reward=1.0, detail="all hidden tests pass")
    if submitted:
        assert report is not None
        if report.import_error:
            mode, detail = "syntax_or_runtime_error", report.import_error
        elif report.errors and not task.bug_raises:
            mode, detail = "syntax_or_runtime_error", "; ".join(report.details)
        elif task.bug.path not in edited:
            mode, detail = (
                "wrong_file",
                f"edited {sorted(edited) or 'nothing'}; the bug is in {task.bug.path}",
            )
        else:
            mode, detail = "wrong_solution", "; ".join(report.details)
        return Outcome(resolved=False, submitted=True, reward=0.0, failure_mode=mode, detail=detail)
    mode = unsubmitted_mode(turn_tool_errors, actions, ended_by, edited=bool(edited))
    detail = f"not submitted after {len(turn_tool_errors)} turns (ended_by={ended_by})"
    return Outcome(resolved=False, submitted=False, reward=0.0, failure_mode=mode, detail=detail)


def unsubmitted_mode(
    turn_tool_errors: list[bool], actions: list[str], ended_by: EndedBy, *, edited: bool
) -> str:
    """The right block of paper Table 4 for an episode without a submission, by the rules above.

    Shared with the SWE Docker environment, so both worlds assign the same five categories.
    """
    n = len(turn_tool_errors)
    if n and sum(turn_tool_errors) * 2 > n:
        return "tool_use_error"
    if len(actions) >= REPEAT_WINDOW and len(set(actions[-REPEAT_WINDOW:])) == 1:
        return "repetitive_loop"
    if ended_by == "context_budget":
        return "context_overflow"
    if not edited:
        return "no_edit"
    return "budget_exhaustion"
