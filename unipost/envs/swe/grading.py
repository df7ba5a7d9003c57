"""Training-time grading of an SWE episode in its own container (the SWE-Gym / SkyRL way).

The official harness (:mod:`unipost.envs.swe.harness`) decides the reported SWE-bench numbers after the
fact, but training needs the verdict per episode: rejection-sampled SFT keeps resolved teacher
trajectories only, GRPO's reward is the test result, and the held-out resolve rate the Trainer logs
would otherwise sit at 0. So after the agent's patch is extracted, the episode's container:

1. reverts the agent's edits to every file the instance's ``test_patch`` touches (``git checkout
   <base> -- f``, or removes a file the test patch creates), as the harness does;
2. applies ``test_patch`` (a failure to apply is reported, not raised);
3. runs the tests between the harness's ``>>>>> Start/End Test Output`` markers, under a kill timeout;
4. parses the log into ``{test id: status}`` and decides: resolved iff every ``FAIL_TO_PASS`` test
   passes (PASSED / XFAIL / XPASS) and every ``PASS_TO_PASS`` test passes or is skipped, unless the
   runner's recorded exit status is non-zero while no line reports a failure (lines forged by the
   patch, e.g. a conftest.py hook: a reward hack under RL).

Where the run comes from (:func:`grading_spec`), first that applies:

- ``"swebench-dataset"``: the instance carries its own ``eval_script`` and ``log_parser`` (the
  swebench >= 5 dataset format); the log is parsed with swebench's parser of that name when
  ``swebench`` is importable, or with :func:`parse_pytest_log` for its pytest parsers;
- ``"swebench"``: swebench 4.x knows the repo and version (``MAP_REPO_VERSION_TO_SPECS``): its own
  eval script and ``MAP_REPO_TO_PARSER`` log parser (SWE-bench Verified's repos);
- ``"pytest"``: a generic runner for everything else (most SWE-Gym repos are pytest-based):
  ``python -m pytest -rA -v`` on the test files named by the test ids, parsed by
  :func:`parse_pytest_log`. Test ids that are not pytest node ids (``file::name``) cannot be run
  this way; :func:`grading_spec` says so up front.

Unresolved submitted episodes get the left block of paper Table 4 (``unipost.data.FAILURE_MODES``),
in the embedded verifier's order: ``syntax_or_runtime_error`` (no test results, a test ERROR, a
timeout), else ``wrong_file`` (the patch touches none of the reference fix's files), else
``wrong_solution`` (wrong fix, or a fix that breaks PASS_TO_PASS tests). A test patch that does not
apply is the instance's problem, not the agent's: no failure mode (counted as "other").
"""

from __future__ import annotations

import io
import logging
import re
import shlex
import tarfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from unipost.envs.embedded.sandbox import WORKSPACE
from unipost.envs.swe.instances import SWEInstance

logger = logging.getLogger(__name__)

# the swebench harness's log markers (swebench.harness.constants), so its parsers read our logs too
START_TEST_OUTPUT = ">>>>> Start Test Output"
END_TEST_OUTPUT = ">>>>> End Test Output"
TEST_EXIT_CODE = ">>>>> Test Exit Code"
APPLY_PATCH_FAIL = ">>>>> Patch Apply Failed"
SCRATCH = "/tmp/unipost_grade"  # in the container: the eval script and the test patch
STATUSES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
PASSING = frozenset({"PASSED", "XFAIL", "XPASS"})  # XPASS: a non-strict xfail that now passes
_SEVERITY = {"PASSED": 0, "XPASS": 0, "XFAIL": 1, "SKIPPED": 2, "FAILED": 3, "ERROR": 4}
_PYTEST_PARSERS = frozenset({"parse_log_pytest", "parse_log_pytest_v2", "parse_log_pytest_options"})

Source = Literal["swebench-dataset", "swebench", "pytest"]
GradeStatus = Literal[
    "graded", "test_patch_failed", "timeout", "no_test_output", "empty_patch", "error", "inconsistent_log"
]
LogParser = Callable[[str], dict[str, str]]


