"""Hidden-test verification and the paper's Table-4 failure classification.

The hidden tests never sit in the agent's workspace: they live in a separate host directory that is
bound read-only at ``/hidden`` for the verification run only. They are plain-assert test functions
(pytest-compatible) called by a tiny runner under ``python3 -S``: importing pytest or even unittest
would dominate the cost of an embedded episode.

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

import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from unipost.data import Outcome
from unipost.envs.embedded.sandbox import Sandbox
from unipost.envs.embedded.tasks import Task

EndedBy = Literal["turn_budget", "context_budget"] | None
REPEAT_WINDOW = 3

_RUNNER = """\
import importlib, importlib.util, json, os, sys
nonce, package, root = sys.argv[1], sys.argv[2], sys.argv[3]
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, root)
report = {"import_error": None}
try:
    for name in sorted(os.listdir(os.path.join(root, package))):
        if name.endswith(".py"):
            importlib.import_module(package if name == "__init__.py" else package + "." + name[:-3])
    # load the hidden tests by file path: a test_hidden.py planted in the workspace cannot shadow them
    spec = importlib.util.spec_from_file_location("test_hidden", os.path.join(here, "test_hidden.py"))
    test_hidden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_hidden)
except BaseException as exc:
    report["import_error"] = type(exc).__name__ + ": " + str(exc)
else:
    tests = sorted(n for n in dir(test_hidden) if n.startswith("test_") and callable(getattr(test_hidden, n)))
    failures, errors = [], []
    for n in tests:
        try:
            getattr(test_hidden, n)()
        except AssertionError as exc:
            failures.append(n + ": " + str(exc))
        except BaseException as exc:
            errors.append(n + ": " + type(exc).__name__ + ": " + str(exc))
    details = (failures + errors)[:5]
    report.update(tests=len(tests), failures=len(failures), errors=len(errors), details=details)
print(nonce + json.dumps(report))
"""


@dataclass
class TestReport:
    passed: bool
    import_error: str | None
    tests: int
    failures: int
    errors: int
    details: list[str]
    raw: str


def run_hidden_tests(task: Task, sandbox: Sandbox) -> TestReport:
    """Copy the hidden tests to a fresh read-only directory and run them against the workspace."""
    hidden = Path(tempfile.mkdtemp(prefix="unipost-hidden-"))
    try:
        for rel, text in task.hidden_tests.items():
            (hidden / rel).write_text(text)
        (hidden / "_unipost_runner.py").write_text(_RUNNER)
        os.chmod(hidden, 0o755)
        for f in hidden.iterdir():
            os.chmod(f, 0o644)
        nonce = f"UNIPOST_RESULT_{secrets.token_hex(8)}:"
        if sandbox.isolated:
            runner = "/hidden/_unipost_runner.py"
            cmd = f"cd /testbed && PYTHONPATH=/hidden python3 -S {runner} {nonce} {task.package} /testbed"
            res = sandbox.run(cmd, ro_binds={str(hidden): "/hidden"})
        else:
            runner = hidden / "_unipost_runner.py"
            cmd = f"cd /testbed && PYTHONPATH={hidden} python3 -S {runner} {nonce} {task.package} /testbed"
            res = sandbox.run(cmd)
    finally:
        shutil.rmtree(hidden, ignore_errors=True)
    line = next((ln for ln in res.output.splitlines()[::-1] if ln.startswith(nonce)), None)
    if line is None:
        why = "timed out" if res.timed_out else f"exit code {res.exit_code}"
        return TestReport(
            False, f"hidden test run produced no report ({why})", 0, 0, 0, [], res.output[-2000:]
        )
    data = json.loads(line[len(nonce) :])
    if data.get("import_error"):
        return TestReport(False, data["import_error"], 0, 0, 0, [], res.output[-2000:])
    passed = data["tests"] > 0 and data["failures"] == 0 and data["errors"] == 0
    return TestReport(
        passed, None, data["tests"], data["failures"], data["errors"], data["details"], res.output[-2000:]
    )


def workspace_files(root: Path) -> dict[str, str]:
    """Text files of a workspace (relative path -> content), ignoring bytecode caches."""
    out: dict[str, str] = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root).as_posix()
        if "__pycache__" in path.parts or path.suffix == ".pyc" or path.is_dir() or path.is_symlink():
            continue
        try:
            if path.stat().st_size > 1_000_000:
                out[rel] = "<large file>"
                continue
            out[rel] = path.read_text()
        except (UnicodeDecodeError, OSError):
            out[rel] = "<binary file>"
    return out


def classify(
    task: Task,
    workspace: Path,
    report: TestReport | None,
    *,
    submitted: bool,
    turn_tool_errors: list[bool],
    actions: list[str],
    ended_by: EndedBy = None,
) -> Outcome:
    """Outcome with resolved/submitted/reward and one Table-4 failure mode when unresolved."""
    files = workspace_files(workspace)
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
    n = len(turn_tool_errors)
    if n and sum(turn_tool_errors) * 2 > n:
        mode = "tool_use_error"
    elif len(actions) >= REPEAT_WINDOW and len(set(actions[-REPEAT_WINDOW:])) == 1:
        mode = "repetitive_loop"
    elif ended_by == "context_budget":
        mode = "context_overflow"
    elif not edited:
        mode = "no_edit"
    else:
        mode = "budget_exhaustion"
    detail = f"not submitted after {n} turns (ended_by={ended_by})"
    return Outcome(resolved=False, submitted=False, reward=0.0, failure_mode=mode, detail=detail)
