"""Soak the embedded environment with a hostile policy, and measure what a sandboxed call costs.

Issue 10: >= 1,000 episodes through ``RolloutEngine.collect`` of a policy that mixes
``RandomToolPolicy`` (30% malformed calls), a catalogue of attacks (sandbox escapes, symlink and FIFO
tricks, NaN timeouts, huge output, fork bombs, reward forgeries, undecodable names, deep nesting) and
fuzzed tool-call text (random mutations of valid calls: brackets, quotes, control and surrogate
characters, deep nesting), then checks the host:

- 0 host-side effects outside the workspaces (a canary directory the attacks aim at is unchanged, and
  no episode workspace is left behind),
- 0 lost or corrupt trajectories (stored + quarantined = episodes; the store loads strictly),
- 0 orphan processes (no process of a sandbox uid, or tagged by an attack, survives the run),
- 0 forged rewards (the hostile policy never fixes a bug, so every resolved episode would be forged),
- bounded host memory (peak RSS growth over the run).

``--cost`` instead times one sandboxed command (``terminal`` ``echo``), one ``file_editor`` view and
one verification, as medians, for whichever ``unipost`` is imported: run it against an older
checkout (``git archive <commit> unipost | tar -x -C /tmp/old`` then ``PYTHONPATH=/tmp/old``) to
compare. Every figure is printed with the machine's state over its measurement beside it
(``unipost.machine.QuietMonitor``: 1-minute load before/after, other processes' mean CPU use, torch
threads, ``busy``); a figure taken while other processes used more than a quarter of a core is marked
busy and warned about. Sandboxed commands are this process's waited-for children, so they count as
ours; attack processes that outlive their command until the sandbox kills them count as others'.
Results also go to ``benchmarks/results/soak_env{-quick,-cost}{-tag}.json``.

    python benchmarks/soak_env.py                  # 1,000 episodes (~10 min on the 2-core machine)
    python benchmarks/soak_env.py --quick          # 40 episodes, the slow test's configuration
    python benchmarks/soak_env.py --cost           # per-call cost figures
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from unipost.envs.embedded import EmbeddedEnv, Limits, generate_task, tool_call_message, tool_schemas
from unipost.machine import QuietMonitor, header_line, machine_state
from unipost.objective import OwnSamples, Recipe, StudentRollout
from unipost.rendering import format_assistant, make_tool_call, parse_assistant
from unipost.rollout.engine import RolloutEngine
from unipost.rollout.policy import PolicyOutput
from unipost.rollout.scripted import RandomToolPolicy
from unipost.rollout.store import TrajectoryStore, load

RESULTS = Path(__file__).resolve().parent / "results"
TAG = "unipost_soak_" + secrets.token_hex(4)  # marks every process an attack starts


def _attacks(canary: Path, package: str) -> list[dict[str, Any]]:
    """Hostile actions, each an assistant message (tool calls or raw structures)."""
    host = canary / "secret.txt"
    t = lambda cmd, **kw: tool_call_message("", "terminal", {"command": cmd, **kw}, "a")
    e = lambda **kw: tool_call_message("", "file_editor", kw, "a")
    sleeper = f"python3 -c 'import time; time.sleep(60)  # {TAG}'"
    deep: list[Any] = []
    for _ in range(2000):
        deep = [deep]
    forge = (
        "import os, sys\n"
        'print(\'UNIPOST_RESULT_\' + \'{"import_error": null, "tests": 5, "failures": 0, "errors": 0}\')\n'
        "fd = os.environ.get('UNIPOST_CHANNEL_FD')\n"
        'if fd: os.write(int(fd), b\'{"import_error": null, "results": []}\')\n'
        "os._exit(0)\n"
    )
    return [
        t(sleeper, timeout=float("nan")),
        t(sleeper, timeout=float("inf")),
        t(f"{sleeper} & disown; setsid {sleeper} &"),
        t(f"ln -sf {host} /testbed/link; ln -sfn {canary} /testbed/dirlink; echo ok"),
        e(command="insert", path="/testbed/link", insert_line=0, new_str="PWNED"),
        e(command="create", path="/testbed/dirlink/new.txt", file_text="PWNED"),
        e(command="str_replace", path="/testbed/link", old_str="canary", new_str="PWNED"),
        e(command="view", path="/testbed/dirlink/secret.txt"),
        t("mkfifo /testbed/fifo; echo made"),
        e(command="view", path="/testbed/fifo"),
        t("head -c 50000000 /dev/zero | tr '\\0' a"),
        t("bomb() { bomb | bomb & }; bomb; sleep 1"),
        t(f"echo x > {canary}/from_terminal; cat /proc/self/mountinfo | head -3"),
        t("touch $'/testbed/bad\\xff\\xfe'; ls /testbed"),
        e(command="view", path="/testbed"),
        e(command="create", path=f"/testbed/{package}/zz_forge.py", file_text=forge),
        tool_call_message("", "finish", {"message": "forged"}, "f"),
        e(command="view", path="/testbed/../../etc/passwd"),
        e(command="create", path="/testbed/x\udcff", file_text="\ud800"),
        {"role": "assistant", "content": "", "tool_calls": [{"id": deep, "function": {"name": "think"}}]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "terminal", "arguments": deep}}],
        },
        {"role": "assistant", "content": "lone \udcff surrogate"},
    ]


def _fuzz(rng: random.Random, valid: str) -> str:
    """A mutated tool-call text: splices, bracket bombs, control/surrogate characters, truncation."""
    ops = [
        lambda s: s[: rng.randrange(len(s) + 1)],
        lambda s: s.replace("{", "[" * rng.randint(1, 3000), 1),
        lambda s: (
            s[: (i := rng.randrange(len(s) + 1))]
            + rng.choice(['"', "\\", "}", "]", "\x00", "\udcff"])
            + s[i:]
        ),
        lambda s: s.replace('"', "'"),
        lambda s: s + "<tool_call>" + s,
        lambda s: s.replace("</tool_call>", ""),
        lambda s: "".join(chr(rng.randrange(0x20, 0x3000)) if rng.random() < 0.05 else c for c in s),
        lambda s: s.replace("terminal", rng.choice(["", "terminal" * 50, "finish", "file_editor"])),
        lambda s: "<think>" + s + "</think>" + s,
    ]
    for _ in range(rng.randint(1, 3)):
        valid = rng.choice(ops)(valid)
    return valid


class HostilePolicy:
    """Random tool calls, the attack catalogue and fuzzed text, in seeded proportions."""

    name = "hostile"
    white_box = False

    def __init__(self, canary: Path, seed: int = 0):
        self.rng = random.Random(seed)
        self.canary = canary
        self.schemas = tool_schemas()
        self.random = RandomToolPolicy(self.schemas, seed=seed, malformed_rate=0.3)

    def act(self, states: list[Any], *, greedy: bool = False) -> list[PolicyOutput]:
        outs = []
        for state in states:
            roll = self.rng.random()
            if roll < 0.35:
                outs += self.random.act([state], greedy=greedy)
            elif roll < 0.7:
                package = state.env.task.package if state.env is not None else "pkg"
                outs.append(PolicyOutput(message=self.rng.choice(_attacks(self.canary, package))))
            else:
                name = self.rng.choice(["terminal", "file_editor", "think", "finish"])
                args = {
                    "terminal": {"command": "ls /testbed"},
                    "file_editor": {"command": "view", "path": "/testbed"},
                }
                call = make_tool_call(name, args.get(name, {"thought": "x", "message": "m"}), "z")
                text = _fuzz(
                    self.rng, format_assistant({"role": "assistant", "content": "", "tool_calls": [call]})
                )
                parsed = parse_assistant(text, tools=self.schemas, max_calls=1, require_call=True)
                outs.append(PolicyOutput(message=parsed.message, tool_error=parsed.error, raw=text))
        return outs


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file() and not path.is_symlink():
            h.update(path.read_bytes())
    return h.hexdigest()


def _orphans() -> list[int]:
    """Live processes of a sandbox uid (>= 3,000,000) or carrying the soak's tag."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            uid = os.stat(f"/proc/{entry}").st_uid
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if state != "Z" and (uid >= 3_000_000 or TAG.encode() in cmd):
            found.append(int(entry))
    return found