class GradingUnavailableError(ValueError):
    """The instance cannot be graded in its container (no spec for its repo, ids pytest cannot run)."""


# -- log parsing ------------------------------------------------------------------------------------
_SUMMARY = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (.+)$")
_VERBOSE = re.compile(r"^(\S.*?::.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?=\s|$)")
_XDIST = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S.*?::.*?)\s*$")


def _nodeid(rest: str) -> str:
    """The node id of a ``-rA`` summary line's remainder: up to the first `` - `` (the message)
    outside brackets, since parametrised ids may themselves contain `` - ``."""
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif depth == 0 and rest.startswith(" - ", i):
            return rest[:i]
    return rest.rstrip()


def parse_pytest_log(log: str) -> dict[str, str]:
    """``{node id: status}`` from ``pytest -rA [-v]`` output.

    Reads the short-summary lines (``PASSED <id>``, ``FAILED <id> - <msg>``, ``ERROR <id>``, ``XFAIL
    <id> - <reason>``, ``XPASS <id>``) and the ``-v`` progress lines (``<id> PASSED [ 50%]``), which
    are the only place a skipped test's id appears (``-rA`` prints ``SKIPPED [1] file:line``; under
    pytest-xdist they read ``[gw0] [ 50%] SKIPPED <id>``, as repos' ``addopts = -n auto`` give). Ids keep
    their spaces and brackets. A test reported twice (e.g. PASSED, then ERROR in teardown) keeps the
    worse status. A collection error is ``ERROR <file>`` without ``::``: its key is the file.
    """
    statuses: dict[str, str] = {}

    def put(test_id: str, status: str) -> None:
        old = statuses.get(test_id)
        if old is None or _SEVERITY[status] > _SEVERITY[old]:
            statuses[test_id] = status

    for raw in log.splitlines():
        line = raw.rstrip()
        summary = _SUMMARY.match(line)
        if summary:
            status, rest = summary.groups()
            if rest.startswith("["):  # "SKIPPED [1] path:line: reason" names no test id
                continue
            test_id = _nodeid(rest)
            if test_id:
                put(test_id, status)
            continue
        xdist = _XDIST.match(line)  # pytest-xdist -v: "[gw0] [ 10%] PASSED <id>"
        if xdist:
            put(xdist.group(2), xdist.group(1))
            continue
        verbose = _VERBOSE.match(line)
        if verbose:
            put(verbose.group(1), verbose.group(2))
    return statuses


def lookup_status(test_id: str, statuses: Mapping[str, str]) -> str | None:
    """The status of ``test_id``, tolerating the two ways dataset ids differ from real node ids.

    SWE-bench's own pytest parser splits lines on whitespace, so dataset ids of parametrised tests with
    spaces are cut at the first space; and some Verified ids are cut mid-parameter (unbalanced ``[``).
    Those match a node id they prefix, when all such node ids agree on pass vs fail.
    """
    if test_id in statuses:
        return statuses[test_id]
    candidates = [k for k in statuses if k.split()[0] == test_id] if test_id else []
    if not candidates and test_id.count("[") > test_id.count("]"):
        candidates = [k for k in statuses if k.startswith(test_id)]
    if candidates and len({statuses[k] in PASSING for k in candidates}) == 1:
        return max((statuses[k] for k in candidates), key=_SEVERITY.__getitem__)
    return None


# -- the decision -------------------------------------------------------------------------------------
def patch_files(patch: str) -> list[str]:
    """Files a unified git diff touches (both sides of renames), in order."""
    files: list[str] = []
    for match in re.finditer(r"^diff --git a/(.+?) b/(.+?)$", patch, flags=re.M):
        for path in match.groups():
            if path not in files:
                files.append(path)
    return files


