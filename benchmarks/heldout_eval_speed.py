"""Time the main job's held-out evaluation and record its per-task actions, to compare two code versions.

    python benchmarks/heldout_eval_speed.py run --tasks 40 --out /tmp/after.json
    git archive <old commit> unipost | tar -x -C /tmp/old   # the code before a change
    PYTHONPATH=/tmp/old python benchmarks/heldout_eval_speed.py run --tasks 40 --out /tmp/before.json
    python benchmarks/heldout_eval_speed.py compare /tmp/before.json /tmp/after.json

``run`` builds the main job's Trainer (``main_config(recipe="sft")``: the shipped warm start, its budgets,
concurrency 64) on train-split validation tasks 900,100+ and times ``Trainer.evaluate_heldout()`` (greedy,
student only), printing the load average before and after. ``compare`` checks that every episode's outcome,
executed actions, sampled token ids and observations are identical, and reports how far log-probs moved.
Run the two versions back to back on one machine; see "Held-out evaluation speed" in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def run(tasks: int, out: str | None) -> None:
    import torch

    import unipost
    from unipost.train.main_job import main_config
    from unipost.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = main_config(tmp, recipe="sft").replace(name="heldout-speed")
        trainer = Trainer(cfg, heldout_tasks=[("train", 900_100 + i) for i in range(tasks)])
        load = os.getloadavg()
        t0 = time.perf_counter()
        result = trainer.evaluate_heldout()
        wall = time.perf_counter() - t0
    s = result.stats
    print(f"unipost from {os.path.dirname(unipost.__file__)}, torch threads {torch.get_num_threads()}")
    print(
        f"{tasks} tasks: {wall:.1f} s (student {s.student_time_s:.1f} s, env {s.env_time_s:.1f} s), "
        f"{s.turns} turns, resolved {s.resolved}; load1 before/after {load[0]:.2f} / {os.getloadavg()[0]:.2f}"
    )
    if out:
        records = [
            {
                "task": t.task_id,
                "resolved": t.outcome.resolved,
                "failure_mode": t.outcome.failure_mode,
                "ended_by": t.meta.get("ended_by"),
                "turns": [
                    {
                        "action": turn.action,
                        "ids": turn.action_token_ids,
                        "logprobs": turn.action_logprobs,
                        "observation": turn.observation,
                        "tool_error_kind": turn.tool_error_kind,
                    }
                    for turn in t.turns
                ],
            }
            for t in result.trajectories
        ]
        with open(out, "w") as f:
            json.dump({"wall_s": wall, "episodes": records}, f)


def compare(a_path: str, b_path: str) -> bool:
    with open(a_path) as fa, open(b_path) as fb:
        a, b = json.load(fa)["episodes"], json.load(fb)["episodes"]
    same = len(a) == len(b)
    diffs: list[float] = []
    for x, y in zip(a, b, strict=False):
        keys = ("task", "resolved", "failure_mode", "ended_by")
        same &= all(x[k] == y[k] for k in keys) and len(x["turns"]) == len(y["turns"])
        for s, t in zip(x["turns"], y["turns"], strict=False):
            same &= all(s[k] == t[k] for k in ("action", "ids", "observation", "tool_error_kind"))
            diffs += [abs(p - q) for p, q in zip(s["logprobs"] or [], t["logprobs"] or [], strict=False)]
    identical = sum(d == 0 for d in diffs)
    print(
        f"{len(a)} episodes: outcomes, actions, token ids and observations identical: {same}; "
        f"resolved {sum(e['resolved'] for e in a)} vs {sum(e['resolved'] for e in b)}; log-probs identical "
        f"{identical}/{len(diffs)}, max |diff| {max(diffs, default=0.0):.2g}"
    )
    return same


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tasks", type=int, default=40)
    r.add_argument("--out", default=None)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = parser.parse_args()
    if args.cmd == "run":
        run(args.tasks, args.out)
    else:
        raise SystemExit(0 if compare(args.a, args.b) else 1)


if __name__ == "__main__":
    main()