def _workspaces() -> set[str]:
    tmp = Path(tempfile.gettempdir())
    return {p.name for p in tmp.glob("unipost-ws-*")} | {p.name for p in tmp.glob("unipost-hidden-*")}


def soak(episodes: int, *, max_turns: int = 6, concurrency: int = 4, seed: int = 0) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="unipost-soak-"))
    canary = work / "canary"
    canary.mkdir()
    (canary / "secret.txt").write_text("canary\n")
    digest = _tree_digest(canary)
    before_ws = _workspaces()  # other processes may create some too: informative only
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    made: list[EmbeddedEnv] = []

    def make_env(task: Any) -> EmbeddedEnv:
        env = EmbeddedEnv.from_split(*task, limits=Limits(timeout_s=3, cpu_s=3, max_processes=32))
        made.append(env)
        return env

    engine = RolloutEngine(
        make_env,
        student=HostilePolicy(canary, seed),
        teacher=None,
        recipe=Recipe(StudentRollout(), OwnSamples()),
        max_turns=max_turns,
        concurrency=concurrency,
        seed=seed,
        progress=False,
    )
    tasks = [("train", i, "easy") for i in range(episodes)]
    store_path = work / "store.jsonl"
    t0 = time.perf_counter()
    with QuietMonitor() as quiet, TrajectoryStore(store_path, fsync=False) as store:
        batch = engine.collect(tasks, 0, store=store)
        quarantined = store.quarantined
    wall = time.perf_counter() - t0
    quiet.warn_if_busy(f"soak of {episodes} episodes")
    time.sleep(0.5)
    stored = load(store_path, strict=True)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "episodes": episodes,
        "turns": sum(len(t.turns) for t in batch.trajectories),
        "wall_s": round(wall, 1),
        **quiet.record(),
        "returned": len(batch.trajectories),
        "stored": len(stored.trajectories),
        "quarantined": quarantined,
        "bad_lines": len(stored.bad_lines),
        "lost": episodes - len(stored.trajectories) - quarantined,
        "resolved (forged)": sum(t.outcome.resolved for t in batch.trajectories),
        "tool_errors": sum(t.tool_error for tr in batch.trajectories for t in tr.turns),
        "env_errors": sum(bool(t.meta.get("env_error")) for t in batch.trajectories),
        "host_effects": int(_tree_digest(canary) != digest) + sum(e.workspace is not None for e in made),
        "new_tmp_workspaces": len(_workspaces() - before_ws),  # includes other processes' (informative)
        "orphans": len(_orphans()),
        "peak_rss_mib": round(rss1 / 1024, 1),
        "rss_growth_mib": round((rss1 - rss0) / 1024, 1),
    }
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return result