@dataclass
class GradeReport:
    """What grading found. ``resolved`` and ``failure_mode`` go into the episode's ``Outcome``."""

    instance_id: str
    status: GradeStatus
    resolved: bool = False
    failure_mode: str | None = None
    source: str = ""
    fail_to_pass_failed: list[str] = field(default_factory=list)
    pass_to_pass_failed: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = None
    seconds: float = 0.0
    log_tail: str = ""

    def summary(self) -> str:
        if self.resolved:
            return f"{self.instance_id}: resolved"
        return (
            f"{self.instance_id}: {self.status}, {self.failure_mode or 'no failure mode'}; FAIL_TO_PASS "
            f"failing {self.fail_to_pass_failed[:3]}, PASS_TO_PASS failing {self.pass_to_pass_failed[:3]}"
        )


def decide(
    instance: SWEInstance, statuses: Mapping[str, str], agent_patch: str
) -> tuple[bool, str | None, list[str], list[str]]:
    """``(resolved, failure_mode, failing FAIL_TO_PASS, failing PASS_TO_PASS)`` from a status map."""
    f2p = [t for t in instance.FAIL_TO_PASS if lookup_status(t, statuses) not in PASSING]
    p2p = [t for t in instance.PASS_TO_PASS if lookup_status(t, statuses) not in PASSING | {"SKIPPED"}]
    if not instance.FAIL_TO_PASS and not instance.PASS_TO_PASS:
        raise GradingUnavailableError(f"{instance.instance_id} lists no FAIL_TO_PASS / PASS_TO_PASS tests")
    if not f2p and not p2p:
        return True, None, [], []
    expected = [*instance.FAIL_TO_PASS, *instance.PASS_TO_PASS]
    errored = (
        not statuses
        or any(lookup_status(t, statuses) == "ERROR" for t in expected)
        or any(s == "ERROR" and "::" not in k for k, s in statuses.items())  # a file failed to collect
    )
    if errored:
        return False, "syntax_or_runtime_error", f2p, p2p
    if not set(patch_files(agent_patch)) & set(patch_files(instance.patch)):
        return False, "wrong_file", f2p, p2p
    return False, "wrong_solution", f2p, p2p


# -- what to run ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GradingSpec:
    """The script that applies the test patch and runs the tests, and the parser of its log."""

    instance_id: str
    source: Source
    script: str
    parse: LogParser = field(repr=False)
    timeout_s: float = 1800.0


# Files Python or pytest import by themselves, before any test runs: an agent that adds or edits one can
# rewrite the verdict (a conftest.py hook that marks every test passed). They are put back as they were
# at the base commit before grading; the test patch is applied afterwards, so its own conftest.py stays.
HOOK_FILE_CASES = "conftest.py|sitecustomize.py|usercustomize.py|*.pth"


def reset_test_files_commands(instance: SWEInstance, workdir: str = WORKSPACE) -> list[str]:
    """Undo the agent's edits to the test patch's files (back to the base commit, or gone if new) and
    to every import hook in the repository (conftest.py, sitecustomize.py, usercustomize.py, *.pth:
    agent-added ones removed, tracked ones restored), so no code of the agent's runs before the tests
    do. What this does not cover is documented in docs/sandbox.md."""
    base = shlex.quote(instance.base_commit)
    where = shlex.quote(workdir)
    # the mounted tree belongs to the host user: without this, git in the container refuses to touch it
    lines = [f"cd {where}", f"git config --global --add safe.directory {where}"]
    hook = f'case "${{f##*/}}" in {HOOK_FILE_CASES})'
    lines.append(  # untracked (and ignored) hook files the agent added
        f"git ls-files -z --others | while IFS= read -r -d '' f; do {hook} rm -f -- \"$f\";; esac; done"
    )
    lines.append(  # tracked hook files the agent edited or deleted
        f"git diff -z --name-only {base} | while IFS= read -r -d '' f; do {hook} "
        f'git checkout -q {base} -- "$f" 2>/dev/null || rm -f -- "$f";; esac; done'
    )
    for path in patch_files(instance.test_patch):
        q = shlex.quote(path)
        lines.append(f"git checkout -q {base} -- {q} 2>/dev/null || rm -f -- {q}")
    return lines


