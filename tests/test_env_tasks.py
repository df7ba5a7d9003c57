"""Embedded tasks: determinism, disjoint splits, hidden tests that detect the bug, tools, verifier."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from unipost.data import FAILURE_MODES
from unipost.envs.base import Environment
from unipost.envs.embedded import (
    DIFFICULTIES,
    MUTATION_FAMILIES,
    Difficulty,
    EmbeddedEnv,
    Sandbox,
    generate_task,
    parse_tool_call,
    run_hidden_tests,
    tool_call_message,
    tool_schemas,
)
from unipost.envs.embedded.tools import ToolError

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
FIXTURE = (
    Path(__file__).resolve().parent / "fixtures" / "openhands" / "tool_schemas-openhands-tools-1.58.0.json"
)


def _workspace(files: dict[str, str]) -> Path:
    root = Path(tempfile.mkdtemp(prefix="unipost-test-ws-"))
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_same_split_index_difficulty_gives_identical_task():
    for name in DIFFICULTIES:
        a, b = generate_task("train", 7, name), generate_task("train", 7, name)
        assert a == b
        assert a.files == b.files and a.hidden_tests == b.hidden_tests and a.issue == b.issue
    assert generate_task("train", 7, "hard").files != generate_task("train", 8, "hard").files


def test_splits_are_disjoint_in_content():
    for name in ("easy", "medium"):
        train = {generate_task("train", i, name).content_key() for i in range(150)}
        heldout = {generate_task("heldout", i, name).content_key() for i in range(150)}
        assert not train & heldout
        assert len(train) > 140 and len(heldout) > 140  # almost all tasks are distinct


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="Unknown split"):
        generate_task("test", 0)
    with pytest.raises(ValueError, match="Unknown difficulty"):
        generate_task("train", 0, "impossible")
    with pytest.raises(ValueError, match="out of range"):
        generate_task("train", -1)
    with pytest.raises(ValueError, match="Invalid difficulty"):
        Difficulty(n_files=0)


def test_tasks_cover_every_mutation_family_and_keep_files_small():
    families = set()
    for i in range(80):
        task = generate_task("train", i, list(DIFFICULTIES)[i % len(DIFFICULTIES)])
        families.add(task.bug.family)
        # the issue shows the symptom, never the fix
        assert task.bug.fixed not in task.issue
        if task.difficulty.depth > 0:
            assert task.bug.function not in task.issue
        assert task.chain[-1] == (task.bug.function, task.bug.path)
        assert all(len(text.splitlines()) < 80 for text in task.files.values())
        assert "test_hidden.py" not in "".join(task.files)
    assert families == set(MUTATION_FAMILIES)


@needs_bwrap
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_hidden_tests_fail_before_and_pass_after_the_fix(split):
    names = list(DIFFICULTIES)
    for i in range(40):
        task = generate_task(split, i, names[i % len(names)])
        for files, want in ((task.files, False), (task.fixed_files, True)):
            root = _workspace(files)
            try:
                report = run_hidden_tests(task, Sandbox(root))
            finally:
                shutil.rmtree(root, ignore_errors=True)
            assert report.import_error is None, (task.task_id, report.raw)
            assert report.passed is want, (task.task_id, want, report)
            if not want:
                assert report.failures + report.errors >= 1


def test_compact_schemas_keep_openhands_names_params_types_enums_required():
    compact, full = tool_schemas(), tool_schemas(full=True)
    assert [s["function"]["name"] for s in compact] == ["terminal", "file_editor", "think", "finish"]
    reference = (
        json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {s["function"]["name"]: s for s in full}
    )
    for schema in compact:
        name = schema["function"]["name"]
        ref = reference[name]["function"]["parameters"]
        got = schema["function"]["parameters"]
        assert got["required"] == ref["required"]
        assert set(got["properties"]) == set(ref["properties"])
        for pname, prop in got["properties"].items():
            assert prop.get("type") == ref["properties"][pname].get("type")
            assert prop.get("enum") == ref["properties"][pname].get("enum")
        assert len(json.dumps(schema)) < len(json.dumps(reference[name])) / 2
    assert full == [reference[s["function"]["name"]] for s in compact]


def test_tool_call_validation():
    call = tool_call_message("", "execute_bash", {"command": "ls"}, "c1")["tool_calls"][0]
    assert parse_tool_call(call).name == "terminal"  # legacy alias
    call = tool_call_message("", "str_replace_editor", {"command": "view", "path": "/testbed"}, "c2")[
        "tool_calls"
    ][0]
    assert parse_tool_call(call).name == "file_editor"
    bad = [
        ({"function": {"name": "nope", "arguments": "{}"}}, "does not exist"),
        ({"function": {"name": "terminal", "arguments": '{"command": '}}, "JSON"),
        (
            {"function": {"name": "file_editor", "arguments": '{"path": "/testbed"}'}},
            "Missing required argument 'command'",
        ),
        (
            {"function": {"name": "file_editor", "arguments": '{"command": "delete", "path": "/x"}'}},
            "allowed values",
        ),
        ({"function": {"name": "terminal", "arguments": '{"command": 3}'}}, "must be of type string"),
    ]
    for call, match in bad:
        with pytest.raises(ToolError, match=match):
            parse_tool_call(call)


@pytest.fixture()
def env():
    e = EmbeddedEnv(
        generate_task("train", 3, "medium"),
        max_observation_chars=2000,
        unsafe_local=shutil.which("bwrap") is None,
    )
    e.reset()
    yield e
    e.close()


def _call(env, name, **args):
    return env.step(tool_call_message("", name, args, "c"))


def test_env_implements_protocol_and_file_editor_matches_openhands(env):
    assert isinstance(env, Environment)
    path = f"/testbed/{env.task.bug.path}"
    r = _call(env, "file_editor", command="view", path=path)
    text = r.observation[0]["content"]
    assert text.startswith(f"Here's the result of running `cat -n` on {path}:\n     1\t")
    assert r.observation[0]["role"] == "tool" and r.observation[0]["tool_call_id"] == "c" and not r.tool_error
    r = _call(env, "file_editor", command="view", path=path, view_range=[2, 3])
    assert r.observation[0]["content"].splitlines()[1].startswith("     2\t")
    r = _call(env, "file_editor", command="str_replace", path=path, old_str="no such text", new_str="x")
    assert r.tool_error
    assert (
        f"No replacement was performed, old_str `no such text` did not appear verbatim in {path}."
        in r.observation[0]["content"]
    )
    original = env.host_path(path).read_text()
    r = _call(
        env,
        "str_replace_editor",
        command="str_replace",
        path=path,
        old_str=env.task.bug.buggy,
        new_str=env.task.bug.fixed,
    )
    assert not r.tool_error and "has been edited" in r.observation[0]["content"]
    assert env.host_path(path).read_text() == env.task.fixed_files[env.task.bug.path]
    r = _call(env, "file_editor", command="undo_edit", path=path)
    assert (
        env.host_path(path).read_text() == original and "undone successfully" in r.observation[0]["content"]
    )
    r = _call(env, "file_editor", command="insert", path=path, insert_line=0, new_str="# hello")
    assert env.host_path(path).read_text() == "# hello\n" + original
    r = _call(env, "file_editor", command="create", path=path, file_text="x")
    assert r.tool_error and "Cannot overwrite files using command `create`" in r.observation[0]["content"]
    r = _call(env, "file_editor", command="view", path="relative/path.py")
    assert r.tool_error and "should be an absolute path" in r.observation[0]["content"]


def test_terminal_reports_exit_code_keeps_cwd_and_truncates(env):
    r = _call(env, "terminal", command="cd /testbed/" + env.task.package + " && ls; false")
    out = r.observation[0]["content"]
    assert (
        "__init__.py" in out
        and out.endswith("[The command completed with exit code 1.]")
        and not r.tool_error
    )
    r = _call(env, "execute_bash", command="pwd")
    assert r.observation[0]["content"].startswith(f"/testbed/{env.task.package}\n")
    r = _call(env, "terminal", command="python3 -c \"print('x' * 50000)\"")
    out = r.observation[0]["content"]
    assert "[... Observation truncated due to length ...]" in out and len(out) < 2200


def test_step_never_raises_on_garbage(env):
    for action in [
        {"role": "assistant", "content": "no tools"},
        {"role": "assistant", "tool_calls": "not a list"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "terminal", "arguments": "{{"}}]},
        {"role": "assistant", "tool_calls": [42]},
        "a string",
    ]:
        r = env.step(action)
        assert r.tool_error and not r.done and r.observation


def _episode(task, actions, ended_by=None):
    with EmbeddedEnv(task, unsafe_local=shutil.which("bwrap") is None) as e:
        e.reset()
        for a in actions:
            e.step(a)
        return e.verify(ended_by=ended_by)


def _fin():
    return tool_call_message("done", "finish", {"message": "done"}, "f")


def _edit(path, old, new):
    return tool_call_message(
        "",
        "file_editor",
        {"command": "str_replace", "path": f"/testbed/{path}", "old_str": old, "new_str": new},
        "e",
    )


@needs_bwrap
def test_verifier_classifies_table4_failure_modes():
    task = generate_task("heldout", 5, "medium")
    bug = task.bug
    other = next(
        p for p in task.files if p != bug.path and p.endswith(".py") and not p.endswith("__init__.py")
    )
    fix = _edit(bug.path, bug.buggy, bug.fixed)
    assert _episode(task, [fix, _fin()]).resolved
    assert _episode(task, [fix, _fin()]).reward == 1.0
    assert _episode(task, [_fin()]).failure_mode == "wrong_file"
    first = task.files[other].splitlines()[0]
    assert (
        _episode(task, [_edit(other, first, first + "\n)"), _fin()]).failure_mode == "syntax_or_runtime_error"
    )
    touch = tool_call_message(
        "",
        "file_editor",
        {"command": "insert", "path": f"/testbed/{bug.path}", "insert_line": 0, "new_str": "import os"},
        "i",
    )
    outcome = _episode(task, [touch, _fin()])  # the buggy file was edited, the bug is still there
    assert outcome.submitted and not outcome.resolved and outcome.failure_mode == "wrong_solution"
    assert _episode(task, [fix]).failure_mode == "budget_exhaustion"  # fixed but never submitted
    assert not _episode(task, [fix]).resolved
    bad = {"role": "assistant", "content": "oops"}
    assert _episode(task, [bad, bad, fix]).failure_mode == "tool_use_error"
    look = tool_call_message("", "terminal", {"command": "ls"}, "l")
    assert _episode(task, [fix, look, look, look]).failure_mode == "repetitive_loop"
    assert _episode(task, [look], ended_by="context_budget").failure_mode == "context_overflow"
    assert _episode(task, [look], ended_by="turn_budget").failure_mode == "no_edit"
    assert set(FAILURE_MODES) >= {"wrong_file", "no_edit"}
    # a test_hidden.py planted in the workspace does not replace the hidden tests
    fake = "def test_ok():\n    pass\n"
    plant = tool_call_message(
        "", "file_editor", {"command": "create", "path": "/testbed/test_hidden.py", "file_text": fake}, "p"
    )
    assert not _episode(task, [plant, _fin()]).resolved
