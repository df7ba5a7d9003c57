"""In-container grading of SWE episodes (unipost.envs.swe.grading, DockerSWEEnv.verify).

The log parser reads the output of a real ``pytest -rA -v`` run; the grading decision is checked on
status maps; the eval script for a fixture instance is checked with ``bash -n``. The end-to-end test
drives ``DockerSWEEnv`` (its tools, ``verify``, the eval script, real git and real pytest) on a real git
repository, with ONE stand-in: ``LocalContainer`` below replaces the docker SDK's ``Container``
(``exec_run`` / ``put_archive``) by running the same commands on this machine, with the container's
paths mapped to host folders the way a bind mount would. That is the only substitute, and only
because no Docker engine exists here; everything on either side of that interface is the real code.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from unipost._optional import available
from unipost.envs.embedded.expert import tool_call_message
from unipost.envs.embedded.tools import FileEditor, Terminal
from unipost.envs.registry import make_env_factory
from unipost.envs.swe import DockerExecutor, DockerSWEEnv, SWEInstance, load_instances, parse_instance
from unipost.envs.swe.docker_env import STOP_AGENT_COMMAND
from unipost.envs.swe.grading import (
    SCRATCH,
    GradingUnavailableError,
    decide,
    grade_log,
    grading_spec,
    lookup_status,
    parse_pytest_log,
    patch_files,
)
from unipost.train.config import EnvConfig

FIXTURES = Path(__file__).parent / "fixtures" / "swe"

TEST_FILE = """\
import pytest


def test_ok():
    assert True


@pytest.mark.parametrize("s", ["a b", "x - y", "[q]"])
def test_param(s):
    assert s != "x - y"


def test_fail():
    assert 1 == 2


@pytest.fixture
def boom():
    raise RuntimeError("boom")


def test_err(boom):
    pass


@pytest.mark.xfail(reason="known")
def test_xf():
    assert False


@pytest.mark.xfail(reason="maybe")
def test_xp():
    pass


@pytest.mark.skip(reason="nope")
def test_skip():
    pass


class TestK:
    def test_m(self):
        pass