def pytest_targets(instance: SWEInstance) -> list[str]:
    """The test files to run: the file part of every FAIL_TO_PASS / PASS_TO_PASS node id."""
    ids = [*instance.FAIL_TO_PASS, *instance.PASS_TO_PASS]
    if not ids:
        raise GradingUnavailableError(f"{instance.instance_id} lists no FAIL_TO_PASS / PASS_TO_PASS tests")
    bad = [t for t in ids if "::" not in t]
    if bad:
        raise GradingUnavailableError(
            f"{instance.instance_id} ({instance.repo}): test ids such as {bad[0]!r} are not pytest node ids "
            "(file::name), and swebench has no eval script for this repo/version; install 'swebench' "
            "(pip install 'unipost[swe]') if it covers the repo, or set env.swe_grading='none'"
        )
    targets: list[str] = []
    for test_id in ids:
        path = test_id.split("::", 1)[0]
        if path not in targets:
            targets.append(path)
    return targets


def pytest_script(instance: SWEInstance, *, workdir: str = WORKSPACE, scratch: str = SCRATCH) -> str:
    """The generic eval script: reset test files, apply the test patch, ``pytest -rA -v`` the files."""
    targets = " ".join(shlex.quote(t) for t in pytest_targets(instance))
    return "\n".join(
        [
            "#!/bin/bash",
            "set -uo pipefail",
            *reset_test_files_commands(instance, workdir),
            # SWE-bench / SWE-Gym images keep the repo's environment in the conda env 'testbed'
            "if [ -f /opt/miniconda3/bin/activate ]; then set +u; source /opt/miniconda3/bin/activate; "
            "conda activate testbed; set -u; fi",
            f"if ! git apply -v {scratch}/test.patch; then echo '{APPLY_PATCH_FAIL}'; exit 3; fi",
            f"echo '{START_TEST_OUTPUT}'",
            f"python -m pytest -rA -v --color=no -p no:cacheprovider {targets} 2>&1",
            "code=$?",
            f"echo '{END_TEST_OUTPUT}'",
            f'echo "{TEST_EXIT_CODE}: $code"',
            "",
        ]
    )


def _swebench_v4_spec(instance: SWEInstance) -> tuple[str, LogParser] | None:
    """swebench 4.x's eval script and log parser for the instance's repo/version, if it knows them."""
    try:
        from swebench.harness.constants import MAP_REPO_TO_EXT, MAP_REPO_VERSION_TO_SPECS
        from swebench.harness.log_parsers import MAP_REPO_TO_PARSER
        from swebench.harness.test_spec.create_scripts import make_eval_script_list
        from swebench.harness.test_spec.test_spec import TestSpec
    except ImportError:
        return None
    specs = MAP_REPO_VERSION_TO_SPECS.get(instance.repo, {}).get(instance.version)
    if specs is None or instance.repo not in MAP_REPO_TO_PARSER:
        return None
    record = instance.to_record()
    # only the eval script: make_test_spec would also build the image set-up scripts, which fetch the
    # repo's requirements from GitHub (no network in the container, and none needed here)
    eval_list = make_eval_script_list(
        record, specs, "testbed", WORKSPACE, instance.base_commit, instance.test_patch
    )
    spec = TestSpec(
        instance_id=instance.instance_id,
        repo=instance.repo,
        version=instance.version,
        repo_script_list=[],
        eval_script_list=eval_list,
        env_script_list=[],
        arch="x86_64",
        FAIL_TO_PASS=list(instance.FAIL_TO_PASS),
        PASS_TO_PASS=list(instance.PASS_TO_PASS),
        language=MAP_REPO_TO_EXT[instance.repo],
        docker_specs=specs.get("docker_specs", {}),
        namespace=None,
    )
    parser = MAP_REPO_TO_PARSER[instance.repo]
    return spec.eval_script, lambda log: parser(log, spec)


