"""Sandbox: escapes are stopped with a clear observation and the host is left untouched.

Every attack goes through ``EmbeddedEnv.step`` as a model's tool call would, and the host is checked
afterwards (files that must not exist, processes that must not survive).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
import warnings
from pathlib import Path

import pytest

from unipost.envs.embedded import (
    EmbeddedEnv,
    Limits,
    Sandbox,
    SandboxUnavailableError,
    generate_task,
    play_expert,
    tool_call_message,
)

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
pytestmark = pytest.mark.sandbox


@pytest.fixture()
def env():
    limits = Limits(timeout_s=3.0, cpu_s=3, file_bytes=1 << 20, max_processes=32)
    e = EmbeddedEnv(generate_task("train", 0, "easy"), limits=limits)
    e.reset()
    yield e
    e.close()


def run(env, command: str) -> str:
    result = env.step(tool_call_message("", "terminal", {"command": command}, "c"))
    return result.observation[0]["content"]


def edit(env, **args):
    return env.step(tool_call_message("", "file_editor", args, "c"))


def _uid(env) -> int:
    """The uid the sandboxed commands run as (their own when the tests run as root)."""
    drop = env.sandbox._drop_to
    return os.getuid() if drop is None else drop


def _sandbox_processes(uid: int) -> list[int]:
    """Live (non-zombie) processes of ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        pids.append(int(entry))
            except (OSError, IndexError):
                pass
    return pids


def _settles_to(uid: int, count: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while len(_sandbox_processes(uid)) > count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@needs_bwrap
def test_host_files_are_invisible(env):
    out = run(env, "cat /etc/passwd; ls /root /home")
    assert "No such file or directory" in out and "root:x:0:0" not in out
    for path in ("/etc/passwd", "/testbed/../etc/passwd", "/root/.bashrc"):
        r = edit(env, command="view", path=path)
        assert r.tool_error and "Only paths inside /testbed" in r.observation[0]["content"]
    # a symlink planted from the terminal must not let the host-side editor read outside the workspace
    run(env, "ln -s /etc/passwd /testbed/leak && ln -s / /testbed/rootdir")
    for path in ("/testbed/leak", "/testbed/rootdir/etc/passwd"):
        r = edit(env, command="view", path=path)
        assert r.tool_error and "root:x:0:0" not in r.observation[0]["content"]


@needs_bwrap
def test_writes_outside_the_workspace_do_not_reach_the_host(env):
    tag = secrets.token_hex(4)
    parent = env.workspace.parent
    out = run(
        env, f"echo x > /usr/unipost_{tag}; echo y > /tmp/unipost_{tag}; echo z > ../unipost_{tag}; echo ok"
    )
    assert "Read-only file system" in out and "ok" in out
    assert not Path(f"/usr/unipost_{tag}").exists()
    assert not Path(f"/tmp/unipost_{tag}").exists()
    assert not (parent / f"unipost_{tag}").exists()
    for path in (f"/tmp/unipost_{tag}", f"/testbed/../unipost_{tag}"):
        r = edit(env, command="create", path=path, file_text="x")
        assert r.tool_error and "Only paths inside /testbed" in r.observation[0]["content"]
    assert not Path(f"/tmp/unipost_{tag}").exists() and not (parent / f"unipost_{tag}").exists()


@needs_bwrap
def test_fork_bomb_is_contained(env):
    before = len(_sandbox_processes(_uid(env)))
    start = time.monotonic()
    out = run(env, "bomb() { bomb | bomb & }; bomb; sleep 1; echo survived")
    assert time.monotonic() - start < 15
    assert "Resource temporarily unavailable" in out or "timed out" in out
    assert _settles_to(_uid(env), before)  # nothing of the bomb outlives the call
    assert "hello" in run(env, "echo hello")  # the environment still works


@needs_bwrap
def test_disk_filling_is_stopped_by_the_file_size_limit(env):
    out = run(env, "head -c 50000000 /dev/zero > /testbed/big; ls -l /testbed/big")
    assert "File size limit exceeded" in out
    assert (env.workspace / "big").stat().st_size <= 1 << 20


@needs_bwrap
def test_runaway_command_times_out_and_is_killed(env):
    start = time.monotonic()
    out = run(env, "sleep 600")
    assert time.monotonic() - start < 10
    assert "[The command timed out after 3 seconds and was killed.]" in out
    if env.sandbox._drop_to is not None:  # root: the sandbox has its own uid, which must be empty now
        assert _settles_to(_uid(env), 0)
    out = run(env, "python3 -c 'while True: pass'")  # CPU-bound: the CPU limit or the timeout stops it
    assert "exit code 0" not in out


@needs_bwrap
def test_no_network_and_memory_limit(env):
    out = run(env, "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)\"")
    assert "Network is unreachable" in out
    out = run(env, 'python3 -c "b = bytearray(3 << 30)"')
    assert "MemoryError" in out


@needs_bwrap
def test_environment_is_scrubbed(env, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unipost-secret")
    out = run(env, "env")
    assert "sk-unipost-secret" not in out and "OPENAI_API_KEY" not in out
    assert "HOME=/testbed" in out


def test_missing_bwrap_refuses_unless_unsafe_local(tmp_path, monkeypatch):
    monkeypatch.delenv("UNIPOST_UNSAFE_LOCAL", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailableError, match="bubblewrap"):
        Sandbox(tmp_path)
    with pytest.warns(RuntimeWarning, match="UNSAFE LOCAL MODE"):
        sb = Sandbox(tmp_path, unsafe_local=True)
    assert sb.run("pwd").output.strip() == "/testbed"  # paths are translated even here
    monkeypatch.setenv("UNIPOST_UNSAFE_LOCAL", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Sandbox(tmp_path)
    assert any("UNSAFE LOCAL MODE" in str(w.message) for w in caught)


def test_unsafe_local_mode_still_runs_whole_episodes(monkeypatch):
    """Without bwrap (opted in), paths are translated so the expert and the verifier still work."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        traj = play_expert(generate_task("heldout", 1, "hard"), perturb=2, unsafe_local=True)
    assert traj.outcome.resolved, traj.outcome
