"""Attacks on the embedded environment, the rollout store and the credential scrubber (issue 10).

Each test plays a malicious or buggy agent through the public API only (``EmbeddedEnv.step`` /
``verify``, ``tool_call_message``, ``RolloutEngine.collect``, ``TrajectoryStore``) and then checks the
host: no file written outside the workspace, no process left behind, no forged reward, no lost or
corrupt trajectory, no host path or credential in what comes back. Every test here failed on the code
before the fix (the issue's reproductions), and tests a class, not just one payload.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

import pytest

from unipost.envs.embedded import EmbeddedEnv, Limits, generate_task, tool_call_message

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
pytestmark = pytest.mark.sandbox


def mk(index: int = 0, **kwargs) -> EmbeddedEnv:
    env = EmbeddedEnv(generate_task("train", index, "easy"), limits=Limits(timeout_s=3, cpu_s=3), **kwargs)
    env.reset()
    return env


@pytest.fixture()
def env():
    e = mk()
    yield e
    e.close()


def call(env, tool: str, **args):
    return env.step(tool_call_message("", tool, args, "c"))


def sh(env, command: str, **extra) -> str:
    return call(env, "terminal", command=command, **extra).observation[0]["content"]


def edit(env, **args):
    return call(env, "file_editor", **args)


# ------------------------------------------------------------------------------ 1. sandbox escape
BAD_TIMEOUTS = [math.nan, math.inf, -math.inf, -1, 0, 0.5, 1e308, True, "5", [1], {"s": 1}]


def _tagged_processes(tag: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if tag.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


@needs_bwrap
@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=repr)
def test_an_invalid_timeout_is_an_error_and_starts_nothing(env, timeout):
    tag = f"unipost_attack_{secrets.token_hex(4)}"
    result = call(
        env, "terminal", command=f"python3 -c 'import time; time.sleep(30)  # {tag}'", timeout=timeout
    )
    assert result.tool_error, result.observation
    assert "timeout" in result.observation[0]["content"]
    assert _tagged_processes(tag) == []


@needs_bwrap
def test_no_agent_process_outlives_its_call(env):
    tag = f"unipost_attack_{secrets.token_hex(4)}"
    py = f"python3 -c 'import time; time.sleep(30)  # {tag}'"
    for command in (f"{py} &", f"nohup {py} >/dev/null 2>&1 & disown", f"setsid {py} &", py):
        sh(env, command, timeout=1)
        deadline = time.monotonic() + 3
        while _tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _tagged_processes(tag) == [], command


_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(a: bytes, b: bytes) -> None:
    _libc.syscall(316 if os.uname().machine == "x86_64" else 276, -100, a, -100, b, 2)  # renameat2 EXCHANGE


@needs_bwrap
@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="renameat2 syscall number")
def test_editor_cannot_be_raced_into_a_host_file(env, tmp_path):
    """A file and a symlink to a host file swapped atomically in a loop (renameat2 RENAME_EXCHANGE), as
    a process left running by the agent would: no read or write of the editor may land on the host."""
    host = tmp_path / "host.txt"
    host.write_text("HOST SECRET\n")
    sh(
        env,
        f"printf 'a\\nb\\n' > /testbed/f.txt && ln -s {host} /testbed/link && "
        f"ln -s {tmp_path} /testbed/dirlink",
    )
    a, b = bytes(env.workspace / "f.txt"), bytes(env.workspace / "link")
    stop = threading.Event()

    def race():
        while not stop.is_set():
            _exchange(a, b)

    racer = threading.Thread(target=race, daemon=True)
    racer.start()
    try:
        for i in range(300):
            for action in (
                dict(command="insert", path="/testbed/f.txt", insert_line=0, new_str=f"x{i}"),
                dict(command="str_replace", path="/testbed/f.txt", old_str="a", new_str="A"),
                dict(command="view", path="/testbed/f.txt"),
                dict(command="create", path=f"/testbed/dirlink/new{i}.txt", file_text="x"),
                dict(command="undo_edit", path="/testbed/f.txt"),
            ):
                out = edit(env, **action).observation[0]["content"]
                assert "HOST SECRET" not in out
    finally:
        stop.set()
        racer.join()
    assert host.read_text() == "HOST SECRET\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host.txt"]


@needs_bwrap
def test_symlinks_never_lead_outside_the_workspace(env, tmp_path):
    (tmp_path / "host.txt").write_text("HOST SECRET\n")
    (tmp_path / "sub").mkdir()
    sh(
        env,
        f"ln -s {tmp_path}/host.txt /testbed/abs && "
        f"ln -s ../../../../../../{tmp_path}/host.txt /testbed/rel && ln -s {tmp_path} /testbed/d && "
        "ln -s /testbed/loop2 /testbed/loop1 && ln -s loop1 /testbed/loop2 && "
        "mkdir /testbed/in && echo ok > /testbed/in/t.txt && ln -s /testbed/in/t.txt /testbed/good && "
        "ln -s in /testbed/gooddir",
    )
    for path in ("/testbed/abs", "/testbed/rel", "/testbed/d/host.txt", "/testbed/loop1", "/testbed/d"):
        for action in (
            dict(command="view", path=path),
            dict(command="str_replace", path=path, old_str="HOST", new_str="PWNED"),
            dict(command="insert", path=path, insert_line=0, new_str="PWNED"),
        ):
            r = edit(env, **action)
            assert r.tool_error and "HOST SECRET" not in r.observation[0]["content"], (path, action)
    r = edit(env, command="create", path="/testbed/d/sub/new.txt", file_text="PWNED")
    assert r.tool_error
    assert (tmp_path / "host.txt").read_text() == "HOST SECRET\n" and list((tmp_path / "sub").iterdir()) == []
    # a listing never tells which host directories exist (no trailing / on a link to one)
    listing = edit(env, command="view", path="/testbed").observation[0]["content"]
    assert "/testbed/d\n" in listing + "\n" and "/testbed/d/" not in listing
    # links that stay inside the workspace still work, as they do in the terminal
    assert "ok" in edit(env, command="view", path="/testbed/good").observation[0]["content"]
    assert "t.txt" in edit(env, command="view", path="/testbed/gooddir").observation[0]["content"]


# ------------------------------------------------------------------------------ 2. reward forgery
def _module0(env) -> tuple[str, str, str]:
    """(package, module of the public function, its name) from the issue's reproduction."""
    first = env.task.reproduce.splitlines()[0]  # from pkg.mod import api
    _, dotted, _, api = first.split()
    return env.task.package, dotted, api


