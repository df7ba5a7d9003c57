"""Issue 21 (second round): the sandbox bounds what an agent can write, hides the answer key, and
never binds the host workspace into the agent's namespace.

Every test plays the agent through ``EmbeddedEnv.step`` (or feeds the host's copy-out a hostile
stream directly) and checks the host afterwards. Each failed on the code before the fix.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

import unipost
from unipost.envs.embedded import EmbeddedEnv, Limits, generate_task, play_expert, tool_call_message
from unipost.envs.embedded import sandbox as sandbox_mod

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
pytestmark = [pytest.mark.sandbox, needs_bwrap]

MiB = 1 << 20


def mk(**limits) -> EmbeddedEnv:
    base = dict(timeout_s=10.0, cpu_s=10, file_bytes=4 * MiB, workspace_bytes=16 * MiB, workspace_inodes=500)
    env = EmbeddedEnv(generate_task("train", 0, "easy"), limits=Limits(**(base | limits)))
    env.reset()
    return env


@pytest.fixture()
def env():
    e = mk()
    yield e
    e.close()


def step(env, tool: str, **args):
    return env.step(tool_call_message("", tool, args, "c"))


def sh(env, command: str, **extra) -> str:
    return step(env, "terminal", command=command, **extra).observation[0]["content"]


def usage(root: Path) -> tuple[int, int]:
    """(bytes, entries) under a host directory, without following links."""
    total = count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size
            count += 1
    return total, count


# ------------------------------------------------------------------------------ 1. size bounds
def test_many_files_cannot_grow_the_workspace_past_its_bound(env):
    """The issue's reproduction, scaled to a 16 MiB bound: the per-file limit alone let it grow."""
    before = (env.workspace / "README.md").exists(), sorted(p.name for p in env.workspace.iterdir())
    cmd = "for i in $(seq 12); do head -c 3000000 /dev/zero > /testbed/f$i.bin; done; echo finished"
    out = sh(env, cmd)
    assert "No space left on device" in out and "finished" in out
    assert usage(env.workspace)[0] <= 16 * MiB
    # the episode goes on; the task's files are still there
    assert "hello" in sh(env, "echo hello")
    assert set(before[1]) <= {p.name for p in env.workspace.iterdir()}


def test_sparse_files_that_would_exceed_the_bound_on_the_host_are_refused(env):
    """Sparse files take no tmpfs pages but would take real ones on the host: the copy-out refuses the
    whole command's changes with an ERROR observation, and the previous workspace stays."""
    sh(env, "echo keep > /testbed/kept.txt")
    r = step(
        env,
        "terminal",
        command="echo new > /testbed/new.txt; for i in $(seq 8); do truncate -s 4M /testbed/s$i; done",
    )
    text = r.observation[0]["content"]
    assert r.tool_error and text.startswith("ERROR:") and "workspace" in text.lower(), text
    assert not (env.workspace / "new.txt").exists() and not (env.workspace / "s1").exists()
    assert (env.workspace / "kept.txt").read_text() == "keep\n"
    assert usage(env.workspace)[0] <= 16 * MiB
    assert "keep" in sh(env, "cat /testbed/kept.txt")  # the episode continues


def test_the_inode_bound_refuses_a_copy_out_with_too_many_files(env):
    r = step(
        env,
        "terminal",
        command="mkdir /testbed/many && cd /testbed/many && seq 1 800 | xargs touch; echo made",
    )
    text = r.observation[0]["content"]
    assert r.tool_error and "made" in text and "500" in text, text
    assert not (env.workspace / "many").exists()
    assert usage(env.workspace)[1] <= 500
    assert not step(env, "terminal", command="ls /testbed").tool_error


def test_scratch_space_is_bounded_and_the_root_is_read_only():
    env = mk(tmp_bytes=4 * MiB)
    try:
        out = sh(env, "for i in $(seq 8); do head -c 1000000 /dev/zero > /tmp/f$i; done; du -sk /tmp")
        assert "No space left on device" in out
        kib = int(re.findall(r"^(\d+)\s+/tmp$", out, re.M)[-1])
        assert kib <= 4 * 1024
        out = sh(env, "echo x > /x; mkdir /y; echo x > /dev/x; echo x > /dev/shm/x; ls / /dev")
        assert out.count("Read-only file system") >= 3 and "No such file" not in out.split("\n")[0]
    finally:
        env.close()