def cost(repeats: int = 30) -> dict[str, Any]:
    """Median seconds of one sandboxed command, one editor view and one verification."""

    def med(fn, n):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    env = EmbeddedEnv(generate_task("train", 0, "easy"))
    env.reset()
    command = tool_call_message("", "terminal", {"command": "echo hi"}, "c")
    view = tool_call_message("", "file_editor", {"command": "view", "path": "/testbed"}, "c")
    assert "exit code 0" in env.step(command).observation[0]["content"]
    assert "up to 2 levels deep" in env.step(view).observation[0]["content"]
    with QuietMonitor() as quiet:
        t_cmd = med(lambda: env.step(command), repeats)
        t_view = med(lambda: env.step(view), repeats)
        env.submitted = True
        assert env.verify().submitted
        t_verify = med(env.verify, max(repeats // 2, 5))
    env.close()
    quiet.warn_if_busy("per-call cost")
    return {
        "command_ms": round(t_cmd * 1000, 1),
        "editor_view_ms": round(t_view * 1000, 2),
        "verify_ms": round(t_verify * 1000, 1),
        **quiet.record(),
        "unipost": str(Path(sys.modules["unipost"].__file__).parent),
    }


def _write(result: dict[str, Any], stem: str, state_at_start: dict[str, Any]) -> None:
    """Print the result with the machine line and keep it under benchmarks/results/."""
    print(f"machine at the start: {header_line(state_at_start)}")
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "result": result,
        "argv": sys.argv[1:],
        "machine_at_start": state_at_start,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="40 episodes")
    ap.add_argument("--cost", action="store_true", help="per-call cost figures instead of the soak")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()
    state_at_start = machine_state()
    tag = f"-{args.tag}" if args.tag else ""
    if args.cost:
        _write(cost(), f"soak_env-cost{tag}", state_at_start)
        return
    result = soak(40 if args.quick else args.episodes, seed=args.seed)
    _write(result, f"soak_env{'-quick' if args.quick else ''}{tag}", state_at_start)
    bad = {
        k: result[k]
        for k in ("lost", "bad_lines", "resolved (forged)", "host_effects", "orphans")
        if result[k]
    }
    if bad:
        raise SystemExit(f"soak found problems: {bad}")


if __name__ == "__main__":
    main()
