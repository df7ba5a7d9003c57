"""The GPU check's step runner (``bash scripts/gpu-check.sh`` calls this): one command, one results file.

Runs, in order, each step in its own process group with its own timeout, continuing past a failing step:

* ``wheels``  installs the git-ignored ``.whl/*.whl`` (scripts/fetch-gpu-wheels.sh fills it) into a target
  folder put first on ``PYTHONPATH``: the GPU machine has no network;
* ``env``     device name, driver, CUDA, and the versions of python, torch, triton, transformers, peft,
  accelerate, liger-kernel, cut-cross-entropy; checks that unipost imports (the repo is on ``PYTHONPATH``);
* ``triton``  (a) the Triton ``token_logprobs`` kernel vs the fp64 reference on CUDA: fp32, bf16, fp16,
  entropy and its gradient, temperature, odd shapes, V = 152k, determinism
  (``tests/test_triton_logprobs.py::*_cuda``);
* ``bench:<impl>``  (c) ``benchmarks/bench_logprobs.py --device cuda`` at N = 16k, H = 4096, V = 152k bf16 for
  naive, ours-triton, liger and cce, one step (and one fresh process) per implementation;
* ``flex``    (b) tree- and varlen-packed forward + backward through FlexAttention vs separate sequences
  on CUDA, gradients equal (``tests/test_packing.py::test_pack_equals_separate_cuda_flex``).

The bench runs before ``flex`` so that its figures survive a tight budget. Without CUDA a pytest step is not
run (its tests would all skip; they are in the default suite anyway) but its test ids are checked to exist,
so renaming a test fails the dry run instead of the GPU run. A total budget (``--budget``,
default 480 s: the device tool allows 600 s per command) caps every step's timeout at what is left and
skips a step when less than its minimum remains. ``--dry-run`` runs the same steps on the CPU at tiny
shapes in well under a minute; steps that need CUDA are reported as ``skipped: no CUDA``.

Writes ``gpu-check.json`` (everything), ``gpu-check.md`` (a table to paste into benchmarks/README.md) and
``gpu-check.log`` (every step's output) into ``--out`` (default ``$OUT`` when set, else
``outputs/gpu-check``): three files, within the device tool's limit of eight. The results file is
rewritten after every step, so a run killed from outside keeps what it finished. Exit status: 0 when no
step failed or timed out (skips are not failures), 1 otherwise. Only the standard library is imported
here: torch and unipost are imported by the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480.0
RESERVE_S = 5.0  # kept back from the budget for writing the results
DRY_RUN_TIMEOUT_FACTOR = 3  # a loaded 2-core CPU is slow; the dry run checks logic, not speed
BENCH_IMPLS = ("naive", "ours-triton", "liger", "cce")
# The GPU shape of issue 14: Qwen3's vocabulary, a 4096-wide hidden state, 16k tokens, bf16.
BENCH_SHAPE = {"n": 16384, "hidden": 4096, "v": 152064, "dtype": "bf16"}
NO_CUDA = "skipped: no CUDA"

ENV_PROBE = r"""
import json, os, platform, subprocess, sys
from importlib import metadata
info = {"python": platform.python_version(), "executable": sys.executable, "cpus": os.cpu_count()}
versions = {}
for name in ("torch", "triton", "transformers", "peft", "accelerate", "liger-kernel", "cut-cross-entropy",
             "pydantic", "flash-attn", "pytest", "pytest-xdist"):
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
info["versions"] = versions
try:
    import torch
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
        info["device_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["device_count"] = torch.cuda.device_count()
    else:
        info["device"] = "cpu: " + (platform.processor() or platform.machine())
except Exception as exc:
    info["cuda_available"], info["torch_error"] = False, repr(exc)
try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
except Exception as exc:
    info["nvidia_smi"] = "unavailable: " + type(exc).__name__
try:
    import unipost.data, unipost.kernels.model, unipost.kernels.logprobs
    info["unipost"] = unipost.kernels.model.__file__
except Exception as exc:
    info["unipost_error"] = repr(exc)
print("GPU_CHECK_ENV " + json.dumps(info))
sys.exit(1 if "unipost_error" in info or "torch_error" in info else 0)
"""


@dataclass
class Step:
    """One step: a command, its timeout and minimum, and how to read its result."""

    name: str
    what: str
    argv: list[str]
    timeout_s: float
    min_s: float = 15.0
    needs_cuda: bool = False
    kind: str = "command"  # "command" | "pytest" | "bench" | "env"
    workers: int = 0  # pytest: pytest-xdist's -n, where installed (the workers compile in parallel)
    skip: str | None = None  # a reason decided before it runs (e.g. "skipped: dry run")


@dataclass
class StepResult:
    name: str
    what: str
    status: str
    seconds: float = 0.0
    timeout_s: float | None = None
    returncode: int | None = None
    command: str = ""
    tests: dict | None = None
    failures: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    log_tail: str = ""

    @property
    def failed(self) -> bool:
        return self.status.startswith(("failed", "timeout"))


# ----------------------------------------------------------------------------------------- running one step


def run_command(
    argv: list[str], timeout_s: float, log_path: Path, env: dict | None = None
) -> tuple[int | None, float, bool]:
    """Run ``argv`` in its own process group, output to ``log_path``; kill the whole group at the timeout.

    Returns (returncode or None when killed, seconds, timed_out).
    """
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env,
            start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=max(timeout_s, 0.1))
            return rc, time.monotonic() - start, False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return None, time.monotonic() - start, True


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def parse_junit(path: Path) -> tuple[dict, list[str], list[str]]:
    """(counts, failing test ids with their messages, skip messages) from a pytest junit XML file."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skips = [], []
    if not path.exists():
        return counts, failures, skips
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            counts["failed"] += 1
            failures.append(f"{test_id}: {(bad.get('message') or '').strip()[:300]}")
        elif skipped is not None:
            counts["skipped"] += 1
            skips.append(skipped.get("message") or "")
        else:
            counts["passed"] += 1
    return counts, failures, skips


def pytest_status(rc: int | None, counts: dict, skips: list[str], cuda: bool) -> str:
    if rc == 5 or not any(counts.values()):
        return f"failed: no tests ran (pytest exit {rc})"
    if rc != 0 or counts["failed"]:
        return f"failed: {counts['failed']} of {sum(counts.values())} tests"
    if counts["passed"] == 0:
        return NO_CUDA if not cuda else "skipped: " + (skips[0] if skips else "all tests skipped")
    return "ok" if not counts["skipped"] else f"ok ({counts['skipped']} skipped)"


def read_bench_rows(out_dir: Path) -> list[dict]:
    """Rows of every ``*.json`` that bench_logprobs wrote into ``out_dir`` (a list, or a dict with "rows")."""
    rows = []
    for path in sorted(out_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found = data.get("rows", []) if isinstance(data, dict) else data
        rows.extend(r for r in found if isinstance(r, dict))
    return rows


def _row_impl(row: dict) -> str:
    return str(row.get("impl", row.get("method", "?")))


def bench_status(rc: int | None, rows: list[dict]) -> str:
    if rc not in (0, None) and not rows:
        return f"failed: bench exit {rc}"
    if not rows:
        return "failed: no result rows"
    statuses = [str(r.get("status", "?")) for r in rows]
    bad = [s for s in statuses if s != "ok"]
    if not bad:
        return "ok"
    if all(s.startswith(("unavailable", "skipped")) for s in bad):
        return bad[0] if len(bad) == len(statuses) else f"ok ({len(bad)} rows: {bad[0]})"
    return f"failed: {bad[0]}"


def run_step(step: Step, timeout_s: float, work: Path, env: dict, cuda: bool) -> StepResult:
    """Run one step with ``timeout_s`` and read its result (pytest junit, bench rows or the env probe)."""
    log_path = work / f"{_safe(step.name)}.log"
    argv = list(step.argv)
    junit = work / f"{_safe(step.name)}.xml"
    bench_dir = work / f"bench-{_safe(step.name)}"
    if step.kind == "pytest":
        argv += ["--junitxml", str(junit)]
    if step.kind == "bench":
        bench_dir.mkdir(exist_ok=True)
        argv += ["--out", str(bench_dir)]
    rc, seconds, timed_out = run_command(argv, timeout_s, log_path, env)
    result = StepResult(
        step.name, step.what, "ok", round(seconds, 2), round(timeout_s, 1), rc, shlex.join(argv),
        log_tail=_tail(log_path),
    )  # fmt: skip
    if step.kind == "pytest":
        counts, result.failures, skips = parse_junit(junit)
        result.tests = counts
        result.status = pytest_status(rc, counts, skips, cuda)
    elif step.kind == "bench":
        result.rows = read_bench_rows(bench_dir)
        result.status = bench_status(rc, result.rows)
    elif rc != 0:
        result.status = f"failed: exit {rc}"
    if timed_out:
        result.status = f"timeout after {seconds:.0f} s"
    return result


def missing_tests(argv: list[str]) -> list[str]:
    """The ``path::test_name`` arguments whose file lacks ``def test_name(`` (checked without importing)."""
    missing = []
    for arg in argv:
        if "::" not in arg:
            continue
        path, name = arg.split("::", 1)
        try:
            source = (ROOT / path).read_text()
        except OSError:
            source = ""
        if not re.search(rf"^def {re.escape(name.split('[')[0])}\(", source, re.M):
            missing.append(arg)
    return missing


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


# ----------------------------------------------------------------------------------------- the plan


def plan(python: str, dry_run: bool, wheels: list[Path], site: Path) -> list[Step]:
    """The steps, in order. Timeouts are generous upper bounds; the total budget caps them."""
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    steps = []
    if wheels and not dry_run:
        pip = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        pip += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
        steps.append(Step("wheels", f"install {len(wheels)} wheels from .whl/", pip, 90, 10))
    else:
        why = "skipped: dry run" if wheels else "skipped: no .whl/*.whl (scripts/fetch-gpu-wheels.sh)"
        steps.append(Step("wheels", "install .whl/*.whl", [], 0, 0, skip=why))
    what = "device, driver and versions; unipost imports"
    steps.append(Step("env", what, [python, "-c", ENV_PROBE], 90, 10, kind="env"))
    tests = [
        "tests/test_triton_logprobs.py::test_triton_matches_reference_cuda",
        "tests/test_triton_logprobs.py::test_triton_backward_is_deterministic_cuda",
    ]
    what = "(a) Triton token_logprobs vs the fp64 reference on CUDA (fp32/bf16/fp16, entropy, temperature, "
    what += "odd shapes, V=152k)"
    steps.append(Step("triton", what, pytest + tests, 150, 30, needs_cuda=True, kind="pytest", workers=4))
    bench = [python, "benchmarks/bench_logprobs.py"]
    shape = ["--n", str(BENCH_SHAPE["n"]), "--hidden", str(BENCH_SHAPE["hidden"])]
    shape += ["--v", str(BENCH_SHAPE["v"]), "--dtype", BENCH_SHAPE["dtype"], "--repeats", "5"]
    for impl in BENCH_IMPLS:
        timeout = 120 if impl == "cce" else 90
        argv = [*bench, "--device", "cuda", "--impls", impl, "--name", f"logprobs-cuda-{_safe(impl)}"]
        argv += ["--dry-run"] if dry_run else shape
        argv += ["--timeout", str(timeout - 10)]
        what = f"(c) bench_logprobs {impl} on CUDA" + ("" if dry_run else ", N=16k H=4096 V=152k bf16")
        steps.append(Step(f"bench:{impl}", what, argv, timeout, 20, needs_cuda=True, kind="bench"))
    if dry_run:  # the bench's CPU path at tiny shapes, so the dry run reads real rows
        argv = [*bench, "--device", "cpu", "--dry-run", "--impls", "naive,ours", "--name", "logprobs-cpu-dry"]
        what = "(c) bench_logprobs dry run on CPU (naive, ours)"
        steps.append(Step("bench:cpu-dry", what, argv, 90, 10, kind="bench"))
    tests = ["tests/test_packing.py::test_pack_equals_separate_cuda_flex"]
    what = "(b) tree and varlen packs through FlexAttention fwd+bwd vs separate sequences on CUDA"
    steps.append(Step("flex", what, pytest + tests, 150, 30, needs_cuda=True, kind="pytest", workers=2))
    return steps


# ----------------------------------------------------------------------------------------- results


def write_results(out: Path, report: dict, results: list[StepResult], logs: list[Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "steps": [asdict(r) for r in results]}
    report["summary"] = {
        "ok": sum(r.status.startswith("ok") for r in results),
        "failed": sum(r.failed for r in results),
        "skipped": sum(r.status.startswith(("skipped", "unavailable")) for r in results),
    }
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu-check.md").write_text(markdown(report, results))
    with (out / "gpu-check.log").open("w") as log:
        for path in logs:
            log.write(f"\n===== {path.stem} =====\n")
            log.write(path.read_text(errors="replace") if path.exists() else "(no output)\n")


def _num(row: dict, *keys: str) -> float | None:
    for key in keys:
        try:
            return float(row[key])
        except (KeyError, TypeError, ValueError):
            continue
    return None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict, results: list[StepResult]) -> str:
    env = report.get("env", {})
    versions = env.get("versions", {})
    vtext = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    lines = [
        f"GPU check ({report['mode']}), {report['started_utc']}: {env.get('device', 'device unknown')}"
        f" (nvidia-smi: {env.get('nvidia_smi', '-')}); CUDA {env.get('torch_cuda')}; {vtext}.",
        f"Wall {report.get('wall_s', 0):.0f} s of a {report['budget_s']:.0f} s budget.",
        "",
        "| step | what | status | seconds |",
        "|---|---|---|---:|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.what} | {r.status} | {r.seconds:.1f} |")
    rows = [row for r in results for row in r.rows]
    if rows:
        naive = next(
            (_num(r, "total_s") for r in rows if _row_impl(r) == "naive" and r.get("status") == "ok"), None
        )
        lines += [
            "",
            "| impl | device | N | H | V | dtype | status | fwd+bwd s (median) | extra MiB | time / naive "
            "| max err logp |",
            "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            total = _num(r, "total_s", "total_median_s")
            mem = _num(r, "extra_mib", "extra_memory_mib", "peak_mib")
            ratio = f"{total / naive:.2f}" if total and naive else "-"
            lines.append(
                f"| {_row_impl(r)} | {r.get('device', '')} | {r.get('N', r.get('n', ''))} | "
                f"{r.get('H', r.get('hidden', ''))} | {r.get('V', r.get('v', ''))} | {r.get('dtype', '')} | "
                f"{r.get('status', '')} | {'-' if total is None else f'{total:.4f}'} | "
                f"{'-' if mem is None else f'{mem:.0f}'} | {ratio} | {_fmt(_num(r, 'err_logp'), '.1e')} |"
            )
    failures = [f"- {r.name}: {f}" for r in results for f in r.failures]
    if failures:
        lines += ["", "Failures:", *failures]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- main


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes; on CPU the CUDA steps are skipped"
    )
    parser.add_argument("--out", default=None, help="results folder (default: $OUT, else outputs/gpu-check)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="total seconds for all steps")
    parser.add_argument(
        "--only", default=None, help="comma list of step names or prefixes (e.g. triton,bench)"
    )
    parser.add_argument("--python", default=sys.executable, help="the interpreter the steps run with")
    parser.add_argument("--plan", action="store_true", help="print the steps and their commands; run nothing")
    args = parser.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "outputs" / "gpu-check").resolve()
    started, t0 = _now(), time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    site = work / "site"
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    steps = plan(args.python, args.dry_run, wheels, site)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        steps = [s for s in steps if s.name in ("wheels", "env") or any(s.name.startswith(w) for w in wanted)]
    if args.dry_run:  # a loaded CPU machine is slow; the dry run checks logic, not speed
        for step in steps:
            step.timeout_s *= DRY_RUN_TIMEOUT_FACTOR
    if args.plan:
        for step in steps:
            print(f"{step.name} (timeout {step.timeout_s:.0f} s{', needs CUDA' if step.needs_cuda else ''}): "
                  f"{step.skip or shlex.join(step.argv)[:200]}".replace("\n", " "))  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
        return 0

    # compiled kernels, never Triton's CPU interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    report = {
        "mode": "dry-run" if args.dry_run else "gpu",
        "started_utc": started,
        "budget_s": args.budget,
        "host": platform.node(),
        "command": shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "env": {},
    }
    results: list[StepResult] = []
    logs: list[Path] = []
    cuda = False
    for step in steps:
        left = args.budget - (time.monotonic() - t0) - RESERVE_S
        if step.skip:
            result = StepResult(step.name, step.what, step.skip)
        elif step.needs_cuda and not cuda:
            missing = missing_tests(step.argv) if step.kind == "pytest" else []
            status = f"failed: no such test {', '.join(missing)}" if missing else NO_CUDA
            result = StepResult(step.name, step.what, status)
        elif left < step.min_s:
            result = StepResult(
                step.name, step.what, f"skipped: budget ({left:.0f} s left, needs {step.min_s:.0f})"
            )
        else:
            print(
                f"[gpu-check] {step.name}: {step.what} (timeout {min(step.timeout_s, left):.0f} s)",
                flush=True,
            )
            if step.workers and report["env"].get("versions", {}).get("pytest-xdist"):
                step.argv += ["-n", str(step.workers)]  # each worker compiles its own kernels
            result = run_step(step, min(step.timeout_s, left), work, env, cuda)
            logs.append(work / f"{_safe(step.name)}.log")
            if step.name == "wheels" and not result.failed:
                env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
            if step.kind == "env":
                found = re.search(r"^GPU_CHECK_ENV (.*)$", _tail(logs[-1], 100_000), re.M)
                report["env"] = json.loads(found.group(1)) if found else {}
                cuda = bool(report["env"].get("cuda_available"))
        print(f"[gpu-check] {step.name}: {result.status} ({result.seconds:.1f} s)", flush=True)
        results.append(result)
        report["wall_s"] = round(time.monotonic() - t0, 1)
        write_results(out, report, results, logs)
    report["finished_utc"] = _now()
    report["wall_s"] = round(time.monotonic() - t0, 1)
    report["over_budget"] = report["wall_s"] > args.budget
    write_results(out, report, results, logs)
    shutil.rmtree(work, ignore_errors=True)  # every log is in gpu-check.log
    failed = [r.name for r in results if r.failed]
    print(
        f"[gpu-check] wrote {out}/gpu-check.json, .md, .log; {report['wall_s']:.0f} s; "
        f"failed: {failed or 'none'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