# Each forgery leaves a marker in the workspace (/testbed) from the code that forges, at the moment it
# runs inside the verifier's runner: the test then knows the forging code ran, so "not resolved" means
# the forgery failed, not that it never ran (a runner that stopped importing the planted module would
# leave no marker). The marker is read by the test from the host's workspace, never by the verdict.
MARK = """
def _mark(what):
    with open("/testbed/.forge-{kind}", "a") as fh:
        fh.write(what + "\\n")
"""

FORGERIES = {
    # (a) print a passing report in any format the old runner read, then leave before the runner does
    "exit_early": """
import os, sys
line = sys.argv[1] if len(sys.argv) > 1 else ""
for prefix in (line, "UNIPOST_RESULT_"):
    print(prefix + '{"import_error": null, "tests": 5, "failures": 0, "errors": 0, "details": []}')
sys.stdout.flush()
if "UNIPOST_CHANNEL_FD" in os.environ:
    os.write(int(os.environ["UNIPOST_CHANNEL_FD"]), b'{"import_error": null, "results": []}')
    _mark("wrote a forged reply to the channel")
_mark("exiting early")
os._exit(0)
""",
    # (b) patch the serialiser the runner reports through
    "patch_json": """
import json
_real = json.dumps
def dumps(obj, *a, **k):
    if isinstance(obj, dict) and "failures" in obj:
        obj = dict(obj, failures=0, errors=0)
    if isinstance(obj, dict) and "results" in obj:
        _mark("forged the runner's reply")
        obj = dict(obj, results=[["ok", "list", []] for _ in range(50)])
    return _real(obj, *a, **k)
json.dumps = dumps
""",
    # an object equal to everything, returned by the public function
    "equal_to_all": """
import {dotted} as m
class Anything(list):
    def __eq__(self, other):
        return True
    __hash__ = None
def forged(*a, **k):
    _mark("returned an object equal to everything")
    return Anything()
m.{api} = forged
""",
    # find the expected value in the caller's code constants or locals
    "read_the_caller": """
import sys
import {dotted} as m
_orig = m.{api}
def forged(xs, *a):
    _mark("called by the runner")
    for depth in range(1, 6):
        try:
            frame = sys._getframe(depth)
        except ValueError:
            break
        for c in frame.f_code.co_consts:
            if isinstance(c, tuple) and c and all(type(v) is int for v in c) and list(c) != list(xs):
                return list(c)
    return _orig(xs, *a)
m.{api} = forged
""",
}
FORGERY_MARKS = {  # what each forgery's marker must hold once the verifier ran it
    "exit_early": {"exiting early"},
    "patch_json": {"forged the runner's reply"},
    "equal_to_all": {"returned an object equal to everything"},
    "read_the_caller": {"called by the runner"},
}


