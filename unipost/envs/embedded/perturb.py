"""Random and deliberately wrong actions: the states a weak student drives the episode into.

Used to test the expert's recovery (DAgger labels are only useful if the teacher acts well at states the
student reached) and by ``unipost env expert --perturb K``. Each perturbation is an ordinary assistant
message executed through ``EmbeddedEnv.step``, so it exercises the same tool paths a model would.
"""

from __future__ import annotations

import json
import random
import re

from unipost.data import Message
from unipost.envs.embedded.expert import tool_call_message
from unipost.envs.embedded.sandbox import WORKSPACE
from unipost.envs.embedded.verifier import workspace_files

PERTURBATION_KINDS = (
    "view_random_file",
    "terminal_look_around",
    "wrong_edit_buggy_file",
    "wrong_edit_other_file",
    "delete_lines",
    "create_junk_file",
    "bad_tool_call",
    "think",
)


def random_perturbation(env, rng: random.Random, kind: str | None = None) -> Message:
    """One random or wrong action for the current state of ``env`` (an ``EmbeddedEnv`` after reset)."""
    kind = kind or rng.choice(PERTURBATION_KINDS)
    files = {p: c for p, c in workspace_files(env.workspace).items() if p.endswith(".py")}
    paths = sorted(files) or sorted(env.task.files)
    cid = f"call_p{rng.randrange(10**6)}"
    bug_path = env.task.bug.path
    if kind == "view_random_file":
        return tool_call_message(
            "Let me look at this file.",
            "file_editor",
            {"command": "view", "path": f"{WORKSPACE}/{rng.choice(paths)}"},
            cid,
        )
    if kind == "terminal_look_around":
        cmd = rng.choice(
            ["ls -la /testbed", f"cat {WORKSPACE}/{rng.choice(paths)}", "python3 -c 'print(1)'", "pwd"]
        )
        return tool_call_message("Let me look around.", "terminal", {"command": cmd}, cid)
    if kind in ("wrong_edit_buggy_file", "wrong_edit_other_file", "delete_lines"):
        others = [p for p in paths if p != bug_path] or paths
        rel = bug_path if kind == "wrong_edit_buggy_file" and bug_path in files else rng.choice(others)
        content = files.get(rel, "")
        lines = [ln for ln in content.split("\n") if ln.strip() and content.count(ln) == 1]
        if not lines:
            return _bad_call(rng, cid)
        line = rng.choice(lines)
        new = "" if kind == "delete_lines" else _mutate_line(line, rng)
        return tool_call_message(
            "I think this line is the problem.",
            "file_editor",
            {"command": "str_replace", "path": f"{WORKSPACE}/{rel}", "old_str": line, "new_str": new},
            cid,
        )
    if kind == "create_junk_file":
        name = f"scratch_{rng.randrange(1000)}.py"
        return tool_call_message(
            "Let me write a scratch script.",
            "file_editor",
            {"command": "create", "path": f"{WORKSPACE}/{name}", "file_text": "print('debug')\n"},
            cid,
        )
    if kind == "think":
        return tool_call_message("", "think", {"thought": "Maybe the bug is in the tests."}, cid)
    return _bad_call(rng, cid)


def _mutate_line(line: str, rng: random.Random) -> str:
    options = []
    if re.search(r"\d", line):
        options.append(lambda s: re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), s, count=1))
    for a, b in (("+", "-"), ("<", ">"), (">", "<"), ("==", "!="), ("True", "False")):
        if a in line:
            options.append(lambda s, a=a, b=b: s.replace(a, b, 1))
    options.append(lambda s: s + "  # changed")
    options.append(lambda s: s.replace("    ", "  ", 1) if s.startswith("    ") else s + " +")
    return rng.choice(options)(line)


def _bad_call(rng: random.Random, cid: str) -> Message:
    choice = rng.randrange(5)
    if choice == 0:
        return tool_call_message("", "open_file", {"path": "/testbed"}, cid)
    if choice == 1:
        msg = tool_call_message("", "terminal", {}, cid)
        msg["tool_calls"][0]["function"]["arguments"] = '{"command": "ls", '  # truncated JSON
        return msg
    if choice == 2:
        return tool_call_message(
            "", "file_editor", {"command": "str_replace", "path": f"{WORKSPACE}/nope.py", "old_str": "x"}, cid
        )
    if choice == 3:
        return {"role": "assistant", "content": "I will now fix the bug."}  # no tool call at all
    return tool_call_message("", "file_editor", {"command": "delete", "path": WORKSPACE}, cid)


def as_json(message: Message) -> str:
    return json.dumps(message, sort_keys=True)
