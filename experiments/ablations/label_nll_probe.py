"""Where does the warm start's loss on DAgger labels sit? Per-token NLL of expert labels, split by the
state (teacher-executed, student first attempt, student after a tool error) and by the tokens (inside the
``old_str`` argument of a str_replace, i.e. a line copied from the context, vs everything else).

    python experiments/ablations/label_nll_probe.py RUN_DIR [MODEL_DIR]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from unipost.data import Trajectory
from unipost.rendering.chat import ChatRenderer
from unipost.train.lab import warm_start
from unipost.train.warm_start import load_model


def main() -> None:
    run = sys.argv[1]
    model_dir = sys.argv[2] if len(sys.argv) > 2 else warm_start()["root"] + "/student"
    model, tok = load_model(model_dir)
    renderer = ChatRenderer(tok, None)
    lines = Path(f"{run}/trajectories.jsonl").read_text().splitlines()
    trajs = [Trajectory.model_validate_json(line) for line in lines]
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    examples: list[tuple[float, str, str, float]] = []
    for traj in trajs[:48]:
        after_error = False
        for turn in traj.turns:
            if turn.label is None:
                continue
            state = (
                "teacher"
                if turn.executor == "teacher"
                else ("student-after-error" if after_error else "student")
            )
            context = traj.context(turn.index)
            ctx = renderer.context_ids(context)
            lab = renderer.label_ids(context, turn.label)
            with torch.no_grad():
                logits = model(torch.tensor([ctx + lab])).logits[0, len(ctx) - 1 : -1]
            nll = -torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(lab)[:, None])[:, 0]
            args = (
                json.loads(turn.label["tool_calls"][0]["function"]["arguments"])
                if turn.label.get("tool_calls")
                else {}
            )
            old = args.get("old_str") if args.get("command") == "str_replace" else None
            # mark label tokens that lie inside the old_str value (by decoded text offsets)
            text, marks = "", []
            old_json = json.dumps(old)[1:-1] if old else None
            for tid in lab:
                piece = tok.decode([tid])
                text += piece
                marks.append(len(text))
            start = text.find(old_json) if old_json else -1
            if state == "student-after-error":
                worst = max(range(len(lab)), key=lambda k: nll[k])
                examples.append(
                    (
                        float(nll.sum()),
                        turn.label.get("content", "")[:70],
                        tok.decode(lab[max(0, worst - 3) : worst + 2]),
                        float(nll[worst]),
                    )
                )
            for k, v in enumerate(nll.tolist()):
                inside = start >= 0 and start < marks[k] <= start + len(old_json) + 1
                kind = "old_str" if inside else "other"
                sums[(state, kind)][0] += v
                sums[(state, kind)][1] += 1
            after_error = after_error or turn.tool_error
    for ex in sorted(examples, reverse=True)[:12]:
        print(f"{ex[0]:7.1f} {ex[1]!r:75s} worst {ex[2]!r} ({ex[3]:.1f})")
    print(f"{'state':22s} {'tokens':8s} {'count':>7s} {'NLL/token':>10s} {'share of NLL':>12s}")
    total = sum(s for s, _ in sums.values())
    for (state, kind), (s, n) in sorted(sums.items()):
        print(f"{state:22s} {kind:8s} {n:7d} {s / max(n, 1):10.3f} {s / total:12.1%}")


if __name__ == "__main__":
    main()