def _dataset_spec(instance: SWEInstance) -> tuple[str, LogParser] | None:
    """The instance's own ``eval_script`` + ``log_parser`` (swebench >= 5 dataset records)."""
    script, parser_name = instance.extra.get("eval_script"), instance.extra.get("log_parser")
    if not (isinstance(script, str) and script.strip() and isinstance(parser_name, str)):
        return None
    try:
        from swebench.harness.log_parsers import PARSER_REGISTRY
        from swebench.harness.utils import make_test_spec
    except ImportError:
        if parser_name in _PYTEST_PARSERS:
            return script, parse_pytest_log
        raise GradingUnavailableError(
            f"{instance.instance_id}: its eval_script is parsed by swebench's {parser_name!r}, but "
            "'swebench' is not importable; install it with: pip install 'unipost[swe]'"
        ) from None
    if parser_name not in PARSER_REGISTRY:
        raise GradingUnavailableError(f"{instance.instance_id}: swebench has no log parser {parser_name!r}")
    record = {"image": instance.image_name(), "eval_type": "pass_and_fail", **instance.to_record()}
    spec = make_test_spec(record)
    parser = PARSER_REGISTRY[parser_name]
    return script, lambda log: parser(log, spec)


def grading_spec(
    instance: SWEInstance, *, source: Literal["auto"] | Source = "auto", timeout_s: float = 1800.0
) -> GradingSpec:
    """How ``instance`` is graded in its container (see the module docstring for the order)."""
    if not isinstance(instance, SWEInstance):
        raise TypeError(f"grading_spec needs an SWEInstance, got {type(instance).__name__}")
    if timeout_s <= 0:
        raise ValueError(f"the grading timeout must be positive, got {timeout_s}")
    makers: dict[Source, Callable[[SWEInstance], tuple[str, LogParser] | None]] = {
        "swebench-dataset": _dataset_spec,
        "swebench": _swebench_v4_spec,
        "pytest": lambda i: (pytest_script(i), parse_pytest_log),
    }
    if source != "auto" and source not in makers:
        raise ValueError(f"unknown grading source {source!r}; choose auto | {' | '.join(makers)}")
    for name in [source] if source != "auto" else list(makers):
        made = makers[name](instance)  # type: ignore[index]
        if made is not None:
            script, parse = made
            prelude = "\n".join(reset_test_files_commands(instance))
            if name != "pytest":  # their scripts reset the test files too, but a new file would block apply
                head, _, body = script.partition("\n") if script.startswith("#!") else ("", "", script)
                script = "\n".join(part for part in (head, prelude, body) if part)
            return GradingSpec(instance.instance_id, name, script, parse, timeout_s)  # type: ignore[arg-type]
    raise GradingUnavailableError(
        f"{instance.instance_id}: no grading spec from source {source!r} (swebench not importable or it "
        "does not know the repo/version)"
    )