def test_the_file_editor_respects_the_workspace_bound():
    env = mk(workspace_bytes=2 * MiB)
    big = "x" * 600_000
    created = 0
    for i in range(6):  # 6 x 600 KB > 2 MiB
        r = step(env, "file_editor", command="create", path=f"/testbed/big{i}.txt", file_text=big)
        if r.tool_error:
            assert "workspace" in r.observation[0]["content"].lower(), r.observation
            assert not (env.workspace / f"big{i}.txt").exists()
            break
        created += 1
    env.close()
    assert 1 <= created < 6
    env2 = mk(workspace_inodes=40)
    try:
        errors = [
            step(env2, "file_editor", command="create", path=f"/testbed/d{i}/f.txt", file_text="x").tool_error
            for i in range(40)
        ]
        assert any(errors) and usage(env2.workspace)[1] <= 40
    finally:
        env2.close()


# ------------------------------------------------------------------------------ copy-out semantics
def test_state_persists_between_commands_as_before(env):
    sh(
        env,
        "mkdir -p /testbed/sub && cd /testbed/sub && echo hi > a.txt && ln -s a.txt link && ln a.txt hard",
    )
    sh(env, "mkfifo /testbed/sub/fifo && chmod +x /testbed/sub/a.txt && ln -s /etc/passwd /testbed/sub/abs")
    assert "/testbed/sub" in sh(env, "pwd")  # the cwd persists
    sub = env.workspace / "sub"
    assert (sub / "a.txt").read_text() == "hi\n" and os.access(sub / "a.txt", os.X_OK)
    assert os.readlink(sub / "link") == "a.txt" and os.readlink(sub / "abs") == "/etc/passwd"
    assert (sub / "hard").stat().st_nlink == 1 and (sub / "hard").read_text() == "hi\n"  # no hard links
    assert (sub / "fifo").is_fifo()
    r = step(env, "file_editor", command="str_replace", path="/testbed/sub/a.txt", old_str="hi", new_str="ho")
    assert not r.tool_error
    assert "ho" in sh(env, "cat a.txt")


def test_a_timed_out_command_still_copies_out_and_leaves_no_process(env):
    out = sh(
        env, "echo before > /testbed/t.txt; (sleep 0.5; echo late > /testbed/late.txt) & sleep 100", timeout=2
    )
    assert "timed out" in out
    assert (env.workspace / "t.txt").read_text() == "before\n"
    assert "late" in sh(env, "cat /testbed/late.txt")


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