"""


def _pytest(cwd: Path, *targets: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-v", "--color=no", "-p", "no:cacheprovider", *targets],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTEST_ADDOPTS": ""},
    )
    return done.stdout + done.stderr


def test_parser_reads_a_real_pytest_rA_run(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_s.py").write_text(TEST_FILE)
    statuses = parse_pytest_log(_pytest(tmp_path, "tests/test_s.py"))
    f = "tests/test_s.py::"
    assert statuses == {
        f + "test_ok": "PASSED",
        f + "test_param[a b]": "PASSED",  # a space in the id
        f + "test_param[x - y]": "FAILED",  # " - " inside brackets is not the message separator
        f + "test_param[[q]]": "PASSED",
        f + "test_fail": "FAILED",
        f + "test_err": "ERROR",  # error at setup
        f + "test_xf": "XFAIL",
        f + "test_xp": "XPASS",
        f + "test_skip": "SKIPPED",  # only the -v line names a skipped test
        f + "TestK::test_m": "PASSED",
    }
    (tmp_path / "tests" / "test_broken.py").write_text(
        "import no_such_module_xyz\n\ndef test_a():\n    pass\n"
    )
    broken = parse_pytest_log(_pytest(tmp_path, "tests/test_s.py", "tests/test_broken.py"))
    assert broken == {"tests/test_broken.py": "ERROR"}  # collection error: pytest runs nothing


def test_parser_keeps_the_worse_of_two_reports_and_ignores_location_only_skips():
    log = "\n".join(
        [
            "t.py::test_a PASSED                  [ 50%]",
            "t.py::test_a ERROR                   [ 50%]",
            "PASSED t.py::test_a",
            "ERROR t.py::test_a - RuntimeError: teardown",
            "SKIPPED [1] t.py:3: unconditional skip",
            "FAILED t.py::test_b - assert 1 == 2",
        ]
    )
    assert parse_pytest_log(log) == {"t.py::test_a": "ERROR", "t.py::test_b": "FAILED"}


def test_parser_reads_pytest_xdist_progress_lines():
    """Lines copied from a real ``pytest -rA -v -n 2`` run (pytest 9.0, pytest-xdist 3.8) of TEST_FILE:
    repos whose addopts turn xdist on print this instead of the plain -v lines."""
    log = "\n".join(
        [
            "[gw0] [ 20%] PASSED tests/test_s.py::test_param[a b] ",
            "[gw1] [ 40%] FAILED tests/test_s.py::test_param[x - y] ",
            "[gw1] [ 80%] SKIPPED tests/test_s.py::test_skip ",
            "[gw0] [ 90%] XFAIL tests/test_s.py::test_xf ",
            "[gw0] linux -- Python 3.11.7 /usr/bin/python",
            "FAILED tests/test_s.py::test_param[x - y] - AssertionError: assert 'x - y' !=...",
        ]
    )
    assert parse_pytest_log(log) == {
        "tests/test_s.py::test_param[a b]": "PASSED",
        "tests/test_s.py::test_param[x - y]": "FAILED",
        "tests/test_s.py::test_skip": "SKIPPED",
        "tests/test_s.py::test_xf": "XFAIL",
    }


def test_lookup_matches_dataset_ids_cut_by_swebench():
    statuses = {"t.py::test_p[a b]": "PASSED", "t.py::test_p[c d]": "FAILED", "t.py::test_q[x y]": "PASSED"}
    assert lookup_status("t.py::test_p[a b]", statuses) == "PASSED"
    assert (
        lookup_status("t.py::test_q[x", statuses) == "PASSED"
    )  # cut at the space, as swebench's parser does
    assert lookup_status("t.py::test_p[", statuses) is None  # prefixes two ids that disagree: no verdict
    assert lookup_status("t.py::test_r", statuses) is None


@pytest.fixture(scope="module")
def instances() -> list[SWEInstance]:
    return load_instances(FIXTURES / "instances.jsonl")


def test_decision_on_fail_to_pass_and_pass_to_pass(instances):
    inst = instances[0]  # F2P tests/test_stats.py::test_mean_empty, P2P tests/test_stats.py::test_mean
    f2p, p2p = inst.FAIL_TO_PASS[0], inst.PASS_TO_PASS[0]
    fix = inst.patch  # touches tinycalc/stats.py, the reference fix's file
    other = "diff --git a/tinycalc/ops.py b/tinycalc/ops.py\n--- a/tinycalc/ops.py\n+++ b/tinycalc/ops.py\n"
    assert patch_files(fix) == ["tinycalc/stats.py"]
    assert decide(inst, {f2p: "PASSED", p2p: "PASSED"}, fix) == (True, None, [], [])
    assert decide(inst, {f2p: "XFAIL", p2p: "SKIPPED"}, fix)[0]  # a skipped P2P test is no regression
    assert decide(inst, {f2p: "SKIPPED", p2p: "PASSED"}, fix) == (False, "wrong_solution", [f2p], [])
    assert decide(inst, {f2p: "PASSED", p2p: "FAILED"}, fix) == (False, "wrong_solution", [], [p2p])
    assert decide(inst, {f2p: "FAILED", p2p: "PASSED"}, other) == (False, "wrong_file", [f2p], [])
    assert decide(inst, {f2p: "ERROR", p2p: "PASSED"}, fix)[1] == "syntax_or_runtime_error"
    assert decide(inst, {"tests/test_stats.py": "ERROR"}, fix)[1] == "syntax_or_runtime_error"
    assert decide(inst, {}, fix) == (False, "syntax_or_runtime_error", [f2p], [p2p])


def test_log_verdicts_for_runs_that_did_not_test(instances):
    inst = instances[0]
    spec = grading_spec(inst, source="pytest")
    assert grade_log(inst, spec, ">>>>> Patch Apply Failed\n", 3, inst.patch).status == "test_patch_failed"
    git_says = (
        "error: patch failed: tests/test_stats.py:3\nerror: tests/test_stats.py: patch does not apply\n"
    )
    late = git_says + f">>>>> Start Test Output\nFAILED {inst.FAIL_TO_PASS[0]}\n>>>>> End Test Output\n"
    assert (
        grade_log(inst, spec, late, 1, inst.patch).status == "test_patch_failed"
    )  # swebench's scripts go on
    timeout = grade_log(inst, spec, ">>>>> Start Test Output\ncollecting", 137, inst.patch)
    assert (timeout.status, timeout.failure_mode, timeout.resolved) == (
        "timeout",
        "syntax_or_runtime_error",
        False,
    )
    silent = grade_log(inst, spec, "bash: python: command not found\n", 127, inst.patch)
    assert (silent.status, silent.failure_mode) == ("no_test_output", "syntax_or_runtime_error")
    tests = f"PASSED {inst.FAIL_TO_PASS[0]}\nPASSED {inst.PASS_TO_PASS[0]}\n"
    ok = f">>>>> Start Test Output\n{tests}>>>>> End Test Output\n"
    assert grade_log(inst, spec, ok, 0, inst.patch).resolved
    # lines say pass (and a hook even prints an exit status), but the runner failed: the last status counts
    fake_ok = ok.replace(">>>>> End", ">>>>> Test Exit Code: 0\n>>>>> End")
    forged = grade_log(inst, spec, fake_ok + ">>>>> Test Exit Code: 1\n", 0, inst.patch)
    assert (forged.resolved, forged.status, forged.failure_mode) == (False, "inconsistent_log", None)
    assert grade_log(inst, spec, ok + ">>>>> Test Exit Code: 0\n", 0, inst.patch).resolved


def test_eval_script_for_a_fixture_instance(instances, tmp_path):
    inst = instances[0]
    spec = grading_spec(inst)  # no swebench here, no eval_script in the record: the generic runner
    assert spec.source == "pytest"
    lines = spec.script.splitlines()
    f = "tests/test_stats.py"
    reset = f"git checkout -q {inst.base_commit} -- {f} 2>/dev/null || rm -f -- {f}"
    apply = next(i for i, ln in enumerate(lines) if "git apply" in ln)
    assert lines.index(reset) < apply < lines.index(">>>>> Start Test Output".join(["echo '", "'"]))
    assert f"git apply -v {SCRATCH}/test.patch" in lines[apply]
    assert "python -m pytest -rA -v --color=no -p no:cacheprovider tests/test_stats.py 2>&1" in lines
    script = tmp_path / "eval.sh"
    script.write_text(spec.script)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    odd = replace(inst, FAIL_TO_PASS=("tests/test_a b.py::test_x[1 2]",), PASS_TO_PASS=())
    assert "'tests/test_a b.py'" in grading_spec(odd).script  # shell-quoted


def test_instances_pytest_cannot_run_are_refused_before_any_container(instances):
    django_style = replace(instances[0], FAIL_TO_PASS=("test_clear (cache.tests.DBCacheTests)",))
    with pytest.raises(GradingUnavailableError, match=r"not pytest node ids.*swe_grading='none'"):
        DockerSWEEnv(django_style)
    assert DockerSWEEnv(django_style, grade=False).grading is None
    with pytest.raises(ValueError, match="unknown grading source"):
        grading_spec(instances[0], source="tox")  # type: ignore[arg-type]


def test_env_config_switches_grading(instances):
    base = {"name": "swe", "tasks_path": str(FIXTURES / "instances.jsonl"), "heldout_fraction": 0.0}
    graded = make_env_factory(EnvConfig(**base, swe_grading_timeout_s=60))(("train", 0))
    assert graded.grading is not None and graded.grading.source == "pytest" and graded.grading.timeout_s == 60
    assert make_env_factory(EnvConfig(**base, swe_grading="none"))(("train", 0)).grading is None
    assert EnvConfig.model_fields["swe_grading"].description
    with pytest.raises(ValueError):
        EnvConfig(**base, swe_grading="harness")


# -- end to end, with the docker SDK's Container replaced by local execution --------------------------


class LocalContainer:
    """The docker SDK ``Container`` calls DockerSWEEnv makes (``exec_run``, ``put_archive``), run on this
    machine: container paths are mapped to host folders (like bind mounts), HOME is a scratch folder so
    ``git config --global`` stays inside the "container". A stand-in because no Docker engine exists."""

    def __init__(self, mounts: dict[str, Path], home: Path) -> None:
        self.mounts = mounts
        self.env = {**os.environ, "HOME": str(home), "PYTEST_ADDOPTS": ""}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        self.calls: list[list[str]] = []
        self.users: list[str | None] = []

    def _map(self, text: str) -> str:
        for inside, outside in self.mounts.items():
            text = text.replace(inside, str(outside))
        return text

    def exec_run(self, cmd, workdir=None, demux=False, user=None, **_):
        """Runs ``cmd`` here; ``user`` ('uid:gid') switches ids as Docker would (only possible as root)."""
        assert demux is False and isinstance(cmd, list)
        self.calls.append(cmd)
        self.users.append(user)
        args = [self._map(a) for a in cmd]
        cwd = self._map(workdir) if workdir else str(self.mounts["/testbed"])
        ids = {}
        if user and os.getuid() == 0:
            uid, gid = (int(x) for x in user.split(":"))
            ids = {"user": uid, "group": gid, "extra_groups": []}
        if user and not ids and cmd == ["bash", "-c", STOP_AGENT_COMMAND]:
            # Without root this stand-in cannot switch uid, and kill -1 as the host user would kill the
            # test run itself: recorded, not run (Docker always runs it as the agent's uid)
            return 0, b""
        done = subprocess.run(
            args, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **ids
        )
        return done.returncode, done.stdout

    def put_archive(self, path: str, data: bytes) -> bool:
        target = Path(self._map(path))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                text = tar.extractfile(member).read().decode()  # type: ignore[union-attr]
                (target / member.name).write_text(self._map(text))
        return True


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


OPS = "def clamp(x, lo, hi):\n    return max(lo, x)\n"
TESTS = "from calc.ops import clamp\n\n\ndef test_clamp_low():\n    assert clamp(-1, 0, 3) == 0\n"
NEW_TEST = "\n\ndef test_clamp_high():\n    assert clamp(5, 0, 3) == 3\n"
FIX = "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n"


@pytest.fixture
def repo_instance(tmp_path) -> tuple[Path, SWEInstance]:
    """A real repository with a bug, its reference fix and its test patch (made with git diff)."""
    repo = tmp_path / "testbed"
    (repo / "calc").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "calc" / "__init__.py").write_text("")
    (repo / "calc" / "ops.py").write_text(OPS)
    (repo / "tests" / "test_ops.py").write_text(TESTS)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    base = _git(repo, "rev-parse", "HEAD").strip()
    (repo / "calc" / "ops.py").write_text(FIX)
    gold = _git(repo, "diff", "calc/ops.py")
    (repo / "tests" / "test_ops.py").write_text(TESTS + NEW_TEST)
    test_patch = _git(repo, "diff", "tests/test_ops.py")
    _git(repo, "checkout", "-q", "--", ".")
    instance = SWEInstance(
        instance_id="local__calc-1",
        repo="local/calc",
        base_commit=base,
        problem_statement="clamp(5, 0, 3) returns 5",
        patch=gold,
        test_patch=test_patch,
        FAIL_TO_PASS=("tests/test_ops.py::test_clamp_high",),
        PASS_TO_PASS=("tests/test_ops.py::test_clamp_low",),
    )
    return repo, instance


def _env(repo: Path, instance: SWEInstance, tmp_path: Path) -> tuple[DockerSWEEnv, LocalContainer]:
    """A DockerSWEEnv in the state reset() leaves it in, on a LocalContainer instead of an engine."""
    (tmp_path / "scratch").mkdir()
    (tmp_path / "home").mkdir()
    container = LocalContainer({SCRATCH: tmp_path / "scratch", "/testbed": repo}, tmp_path / "home")
    # the agent's commands run as this process's user here (no uid switch), as with agent_user=None
    env = DockerSWEEnv(instance, pull=False, grading_timeout_s=120, agent_user=None)
    env._reset_state()
    env.workspace, env.container = repo, container
    env.editor = FileEditor(repo, env.max_observation_chars)
    env.terminal = Terminal(DockerExecutor(container, env.limits), env.max_observation_chars)  # type: ignore[arg-type]
    return env, container


def _act(env: DockerSWEEnv, name: str, args: dict) -> None:
    env.step(tool_call_message("", name, args, f"call_{len(env.actions)}"))


class _FakeDockerClient:
    """``docker.from_env()`` as reset() uses it: the image's /testbed as a tar stream, and ``run`` giving
    a LocalContainer (its keyword arguments recorded)."""

    def __init__(self, repo: Path, scratch: Path, home: Path) -> None:
        self.repo, self.scratch, self.home = repo, scratch, home
        self.run_kwargs: dict = {}
        self.containers = self
        self.container: LocalContainer | None = None

    def create(self, image, command):
        repo = self.repo

        class _Tmp:
            def get_archive(self, path):
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tar:
                    tar.add(repo, arcname="testbed")
                return iter([buf.getvalue()]), {}

            def remove(self, force=False):
                pass

        return _Tmp()

    def run(self, image, **kwargs):
        self.run_kwargs = kwargs
        (mount,) = [Path(host) for host, spec in kwargs["volumes"].items() if spec["bind"] == "/testbed"]
        self.container = LocalContainer({SCRATCH: self.scratch, "/testbed": mount}, self.home)
        self.container.remove = lambda force=False: None  # type: ignore[attr-defined]
        return self.container


def test_the_agent_runs_unprivileged_in_the_container_and_verification_as_the_image_user(
    repo_instance, tmp_path, monkeypatch
):
    """Issue 21: SWE containers ran the agent's commands as root. Now they run as an unprivileged uid that
    owns /testbed (the host user's, or 1000 under a root host), with no-new-privileges. Before verifying,
    every process of that uid is killed (a daemon it left could rewrite the tree during grading), and the
    patch is extracted as that uid (git runs commands from the agent-owned .git: core.fsmonitor, hooks,
    filters); grading keeps the image's user. Fails on the old code: no user on exec_run, no
    security_opt; then (second round) a planted core.fsmonitor ran as root and the daemon survived."""
    import tempfile

    from unipost.envs.swe import docker_env

    repo, instance = repo_instance
    # folders an unprivileged uid can traverse (pytest's tmp_path is 0700 under root)
    shared = Path(tempfile.mkdtemp(prefix="unipost-swe-test-"))
    shared.chmod(0o711)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))  # reset()'s mkdtemp lands here too
    (tmp_path / "scratch").mkdir()
    (tmp_path / "home").mkdir()
    client = _FakeDockerClient(repo, tmp_path / "scratch", tmp_path / "home")
    monkeypatch.setattr(docker_env, "docker_client", lambda: client)
    monkeypatch.setattr(DockerSWEEnv, "_ensure_image", lambda self, c: None)
    try:
        env = DockerSWEEnv(instance, pull=False, grading_timeout_s=120)
        assert env.agent_user == docker_env.agent_user_for_host()
        env.reset()
        assert client.run_kwargs["security_opt"] == ["no-new-privileges"]
        uid = int(env.agent_user.split(":")[0])
        assert uid != 0
        assert env.workspace.stat().st_uid == uid
        assert (env.workspace / "calc" / "ops.py").stat().st_uid == uid
        _act(env, "terminal", {"command": "id -u > who.txt && touch calc/new_by_agent.py"})
        container = client.container
        assert container is not None and container.users == [env.agent_user] * 2  # write check, command
        assert (env.workspace / "who.txt").read_text().strip() == str(
            uid if os.getuid() == 0 else os.getuid()
        )
        if os.getuid() == 0:  # a root-only host file is out of the agent's reach
            secret = shared / "root-only.txt"
            secret.write_text("host secret")
            secret.chmod(0o600)
            mapped = str(secret)
            _act(env, "terminal", {"command": f"cat {mapped} > leak.txt 2>&1; echo rc=$?"})
            assert "host secret" not in (env.workspace / "leak.txt").read_text()
        _act(
            env,
            "file_editor",  # the host-side editor still writes the agent-owned tree
            {
                "command": "str_replace",
                "path": "/testbed/calc/ops.py",
                "old_str": "max(lo, x)",
                "new_str": "max(lo, min(x, hi))",
            },
        )
        # a file the editor creates belongs to the agent too, so its commands can change it
        _act(
            env,
            "file_editor",
            {"command": "create", "path": "/testbed/calc/notes.py", "file_text": "x = 1\n"},
        )
        assert (env.workspace / "calc" / "notes.py").stat().st_uid == uid
        _act(env, "terminal", {"command": "echo y = 2 >> calc/notes.py && rm calc/notes.py"})
        assert not (env.workspace / "calc" / "notes.py").exists()
        # a daemon that outlives its command, and a git setting that runs a command on `git add`
        _act(env, "terminal", {"command": "(setsid sleep 300 >/dev/null 2>&1 & echo $! > daemon.pid)"})
        daemon = int((env.workspace / "daemon.pid").read_text())
        (env.workspace / "daemon.pid").unlink()
        marker = shared / "fsmonitor-ran-as"
        _act(
            env,
            "terminal",
            {"command": f"git config core.fsmonitor 'id -u > {marker}; false' && rm -f {marker}"},
        )
        _act(env, "finish", {"message": "done"})
        before = len(container.users)
        try:
            outcome = env.verify()
            assert outcome.resolved, env.grade_report.log_tail if env.grade_report else None
            calls, users = container.calls[before:], container.users[before:]
            # the daemon is killed as the agent, the patch extracted as the agent, grading as the image user
            assert calls[0] == ["bash", "-c", docker_env.STOP_AGENT_COMMAND] and users[0] == env.agent_user
            assert "add -A" in calls[1][-1] and users[1] == env.agent_user
            assert users[2:] and all(u is None for u in users[2:]), users
            assert not marker.exists(), f"core.fsmonitor ran during verification as uid {marker.read_text()}"
            if os.getuid() == 0:  # only then can this stand-in switch to the agent's uid and kill
                time.sleep(0.2)
                state = Path(f"/proc/{daemon}/status")
                alive = state.exists() and "State:\tZ" not in state.read_text()
                assert not alive, "the agent's daemon outlived the episode into verification"
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(daemon, signal.SIGKILL)
    finally:
        import shutil

        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="switching the agent's uid needs root, as Docker has")
def test_an_agent_that_cannot_write_the_workspace_is_refused_at_reset(repo_instance, tmp_path, monkeypatch):
    """Rootless Docker / userns-remap: the agent's uid does not own /testbed. reset() says so and names
    the fix, where the old code let every agent write fail with EACCES for the whole episode."""
    from unipost.envs.swe import docker_env

    repo, instance = repo_instance
    (tmp_path / "scratch").mkdir()
    (tmp_path / "home").mkdir()
    client = _FakeDockerClient(repo, tmp_path / "scratch", tmp_path / "home")
    monkeypatch.setattr(docker_env, "docker_client", lambda: client)
    monkeypatch.setattr(DockerSWEEnv, "_ensure_image", lambda self, c: None)
    monkeypatch.setattr(DockerSWEEnv, "_hand_workspace_to_agent", lambda self: None)  # a remapped uid
    env = DockerSWEEnv(instance, pull=False, agent_user="4242:4242")
    with pytest.raises(RuntimeError, match=r"4242:4242 cannot write /testbed.*agent_user=None"):
        env.reset()
    assert env.container is None


def test_env_config_passes_the_agent_user(instances):
    from unipost.envs.swe.docker_env import agent_user_for_host

    base = {"name": "swe", "tasks_path": str(FIXTURES / "instances.jsonl"), "heldout_fraction": 0.0}
    assert make_env_factory(EnvConfig(**base))(("train", 0)).agent_user == agent_user_for_host()
    assert make_env_factory(EnvConfig(**base, swe_agent_user=None))(("train", 0)).agent_user is None
    explicit = make_env_factory(EnvConfig(**base, swe_agent_user="2000:2000"))(("train", 0))
    assert explicit.agent_user == "2000:2000"


def test_agent_user_choice_and_validation(repo_instance):
    from unipost.envs.swe.docker_env import agent_user_for_host

    assert agent_user_for_host(0, 0) == "1000:1000"
    assert agent_user_for_host(1234, 99) == "1234:99"
    _, instance = repo_instance
    assert DockerSWEEnv(instance, pull=False, agent_user=None).agent_user is None  # the old behaviour
    assert DockerSWEEnv(instance, pull=False, agent_user="2000:2000").agent_user == "2000:2000"
    with pytest.raises(ValueError, match="agent_user"):
        DockerSWEEnv(instance, pull=False, agent_user="nobody")


def test_verify_grades_a_fix_in_the_container_and_reverts_test_edits(repo_instance, tmp_path):
    repo, instance = repo_instance
    env, container = _env(repo, instance, tmp_path)
    _act(
        env,
        "file_editor",
        {
            "command": "str_replace",
            "path": "/testbed/calc/ops.py",
            "old_str": "max(lo, x)",
            "new_str": "max(lo, min(x, hi))",
        },
    )
    # the agent also rewrites the test file: grading must restore it before the test patch applies
    _act(env, "terminal", {"command": "printf 'def test_clamp_high():\\n    pass\\n' > tests/test_ops.py"})
    _act(env, "finish", {"message": "done"})
    outcome = env.verify()
    report = env.grade_report
    assert report is not None and report.source == "pytest", report
    assert report.statuses == {
        "tests/test_ops.py::test_clamp_low": "PASSED",
        "tests/test_ops.py::test_clamp_high": "PASSED",
    }, report.log_tail
    assert (outcome.resolved, outcome.submitted, outcome.reward, outcome.failure_mode) == (
        True,
        True,
        1.0,
        None,
    )
    assert outcome.detail == env.patch and "+    return max(lo, min(x, hi))" in outcome.detail
    assert "tests/test_ops.py" in patch_files(outcome.detail)  # the patch still holds what the agent did
    assert (
        container.calls[-1][:3] == ["timeout", "-s", "KILL"]
        and container.calls[-1][-1] == f"{SCRATCH}/eval.sh"
    )


@pytest.mark.parametrize(
    ("new_source", "mode"),
    [
        ("def clamp(x, lo, hi):\n    return min(x, hi)\n", "wrong_solution"),  # F2P passes, P2P breaks
        ("def clamp(x, lo, hi)\n    return x\n", "syntax_or_runtime_error"),  # the module does not import
    ],
)
def test_verify_classifies_unresolved_submissions(repo_instance, tmp_path, new_source, mode):
    repo, instance = repo_instance
    env, _ = _env(repo, instance, tmp_path)
    _act(env, "file_editor", {"command": "create", "path": "/testbed/calc/ops2.py", "file_text": "x = 1\n"})
    (repo / "calc" / "ops.py").write_text(new_source)
    _act(env, "finish", {"message": "done"})
    outcome = env.verify()
    assert (outcome.resolved, outcome.submitted, outcome.reward, outcome.failure_mode) == (
        False,
        True,
        0.0,
        mode,
    ), env.grade_report.log_tail if env.grade_report else None


def test_verify_without_submission_or_without_grading_runs_no_tests(repo_instance, tmp_path):
    repo, instance = repo_instance
    env, container = _env(repo, instance, tmp_path)
    outcome = env.verify(ended_by="turn_budget")
    assert (outcome.resolved, outcome.failure_mode, env.grade_report) == (False, "no_edit", None)
    env.grading = None  # DockerSWEEnv(grade=False) / env.swe_grading='none'
    (repo / "calc" / "ops.py").write_text(FIX)  # a non-empty patch: an empty one is no submission
    _act(env, "finish", {"message": "done"})
    outcome = env.verify()
    assert (outcome.resolved, outcome.submitted, outcome.failure_mode) == (False, True, None)
    assert not any("eval.sh" in " ".join(c) for c in container.calls)


def test_finish_without_edits_is_no_submission_and_runs_no_tests(repo_instance, tmp_path):
    """`finish` with an empty patch submits nothing (issue 12): the right block's no_edit, not wrong_file."""
    repo, instance = repo_instance
    env, container = _env(repo, instance, tmp_path)
    _act(env, "finish", {"message": "nothing to do"})
    outcome = env.verify()
    assert (outcome.resolved, outcome.submitted, outcome.failure_mode, outcome.detail) == (
        False,
        False,
        "no_edit",
        "",
    )
    assert env.grade_report is None
    assert not any("eval.sh" in " ".join(c) for c in container.calls)


def test_a_container_that_fails_under_grading_gives_an_outcome_not_an_exception(repo_instance, tmp_path):
    repo, instance = repo_instance
    env, container = _env(repo, instance, tmp_path)
    (repo / "calc" / "ops.py").write_text(FIX)
    _act(env, "finish", {"message": "done"})

    def gone(path, data):
        raise ConnectionError("container 3f2a is not running")

    container.put_archive = gone  # type: ignore[method-assign]
    outcome = env.verify()
    assert (outcome.resolved, outcome.submitted, outcome.failure_mode) == (False, True, None)
    assert outcome.detail.startswith("diff --git a/calc/ops.py")  # the patch survives for the harness
    assert env.grade_report is not None and env.grade_report.status == "error"
    assert "not running" in env.grade_report.log_tail


def test_instances_with_their_own_eval_script_use_it(instances):
    """swebench >= 5 dataset records carry ``eval_script`` + ``log_parser``; without swebench installed
    its pytest parsers are stood in for by ours, any other parser is refused by name."""
    body = ": '>>>>> Start Test Output'\npytest -rA t.py\n: '>>>>> End Test Output'\n"
    script = "#!/bin/bash\nset -uxo pipefail\n" + body
    record = {**instances[0].to_record(), "eval_script": script, "log_parser": "parse_log_pytest"}
    inst = parse_instance(record)
    if available("swebench"):
        pytest.skip("checks the fallback used when swebench is not importable")
    spec = grading_spec(inst)
    assert spec.source == "swebench-dataset" and spec.parse is parse_pytest_log
    assert spec.script.splitlines()[0] == "#!/bin/bash" and "pytest -rA t.py" in spec.script
    assert "git checkout -q" in spec.script.split("set -uxo pipefail")[0]  # our test-file reset runs first
    record["log_parser"] = "parse_log_django"
    with pytest.raises(GradingUnavailableError, match=r"parse_log_django.*pip install 'unipost\[swe\]'"):
        grading_spec(parse_instance(record))


def test_swebench_v4_specs_when_installed(instances):
    """With swebench 4.x importable, a repo/version it knows is graded with its own eval script and
    log parser (checked by hand against swebench 4.1.0; skipped where swebench is absent)."""
    pytest.importorskip("swebench.harness.test_spec.test_spec")
    django = replace(
        instances[0], repo="django/django", version="4.0", FAIL_TO_PASS=("test_x (a.b.C)",), PASS_TO_PASS=()
    )
    spec = grading_spec(django)
    assert spec.source == "swebench" and "./tests/runtests.py" in spec.script
    assert spec.parse("test_x (a.b.C) ... ok\n") == {"test_x (a.b.C)": "PASSED"}