# -- running it in the container ----------------------------------------------------------------------
def _tar(files: Mapping[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


_EXIT_CODE = re.compile(rf"^{re.escape(TEST_EXIT_CODE)}:\s*(-?\d+)", re.M)
# git apply's own complaints (swebench's scripts go on to the tests after a failed apply)
_GIT_APPLY_ERROR = re.compile(
    r"^error: (patch failed: |.*: (patch does not apply|already exists in working directory))", re.M
)


def _test_section(log: str) -> str:
    """The text between the first start marker and the last end marker (or to the end)."""
    _, found, rest = log.partition(START_TEST_OUTPUT)
    if not found:
        return ""
    body, found_end, _ = rest.rpartition(END_TEST_OUTPUT)
    return body if found_end else rest


def grade_log(
    instance: SWEInstance,
    spec: GradingSpec,
    log: str,
    exit_code: int | None,
    agent_patch: str,
    *,
    seconds: float = 0.0,
) -> GradeReport:
    """The verdict on one eval-script run (its combined output and exit status)."""
    report = GradeReport(
        instance.instance_id, "graded", source=spec.source, exit_code=exit_code, seconds=seconds
    )
    report.log_tail = log[-4000:]
    before_tests = log.partition(START_TEST_OUTPUT)[0]
    if APPLY_PATCH_FAIL in before_tests or _GIT_APPLY_ERROR.search(before_tests):
        report.status = "test_patch_failed"
        return report
    if exit_code in (124, 137):  # `timeout -s KILL` (137), or a script's own timeout (124)
        report.status, report.failure_mode = "timeout", "syntax_or_runtime_error"
        return report
    section = _test_section(log)
    statuses = spec.parse(section) if section else {}
    if not statuses and section:
        statuses = spec.parse(log)  # some runners print outside the markers (as swebench falls back)
    report.statuses = dict(statuses)
    if not section and not statuses:
        report.status, report.failure_mode = "no_test_output", "syntax_or_runtime_error"
        report.fail_to_pass_failed = list(instance.FAIL_TO_PASS)
        return report
    resolved, mode, f2p, p2p = decide(instance, statuses, agent_patch)
    report.resolved, report.failure_mode = resolved, mode
    report.fail_to_pass_failed, report.pass_to_pass_failed = f2p, p2p
    recorded = _EXIT_CODE.findall(log)  # the last one is the script's: a forged one comes earlier
    if resolved and recorded and int(recorded[-1]) != 0 and not set(statuses.values()) & {"FAILED", "ERROR"}:
        # the runner failed yet every line says it passed: lines printed by the patch itself (e.g. a
        # conftest.py hook), the reward hack swebench >= 5 guards against the same way
        report.resolved, report.status, report.failure_mode = False, "inconsistent_log", None
    return report


def grade_in_container(
    container: Any,
    instance: SWEInstance,
    agent_patch: str,
    *,
    spec: GradingSpec | None = None,
    scratch: str = SCRATCH,
) -> GradeReport:
    """Run the instance's tests on the agent's working tree in ``container`` and grade them.

    ``container`` is a docker SDK ``Container`` (``put_archive``, ``exec_run``): the eval script and the
    test patch are copied to ``scratch`` (a script argument could exceed the kernel's 128 KiB limit),
    then run under ``timeout -s KILL``. A run that cannot start or times out, or a container that fails
    under it, is a report (status ``error``: no failure mode, the engine's fault), not an exception.
    """
    spec = spec or grading_spec(instance)
    if not agent_patch.strip():  # nothing to test: the buggy code is unchanged
        return GradeReport(instance.instance_id, "empty_patch", failure_mode="wrong_file", source=spec.source)
    t0 = time.perf_counter()
    timeout = str(max(1, int(spec.timeout_s)))
    try:
        # a fresh root-only folder: whatever the agent may have planted at that path is gone first
        q = shlex.quote(scratch)
        code, out = container.exec_run(["bash", "-c", f"rm -rf {q} && mkdir -m 700 -p {q}"])
        if code != 0:
            raise RuntimeError(
                f"mkdir {scratch} exited {code}: {(out or b'').decode(errors='replace')[-300:]}"
            )
        container.put_archive(scratch, _tar({"eval.sh": spec.script, "test.patch": instance.test_patch}))
        argv = ["timeout", "-s", "KILL", timeout, "bash", f"{scratch}/eval.sh"]
        code, out = container.exec_run(argv, demux=False)
    except Exception as exc:  # the container is gone or the engine failed: no verdict on the patch
        logger.warning("grading %s could not run: %s: %s", instance.instance_id, type(exc).__name__, exc)
        return GradeReport(
            instance.instance_id, "error", source=spec.source, log_tail=f"{type(exc).__name__}: {exc}"
        )
    log = (out or b"").decode("utf-8", errors="replace")
    report = grade_log(instance, spec, log, int(code), agent_patch, seconds=time.perf_counter() - t0)
    logger.info("grading %s", report.summary())
    return report