@needs_bwrap
@pytest.mark.parametrize("kind", sorted(FORGERIES))
def test_agent_code_cannot_forge_a_passing_verdict(kind):
    env = mk(3)
    try:
        package, dotted, api = _module0(env)
        forgery = FORGERIES[kind].replace("{dotted}", dotted).replace("{api}", api)
        code = MARK.replace("{kind}", kind) + forgery
        r = edit(env, command="create", path=f"/testbed/{package}/zz_forge.py", file_text=code)
        assert not r.tool_error, r.observation
        call(env, "finish", message="done")
        marker = env.workspace / f".forge-{kind}"
        assert not marker.exists(), "the forgery ran before verification"
        outcome = env.verify()
        assert marker.is_file(), f"{kind}: the forging code never ran in the verifier ({outcome})"
        assert FORGERY_MARKS[kind] <= set(marker.read_text().splitlines()), (kind, marker.read_text())
        assert not outcome.resolved and outcome.reward == 0.0, (kind, outcome)
    finally:
        env.close()


@needs_bwrap
def test_expected_values_never_reach_the_sandbox():
    """Package code run by the verifier looks everywhere it can for the hidden tests and their values.

    The spy is told what to look for and reports only where it found it: it used to write everything
    it read to one file, which the sandbox's 8 MiB file-size limit cut (so most of what it read was
    never checked, and a cut inside a UTF-8 character failed the test)."""
    # the walk over the sandbox's whole tree needs more than mk()'s 3 s on a loaded machine
    env = EmbeddedEnv(generate_task("train", 4, "easy"), limits=Limits(timeout_s=30, cpu_s=30))
    env.reset()
    try:
        package, _, _ = _module0(env)
        hidden = env.task.hidden_tests["test_hidden.py"]
        inputs = {ln.split("(", 1)[1].rsplit(")", 1)[0] for ln in hidden.splitlines() if "got = " in ln}
        wants = {
            ln.split("==", 1)[1].split(', f"', 1)[0].strip() for ln in hidden.splitlines() if "got ==" in ln
        }
        assert wants - inputs, "every expected value is also an input: the check below would be empty"
        needles = ["assert got", "test_hidden", *sorted(wants - inputs)]
        spy = f"""
import json, os
NEEDLES = [n.encode() for n in {needles!r}]
hits, scanned = [], 0

def look(where, data):
    hits.extend([where, n.decode()] for n in NEEDLES if n in data)

for top in ("/hidden", "/tmp", "/testbed", "/proc/self", "/"):
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "usr", "dev")]
        for name in files:
            path = os.path.join(root, name)
            if name == "spy.txt" or name.startswith("zz_spy"):  # itself (its .pyc holds the needles)
                continue
            try:
                with open(path, "rb") as fh:
                    look(path, fh.read(200000))
                scanned += 1
            except OSError:
                pass
look("environ", " ".join(os.environ.values()).encode())
with open("/testbed/spy.txt", "w") as fh:
    json.dump({{"scanned": scanned, "hits": hits}}, fh)
"""
        edit(env, command="create", path=f"/testbed/{package}/zz_spy.py", file_text=spy)
        call(env, "finish", message="done")
        env.verify()
        report = json.loads((env.workspace / "spy.txt").read_text())
        assert report["scanned"] > 50, report  # it did walk the sandbox's tree
        assert report["hits"] == [], report["hits"][:10]
    finally:
        env.close()


@needs_bwrap
def test_a_real_fix_is_still_resolved_and_the_bug_is_not():
    env = mk(3)
    try:
        call(env, "finish", message="nothing changed")
        assert not env.verify().resolved
        env.reset()
        for rel, text in env.task.fixed_files.items():
            (env.workspace / rel).write_text(text)
        call(env, "finish", message="fixed")
        assert env.verify().resolved
    finally:
        env.close()