HOSTILE = {
    "dotdot": [(_info("../escaped"), b"x")],
    "absolute": [(_info("/tmp/escaped"), b"x")],
    "hardlink": [(_info("a"), b"x"), (_info("h", tarfile.LNKTYPE, "/etc/passwd"), b"")],
    "device": [(_info("dev", tarfile.CHRTYPE), b"")],
    "through_symlink": [(_info("d", tarfile.SYMTYPE, "/tmp"), b""), (_info("d/escaped"), b"x")],
    "file_as_parent": [(_info("f"), b"x"), (_info("f/escaped"), b"x")],
    "duplicate": [(_info("a"), b"x"), (_info("a", tarfile.SYMTYPE, "/etc/passwd"), b"")],
    "too_many": [(_info(f"n{i}"), b"") for i in range(600)],
    "too_big": [(_info(f"b{i}"), b"\0" * (3 * MiB)) for i in range(7)],
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_copy_out_stream_changes_nothing(env, kind, tmp_path):
    """The copy-out stream is agent-influenced: anything ``tar -c`` of a tmpfs would not produce, or
    over the bounds, is refused as a whole; the workspace stays as it was and nothing lands outside."""
    before = sorted(p.name for p in env.workspace.iterdir())
    data = _tar(HOSTILE[kind])
    error = env.sandbox._adopt(io.BytesIO(data))
    assert error, kind
    assert sorted(p.name for p in env.workspace.iterdir()) == before
    assert not Path("/tmp/escaped").exists() and not (env.workspace.parent / "escaped").exists()
    # truncated streams (a copy-out killed midway) are refused too
    assert env.sandbox._adopt(io.BytesIO(_tar([(_info("ok"), b"x" * 5000)])[:1024]))


# ------------------------------------------------------------------------------ 2. the answer key
def _sandbox_site_dirs() -> list[str]:
    """Where the sandbox's python3 (PATH order of the sandbox) looks for third-party packages."""
    py = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    assert py is not None
    out = subprocess.run(
        [py, "-c", "import site; print('\\n'.join(site.getsitepackages()))"], capture_output=True, text=True
    )
    return [d for d in out.stdout.split() if d.startswith("/usr/")]


def test_unipost_installed_system_wide_is_invisible_in_the_sandbox():
    site_dir = Path(_sandbox_site_dirs()[0])
    created_dir = not site_dir.exists()
    copy = site_dir / "unipost"
    assert not copy.exists(), f"{copy} exists already; refusing to touch it"
    src = Path(unipost.__file__).resolve().parent
    try:
        site_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
        env = mk()
        try:
            out = sh(env, "cd / && python3 -c 'import unipost, sys; print(\"LEAKED\", unipost.__file__)'")
            assert "LEAKED" not in out and "ModuleNotFoundError" in out, out
            out = sh(env, f"cat {copy}/envs/embedded/tasks.py | head -3; echo done")
            assert "import" not in out and "done" in out, out
            for d in _sandbox_site_dirs() + [str(p) for p in Path("/usr").glob("*/python3*/*-packages")]:
                assert (
                    sh(env, f"ls -A {d} 2>/dev/null | head -3; echo end").split("\n")[0].startswith("end")
                ), d
        finally:
            env.close()
    finally:
        shutil.rmtree(copy, ignore_errors=True)
        if created_dir:
            shutil.rmtree(site_dir, ignore_errors=True)


def test_the_running_package_is_hidden_wherever_it_lives_under_a_bound_path(monkeypatch):
    """A unipost under /usr outside any site-packages (e.g. on PYTHONPATH): the directory of the
    package that runs the sandbox is discovered and hidden, not only the usual site dirs."""
    root = Path(f"/usr/share/unipost-bounds-{secrets.token_hex(4)}")
    copy = root / "unipost"
    try:
        shutil.copytree(
            Path(unipost.__file__).resolve().parent, copy, ignore=shutil.ignore_patterns("__pycache__")
        )
        monkeypatch.setattr(sandbox_mod, "package_dirs", lambda: [copy], raising=False)
        env = mk()
        try:
            assert str(copy) in [str(p) for p in env.sandbox.hidden_paths]
            assert sh(env, f"ls -A {copy}; echo end").startswith("end"), "the copy is not empty inside"
            out = sh(env, f"cat {copy}/envs/embedded/tasks.py; echo end")
            assert "def generate_task" not in out and "No such file" in out, out
            probe = "import unipost.envs.embedded.tasks as t; print('LEAK', t)"
            out = sh(env, f'cd / && PYTHONPATH={root} python3 -c "{probe}"')
            assert "LEAK" not in out and "ModuleNotFoundError" in out, out
        finally:
            env.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_real_package_dir_is_discovered():
    assert Path(unipost.__file__).resolve().parent in [Path(p).resolve() for p in sandbox_mod.package_dirs()]


# ------------------------------------------------------------------------------ 3. no host path at all
def test_no_encoding_of_mountinfo_shows_the_host_workspace(env):
    host = str(env.workspace)
    out = sh(
        env, "gzip -c /proc/self/mountinfo | base64 -w0; echo; rev /proc/self/mountinfo | gzip | base64 -w0"
    )
    blobs = [b for b in out.split() if len(b) > 40]
    assert len(blobs) >= 2
    plain = gzip.decompress(base64.b64decode(blobs[0])).decode()
    reverted = "\n".join(
        line[::-1] for line in gzip.decompress(base64.b64decode(blobs[1])).decode().split("\n")
    )
    for text in (plain, reverted):
        assert " /testbed " in text
        assert host not in text and "unipost-ws-" not in text and os.path.basename(host) not in text
    assert os.path.basename(host) not in sh(env, "cat /proc/self/mountinfo /proc/mounts | od -c | head -200")


def test_the_expert_still_resolves_and_verification_sees_the_workspace():
    traj = play_expert(generate_task("heldout", 2, "medium"))
    assert traj.outcome.resolved, traj.outcome


def test_a_source_checkout_under_usr_is_hidden_whole(monkeypatch):
    """unipost run from a checkout under a bound path (``/usr/src/app``, a common Docker WORKDIR): its
    ``.git`` objects, a ``build/lib`` copy and the tests hold the generator too, not only the package
    directory."""
    root = Path(f"/usr/src/unipost-checkout-{secrets.token_hex(4)}")
    try:
        pkg = root / "unipost"
        shutil.copytree(
            Path(unipost.__file__).resolve().parent, pkg, ignore=shutil.ignore_patterns("__pycache__")
        )
        (root / "pyproject.toml").write_text("[project]\nname = 'unipost'\n")
        build = root / "build" / "lib" / "unipost" / "envs" / "embedded"
        build.mkdir(parents=True)
        shutil.copy(pkg / "envs" / "embedded" / "tasks.py", build / "tasks.py")
        (root / ".git" / "objects").mkdir(parents=True)
        monkeypatch.setattr(sandbox_mod, "__file__", str(pkg / "envs" / "embedded" / "sandbox.py"))
        env = mk()
        try:
            assert str(root) in env.sandbox.hidden_paths
            out = sh(env, f"cat {build}/tasks.py; ls -A {root}; echo end")
            assert "def generate_task" not in out and out.startswith("cat:"), out
            assert sh(env, "echo still works").startswith("still works")
        finally:
            env.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_editor_undo_history_is_bounded_however_the_path_is_spelled():
    """One 8 MiB file edited under many spellings (``/testbed/./././f``) in one turn kept a full copy
    per spelling in the host's memory: 40 calls held 320 MB, unbounded in the number of calls."""
    env = mk(file_bytes=2 * MiB, workspace_bytes=16 * MiB)
    try:
        sh(env, "python3 -c \"open('/testbed/big.txt', 'w').write(('a' * 99 + chr(10)) * 20000)\"")
        calls = [
            {
                "id": f"c{i}",
                "type": "function",
                "function": {
                    "name": "file_editor",
                    "arguments": json.dumps(
                        {
                            "command": "insert",
                            "path": "/testbed/" + "./" * i + "big.txt",
                            "insert_line": 0,
                            "new_str": "x",
                        }
                    ),
                },
            }
            for i in range(30)
        ]
        res = env.step({"role": "assistant", "content": "", "tool_calls": calls})
        assert not res.tool_error, res.observation[-1]
        held = sum(len(t) for stack in env.editor.history.values() for t in stack)
        assert held <= 4 * 2 * MiB, held  # 4 x file_bytes in all
        assert list(env.editor.history) == ["/testbed/big.txt"]  # one file, one history
        undo = step(env, "file_editor", command="undo_edit", path="/testbed/./big.txt")
        assert not undo.tool_error and (env.workspace / "big.txt").read_text().startswith("x\n" * 29 + "a")
    finally:
        env.close()


def test_an_unchanged_workspace_is_not_swapped_and_every_change_is_kept(env):
    """A command that changes nothing leaves the host's files in place (no rename churn: same inodes);
    the decision comes from the host's own records of both streams, so a change the agent disguises
    (same size, same time, other bytes; a mode; a link target) is still copied back."""
    init = env.workspace / "meterkit" / "__init__.py"
    before = init.stat().st_ino
    assert sh(env, "true").endswith("exit code 0.]")
    assert init.stat().st_ino == before and init.read_text() == env.task.files["meterkit/__init__.py"]
    text = init.read_text()
    flipped = text[:-2] + ("X" if text[-2] != "X" else "Y") + text[-1]
    (env.workspace / "new.txt").write_text(flipped)  # the same length, other bytes
    sh(
        env,
        "cp /testbed/new.txt /tmp/n && touch -r /testbed/meterkit/__init__.py /tmp/n && "
        "cat /tmp/n > /testbed/meterkit/__init__.py && touch -r /tmp/n /testbed/meterkit/__init__.py",
    )
    assert init.read_text() == flipped
    sh(env, "chmod 700 /testbed/new.txt")
    assert (env.workspace / "new.txt").stat().st_mode & 0o777 == 0o700
    sh(env, "ln -s a /testbed/l")
    sh(env, "rm /testbed/l && ln -s b /testbed/l")
    assert os.readlink(env.workspace / "l") == "b"