# ------------------------------------------------------------------------------ 3. host hang
def _within(seconds: float, fn):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised below, in the test's thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"blocked for more than {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@needs_bwrap
def test_special_files_never_block_the_host(env):
    package = env.task.package
    sh(env, f"mkfifo /testbed/fifo /testbed/{package}/zz.py && mkdir /testbed/d && mkfifo /testbed/d/q")
    for action in (
        dict(command="view", path="/testbed/fifo"),
        dict(command="view", path="/testbed/fifo", view_range=[1, 2]),
        dict(command="str_replace", path="/testbed/fifo", old_str="a", new_str="b"),
        dict(command="insert", path="/testbed/fifo", insert_line=0, new_str="b"),
        dict(command="undo_edit", path="/testbed/fifo"),
        dict(command="create", path="/testbed/fifo", file_text="x"),
    ):
        r = _within(5, lambda a=action: edit(env, **a))
        assert r.tool_error, action
    assert (
        "/testbed/d/q"
        in _within(5, lambda: edit(env, command="view", path="/testbed/d")).observation[0]["content"]
    )
    call(env, "finish", message="done")
    outcome = _within(20, env.verify)  # the verifier reads the workspace too
    assert not outcome.resolved


# ------------------------------------------------------------------------------ 5. host memory
@needs_bwrap
def test_huge_output_is_read_as_a_bounded_stream(tmp_path):
    """150 MB of output must not raise the host's peak memory by more than a few MB."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import resource, sys\n"
        "from unipost.envs.embedded import EmbeddedEnv, Limits, generate_task, tool_call_message\n"
        "env = EmbeddedEnv(generate_task('train', 0, 'easy'), limits=Limits(timeout_s=20, cpu_s=20))\n"
        "env.reset()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "cmd = \"head -c 150000000 /dev/zero | tr '\\\\0' a\"\n"
        "r = env.step(tool_call_message('', 'terminal', {'command': cmd}, 'c'))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "env.close()\n"
        "print(after - before, len(r.observation[0]['content']))\n"
    )
    import subprocess
    import sys

    import unipost

    here = str(Path(unipost.__file__).resolve().parents[1])  # the unipost under test, in the child too
    env = dict(os.environ, PYTHONPATH=here)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    grown_kib, shown = map(int, out.stdout.split())
    assert grown_kib < 64 * 1024, f"peak RSS grew by {grown_kib} KiB"
    assert shown <= 4000 + 200


# ------------------------------------------------------------------------------ 6. malformed actions
DEEP = 5000


def _deep_actions():
    deep_list: list = []
    cursor = deep_list
    for _ in range(DEEP):
        cursor.append([])
        cursor = cursor[0]
    deep_json = "[" * DEEP + "]" * DEEP
    return {
        "arguments_text": {
            "tool_calls": [{"id": "c", "function": {"name": "terminal", "arguments": deep_json}}]
        },
        "argument_value": {
            "tool_calls": [{"id": "c", "function": {"name": "terminal", "arguments": {"command": deep_list}}}]
        },
        "arguments_object": {
            "tool_calls": [{"id": "c", "function": {"name": "terminal", "arguments": deep_list}}]
        },
        "call_id": {
            "tool_calls": [{"id": deep_list, "function": {"name": "think", "arguments": {"thought": "x"}}}]
        },
        "name": {"tool_calls": [{"id": "c", "function": {"name": deep_list, "arguments": {}}}]},
        "call_itself": {"tool_calls": [deep_list]},
        "content": {"role": "assistant", "content": deep_list},
        "not_a_dict": deep_list,
        "json_in_string": {
            "tool_calls": [
                {"id": "c", "function": {"name": "terminal", "arguments": '{"command": ' + deep_json + "}"}}
            ]
        },
    }


@pytest.mark.parametrize("kind", sorted(_deep_actions()))
def test_deeply_nested_actions_are_error_observations(env, kind):
    result = env.step(_deep_actions()[kind])
    assert result.tool_error and not result.done
    json.dumps(result.observation)  # storable
    assert "hello" in sh(env, "echo hello")  # the episode goes on


@pytest.mark.parametrize("style", ["hermes", "qwen3_coder"])
def test_deeply_nested_model_text_never_raises(style):
    from unipost.envs.embedded import tool_schemas
    from unipost.rendering import parse_assistant

    deep = "[" * DEEP + "]" * DEEP
    texts = [
        '<tool_call>\n{"name": "terminal", "arguments": ' + deep + "}\n</tool_call>",
        '<tool_call>\n{"name": "terminal", "arguments": {"command": ' + deep + "}}\n</tool_call>",
        '<tool_call>\n{"name": "terminal", "arguments": "' + deep + '"}\n</tool_call>',
        "<tool_call>\n<function=terminal>\n<parameter=command>\n"
        + deep
        + "\n</parameter>\n</function>\n</tool_call>",
        "<tool_call>\n<function=file_editor>\n<parameter=view_range>\n" + deep + "\n</parameter>\n"
        "</function>\n</tool_call>",
        "<tool_call>\n<function=think>\n<parameter=x>\n" + "(" * DEEP + ")" * DEEP + "\n</parameter>\n"
        "</function>\n</tool_call>",
    ]
    for tools in (None, tool_schemas()):
        for text in texts:
            parsed = parse_assistant(text, style, tools=tools)
            json.dumps(parsed.message)


@pytest.mark.parametrize(
    "args",
    [
        {"command": "view", "path": "/testbed", "view_range": [True, False]},
        {"command": "view", "path": "/testbed/x\x00y"},
        {"command": "view", "path": 7},
        {"command": "insert", "path": "/testbed/a", "insert_line": 1.5, "new_str": "x"},
        {"command": "insert", "path": "/testbed/a", "insert_line": True, "new_str": "x"},
        {"command": "create", "path": "/testbed/a", "file_text": "x" * 2_000_000},
        {"command": "create", "path": "/testbed/\udcff", "file_text": "x"},
        {"command": "create", "path": "/testbed/a", "file_text": "\ud800"},
        {"command": "view", "path": "/testbed", "view_range": list(range(100))},
        {"command": "rm", "path": "/testbed"},
        {"command": None, "path": "/testbed"},
        {"command": "view", "path": "/testbed", "extra": 1},
    ],
    ids=lambda a: repr(a)[:60],
)
def test_every_argument_is_checked_against_its_schema(env, args):
    result = edit(env, **args)
    assert result.tool_error, result.observation
    json.dumps(result.observation, ensure_ascii=False).encode("utf-8")


# ------------------------------------------------------------------------------ 4. lost rollouts
class PoisonPolicy:
    """Student whose actions the environment echoes back as text a UTF-8 store cannot hold."""

    name = "poison"
    white_box = False

    def __init__(self, kinds: dict[int, str]):
        self.kinds = kinds  # episode (task index) -> poison

    def act(self, states, *, greedy=False):
        from unipost.data import PolicyOutput

        outs = []
        for state in states:
            kind = self.kinds.get(state.env.task.index, "clean")
            if state.turn == 0 and kind == "undecodable_name":
                message = tool_call_message(
                    "", "terminal", {"command": "touch $'/testbed/bad\\xff\\xfe'"}, "c"
                )
            elif state.turn == 1 and kind == "undecodable_name":
                message = tool_call_message("", "file_editor", {"command": "view", "path": "/testbed"}, "c")
            elif state.turn == 0 and kind == "surrogate_action":
                message = {"role": "assistant", "content": "lone \udcff surrogate \ud800"}
            elif state.turn == 0 and kind == "deep_action":
                deep: list = []
                for _ in range(3000):
                    deep = [deep]
                message = {"role": "assistant", "content": "", "tool_calls": [{"id": "x", "function": deep}]}
            else:
                message = tool_call_message("", "finish", {"message": "done"}, "f")
            outs.append(PolicyOutput(message=message))
        return outs


@needs_bwrap
@pytest.mark.parametrize("kind", ["undecodable_name", "surrogate_action", "deep_action"])
def test_a_poisoned_episode_never_loses_the_others(tmp_path, kind):
    from unipost.objective import OwnSamples, Recipe, StudentRollout
    from unipost.rollout.engine import RolloutEngine
    from unipost.rollout.store import TrajectoryStore, load

    engine = RolloutEngine(
        lambda task: EmbeddedEnv.from_split(*task, limits=Limits(timeout_s=3, cpu_s=3)),
        student=PoisonPolicy({1: kind}),
        teacher=None,
        recipe=Recipe(StudentRollout(), OwnSamples()),
        max_turns=4,
        concurrency=3,
        progress=False,
    )
    tasks = [("train", i, "easy") for i in range(3)]
    path = tmp_path / "store.jsonl"
    with TrajectoryStore(path) as store:
        batch = engine.collect(tasks, 0, store=store)
        quarantined = store.quarantined
    assert len(batch.trajectories) == 3
    stored = load(path).trajectories
    assert quarantined == 0 and len(stored) == 3  # every trajectory is stored, none is lost
    assert sorted(t.task_id for t in stored) == sorted(t.task_id for t in batch.trajectories)
    poisoned = next(t for t in stored if t.task_id == batch.trajectories[1].task_id)
    if kind == "undecodable_name":  # the listing names the file with escapes, the host's bytes kept
        assert "/testbed/bad\\xff\\xfe" in poisoned.turns[1].observation[0]["content"]
    elif (
        kind == "surrogate_action"
    ):  # the store escapes lone surrogates (\\xXX for an escaped byte, else \\uXXXX)
        assert poisoned.turns[0].action["content"] == "lone \\xff surrogate \\ud800"
    else:  # a part nested deeper than any serializer goes is stored as a marker, the rest as it was
        assert "nested deeper than 64 levels" in poisoned.model_dump_json()
        assert poisoned.turns[0].tool_error and len(poisoned.turns) >= 1


def _record(i: int):
    from unipost.data import Outcome, Trajectory

    return Trajectory(task_id=f"t{i}", prompt=[{"role": "user", "content": f"issue {i}"}], outcome=Outcome())


@pytest.mark.parametrize(
    "tail",
    [
        b"garbage\nmore garbage\n",  # two complete garbage lines
        b'{"task_id": "x"}\n',  # a complete, valid-JSON but invalid record as the last line
        b'{"task_id": "t9", "prompt": [',  # a torn write
        b"garbage\n" + b"X" * 10 + b"\n\n",
    ],
)
def test_reopen_never_counts_garbage_and_never_deletes_a_line(tmp_path, tail, caplog):
    from unipost.rollout.store import TrajectoryStore, load

    path = tmp_path / "s.jsonl"
    with TrajectoryStore(path) as store:
        store.extend([_record(0), _record(1)])
    good = path.read_bytes()
    with path.open("ab") as fh:
        fh.write(tail)
    with TrajectoryStore(path) as store:
        assert len(store) == 2
        store.append(_record(2))
    assert [t.task_id for t in load(path).trajectories] == ["t0", "t1", "t2"]
    assert path.read_bytes().startswith(good)
    corrupt = path.with_name(path.name + ".corrupt")
    assert corrupt.read_bytes() == tail  # moved, byte for byte, not deleted
    assert "corrupt" in caplog.text


# ------------------------------------------------------------------------------ partial items
@needs_bwrap
def test_observations_name_only_testbed_paths(env):
    host = str(env.workspace)
    texts = [
        sh(env, "cat /proc/self/mountinfo; cat /proc/mounts; readlink -f /proc/self/cwd; pwd -P"),
        sh(env, "python3 -c \"import os; print(os.getcwd(), os.path.realpath('.'))\""),
        sh(env, "ls -la /testbed/nope; cd /nonexistent"),
        sh(env, "findmnt 2>/dev/null; df 2>/dev/null | tail -3"),
    ]
    sh(env, "mkdir -p /testbed/dir && mkfifo /testbed/p")
    for args in (
        dict(command="view", path="/testbed/dir/missing.txt"),
        dict(command="create", path="/testbed/dir", file_text="x"),
        dict(command="create", path="/testbed/p/x", file_text="x"),
        dict(command="view", path="/testbed/p"),
        dict(command="str_replace", path="/testbed/dir", old_str="a", new_str="b"),
        dict(command="insert", path="/testbed/dir/../dir", insert_line=0, new_str="b"),
        dict(command="view", path="/testbed", view_range=[1, 2]),
    ):
        texts.append(edit(env, **args).observation[0]["content"])
    for text in texts:
        assert host not in text and "unipost-ws-" not in text, text


def test_damaged_checkpoint_manifests_are_skipped_not_raised(tmp_path):
    from unipost.train.checkpoint import CheckpointManager

    root = tmp_path / "ckpt"
    ok = {n: {"size": 2, "sha256": "x"} for n in ("state.json", "model.safetensors", "rng.pt")}
    bad_manifests = [
        {"iteration": 1, "files": {"state.json": 5, "model.safetensors": None, "rng.pt": []}},
        {"iteration": 2, "files": {**ok, "/etc/passwd": {"size": 1, "sha256": "x"}}},
        {"iteration": 3, "files": {**ok, "../../x": {"size": 1}}},
        {"iteration": 4, "files": []},
        ["not", "an", "object"],
        "a string",
    ]
    for i, manifest in enumerate(bad_manifests, start=1):
        d = root / f"iter-{i:06d}"
        d.mkdir(parents=True)
        for name in ("state.json", "model.safetensors", "rng.pt"):
            (d / name).write_text("{}")
        (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="no valid checkpoint"):
        assert CheckpointManager(root).latest() is None  # every one is invalid; none raises


@pytest.mark.parametrize(
    "state",
    [
        {"runs": [{"name": "a"}, {"name": "b", "api_key": "sk-live-123456789"}]},
        {"endpoints": ["https://user:hunter2hunter2@example.com/v1"]},
        {"argv": ["unipost", "train", "--api-key", "sk-live-123456789"]},
        {"argv": ["unipost", "train", "--teacher-token=hf_abcdefghijklmnop"]},
        {"headers": "Authorization: Bearer abcdefghijklmnop"},
        {"nested": [[{"Authorization": "Basic dXNlcjpwYXNz"}]]},
    ],
    ids=["key-in-list", "url-userinfo", "argv-flag", "argv-equals", "auth-header", "auth-in-lists"],
)
def test_one_credential_check_for_checkpoints_and_metrics(state):
    from unipost.train.checkpoint import check_no_secrets

    with pytest.raises(ValueError, match="credential"):
        check_no_secrets(state)


def test_configuration_that_only_mentions_credentials_is_fine():
    from unipost.train.checkpoint import check_no_secrets

    check_no_secrets(
        {
            "api_key_env": "OPENAI_API_KEY",
            "eos_token": "<|im_end|>",
            "max_tokens": 512,
            "token": None,
            "base_url": "http://localhost:8000/v1",
            "argv": ["unipost", "train", "--config", "c.json"],
        }
    )


def test_a_key_echoed_base64_never_reaches_errors_logs_or_the_store(tmp_path, caplog):
    """A server that echoes the key back, plainly and base64-encoded (alone and inside a Basic blob)."""
    import base64
    import logging
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from unipost.data import Trajectory
    from unipost.rollout.openai_policy import OpenAIChatPolicy, TeacherRequestError
    from unipost.rollout.store import TrajectoryStore

    key = "sk-attack-" + secrets.token_hex(12)
    forms = [
        key,
        base64.b64encode(key.encode()).decode(),
        base64.b64encode(f"user:{key}".encode()).decode(),
        base64.urlsafe_b64encode(f"xy{key}z".encode()).decode(),
    ]

    received: list[tuple[str, str | None]] = []  # (path, Authorization header) of each request

    class Echo(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            received.append((self.path, self.headers.get("Authorization")))
            body = json.dumps(
                {"error": {"message": " | ".join(forms), "auth": self.headers.get("Authorization")}}
            )
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        do_GET = do_POST = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    caplog.set_level(logging.DEBUG)
    texts = []
    try:
        policy = OpenAIChatPolicy(
            f"http://127.0.0.1:{server.server_port}/v1", "m", api_key=key, max_retries=0
        )
        with pytest.raises(TeacherRequestError) as err:
            policy.check()
        texts += [str(err.value), repr(err.value)]
        policy.close()
    finally:
        server.shutdown()
    # the error is the server's answer, not a failure before it: the key went out, the server echoed it
    # back with HTTP 400, and the message carries that answer with every form of the key masked
    assert received == [("/v1/models", f"Bearer {key}")], received
    message = str(err.value)
    assert "HTTP 400" in message and "/v1/models" in message, message
    assert message.count("***") >= len(forms), message  # the echoed forms are in it, masked
    traj = Trajectory(task_id="t", prompt=[{"role": "user", "content": "server said: " + " ".join(forms)}])
    with TrajectoryStore(tmp_path / "s.jsonl") as store:
        store.append(traj)
    texts.append((tmp_path / "s.jsonl").read_text())
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        for form in forms:
            assert form not in text
        assert key[10:] not in text


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_swe_grading_removes_the_agents_import_hooks(tmp_path):
    """conftest.py / sitecustomize.py / usercustomize.py / *.pth the agent added are removed and the
    tracked ones it edited restored before the tests run (a conftest hook can mark every test passed)."""
    import subprocess
    from types import SimpleNamespace

    from unipost.envs.swe.grading import reset_test_files_commands

    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "conftest.py").write_text("# the repo's own\n")
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("*.pth\nbuild/\n")
    git = ["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    base = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    hook = "def pytest_runtest_makereport(item, call):\n    pass  # forge\n"
    (repo / "conftest.py").write_text(hook)
    (repo / "pkg" / "conftest.py").write_text(hook)
    (repo / "sitecustomize.py").write_text("import os\n")
    (repo / "pkg" / "usercustomize.py").write_text("import os\n")
    (repo / "evil.pth").write_text("import os\n")  # ignored by .gitignore: still removed
    (repo / "build").mkdir()
    (repo / "build" / "conftest.py").write_text(hook)
    (repo / "pkg" / "mod.py").write_text("x = 2\n")  # the agent's actual fix stays
    (repo / "weird name conftest.py").write_text("kept: not a hook name\n")
    instance = SimpleNamespace(base_commit=base, test_patch="")
    lines = [ln for ln in reset_test_files_commands(instance, str(repo)) if "--global" not in ln]
    subprocess.run(["bash", "-c", "\n".join(lines)], check=True)
    assert (repo / "conftest.py").read_text() == "# the repo's own\n"
    for gone in (
        "pkg/conftest.py",
        "sitecustomize.py",
        "pkg/usercustomize.py",
        "evil.pth",
        "build/conftest.py",
    ):
        assert not (repo / gone).exists(), gone
    assert (repo / "pkg" / "mod.py").read_text() == "x = 2\n"
    assert (repo / "weird name conftest.py").exists()


# ------------------------------------------------------------------------------ fuzzing and soak
try:  # the dev extra installs hypothesis; without it only the fuzz test is skipped
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

if st is not None:
    _TOOL_TEXT = st.one_of(
        st.text(max_size=300),
        st.builds(
            lambda name, args: (
                '<tool_call>\n{"name": "' + name + '", "arguments": ' + args + "}\n</tool_call>"
            ),
            st.sampled_from(["terminal", "file_editor", "think", "finish", "x"]),
            st.one_of(
                st.text(max_size=200),
                st.recursive(
                    st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), st.text(max_size=20)),
                    lambda inner: (
                        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
                    ),
                    max_leaves=20,
                ).map(lambda v: json.dumps(v)),
            ),
        ),
        st.builds(
            lambda name, key, value: (
                f"<tool_call>\n<function={name}>\n<parameter={key}>\n{value}\n</parameter>\n"
                "</function>\n</tool_call>"
            ),
            st.sampled_from(["terminal", "file_editor", "think"]),
            st.sampled_from(["command", "path", "timeout", "view_range", "insert_line", "x"]),
            st.text(max_size=100),
        ),
    )

    @needs_bwrap
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=_TOOL_TEXT, style=st.sampled_from(["hermes", "qwen3_coder"]))
    def test_fuzzed_tool_call_text_never_raises_and_is_storable(text, style):
        from unipost.data import Trajectory, Turn
        from unipost.envs.embedded import tool_schemas
        from unipost.rendering import parse_assistant
        from unipost.rollout.store import encode

        env = _FUZZ_ENV.get("env")
        if env is None:
            env = _FUZZ_ENV["env"] = mk(7)
        parsed = parse_assistant(text, style, tools=tool_schemas(), max_calls=1)
        result = env.step(parsed.message)
        if result.done:
            env.reset()
        turn = Turn(index=0, executor="student", action=parsed.message, observation=result.observation)
        encode(Trajectory(task_id="fuzz", prompt=[{"role": "user", "content": text}], turns=[turn]))
else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis is not installed (pip install -e '.[dev]')")
    def test_fuzzed_tool_call_text_never_raises_and_is_storable():
        pass


_FUZZ_ENV: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _close_fuzz_env():
    yield
    if _FUZZ_ENV.get("env") is not None:
        _FUZZ_ENV["env"].close()


@needs_bwrap
@pytest.mark.slow
def test_soak_quick():
    """benchmarks/soak_env.py --quick: a hostile policy through RolloutEngine, then the host is checked.

    ~10 s, but marked slow: it counts every live process of any sandbox uid on the machine as an orphan,
    so it must run alone (the default suite's other xdist worker runs sandboxes of its own). Run by the
    opt-in CI job scripts/ci-optional/40-slow.sh, after the default suite."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_env.py"
    spec = importlib.util.spec_from_file_location("soak_env", path)
    soak_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak_env)
    result = soak_env.soak(40)
    assert result["returned"] == 40 and result["lost"] == 0 and result["bad_lines"] == 0, result
    assert result["resolved (forged)"] == 0 and result["host_effects"] == 0 and result["orphans"] == 0, result
    assert result["rss_growth_mib"] < 200, result
