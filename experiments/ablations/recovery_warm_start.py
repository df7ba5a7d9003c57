"""Does a warm start that has seen tool errors leave DAgger something it can learn? (issue 20, item 6)

The shipped warm start was cloned from error-free expert demos, so every state after a tool error is
out of its distribution (label_nll_probe.py: the labels' first tokens there cost 14-27 nats). An
instruct LLM, the paper's starting point, has seen failed commands and their fixes. This script makes
the lab's student closer to that: it continues behaviour cloning of the shipped student on a mixture of
fresh clean demos and **recovery demos**, episodes where a "clumsy expert" sometimes emits the kind of
broken turn the student emits (an edit whose old_str is off by a character, a cut or malformed tool
call, a call with a wrong argument, a look at the wrong file), each parsed and executed exactly as a
model's output would be (the rollout engine, `parse_assistant`), with the scripted expert's label at
every state. Only the labels are trained, never the broken actions.

    python experiments/ablations/recovery_warm_start.py --out runs/ws-recovery --demos 800 --recovery 800

The result is a warm-start directory (tokenizer, student, teacher, manifest with hashes) that
`finetune_ablation.py --assets DIR` and the lab (`tiny_config(assets=DIR)`) accept. Demo indices are
train-split 40,000+ (disjoint from the shipped demos at 20,000+, the RL pool and validation).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DEMO_START = 40_000

CORRUPTIONS = ("old_str", "cut_call", "bad_json", "stray_close", "wrong_argument", "wrong_file")


@dataclass
class ClumsyExpert:
    """The scripted expert, but each turn is broken with probability ``p`` (at most ``max_errors``)."""

    p: float = 0.25
    max_errors: int = 2
    seed: int = 0
    white_box = False

    def __post_init__(self) -> None:
        from unipost.envs.embedded.expert import ScriptedExpert

        self.expert = ScriptedExpert()

    def act(self, states, *, greedy: bool = False):
        from unipost.data import PolicyOutput

        outs = []
        for state in states:
            label = self.expert.next_action(state)
            rng = random.Random(f"clumsy/{state.env.task.task_id}/{state.turn}/{self.seed}")
            errors = sum(
                1
                for m in state.messages
                if m.get("role") in ("tool", "user") and "ERROR" in str(m.get("content"))
            )
            if state.turn == 0 or errors >= self.max_errors or rng.random() >= self.p:
                outs.append(PolicyOutput(message=label))
                continue
            outs.append(self._broken(label, state, rng))
        return outs

    def _broken(self, label, state, rng: random.Random):
        from unipost.data import PolicyOutput
        from unipost.envs.embedded.perturb import random_perturbation
        from unipost.rendering.toolcalls import format_assistant, parse_assistant

        call = (label.get("tool_calls") or [{}])[0].get("function", {})
        args = json.loads(call.get("arguments", "{}")) if call else {}
        kinds = list(CORRUPTIONS)
        if args.get("command") == "str_replace":
            kinds += ["old_str"] * 4  # the student's most common failure: an edit that does not apply
        kind = rng.choice(kinds)
        if kind == "old_str" and args.get("command") != "str_replace":
            kind = "bad_json"
        if kind == "wrong_file":
            return PolicyOutput(message=random_perturbation(state.env, rng, "view_random_file"))
        if kind in ("old_str", "wrong_argument"):
            new = dict(args)
            if kind == "old_str":
                new["old_str"] = _mutate(args["old_str"], rng)
            elif "new_str" in args or args.get("command") == "view":
                new["new_str" if args.get("command") == "view" else "view_range"] = (
                    args.get("new_str", "x") if args.get("command") == "view" else "1, 3"
                )
            else:
                new["path"] = str(args.get("path", "/testbed"))[: max(1, len(str(args.get("path", ""))) // 2)]
            msg = {
                **label,
                "tool_calls": [
                    {**label["tool_calls"][0], "function": {**call, "arguments": json.dumps(new)}}
                ],
            }
            return PolicyOutput(message=msg)
        text = format_assistant(label)
        if kind == "cut_call":
            cut = text.find("<tool_call>")
            text = text[: rng.randrange(cut + 12, len(text) - 12)] if cut >= 0 else text[: len(text) // 2]
        elif kind == "bad_json":
            pos = [i for i, c in enumerate(text) if c == '"' and i > text.find("<tool_call>")]
            if pos:
                i = rng.choice(pos)
                text = text[:i] + text[i + 1 :]
        else:  # stray_close
            text = (label.get("content") or "").rstrip() + "\n</tool_call>"
        parsed = parse_assistant(
            text, "hermes", tools=state.tools or None, max_calls=1, id_prefix=f"call_t{state.turn}"
        )
        return PolicyOutput(parsed.message, None, None, parsed.error, text, parsed.kind)


def _mutate(line: str, rng: random.Random) -> str:
    """An old_str the way the student gets it wrong: one character or the indentation off."""
    first = line.split("\n")[0]
    options = [
        lambda s: s.replace("    ", "  ", 1) if s.startswith("    ") else "  " + s,
        lambda s: s[:-1] if len(s) > 1 else s + "x",
        lambda s: (lambda i: s[:i] + s[i + 1 :])(rng.randrange(len(s))) if len(s) > 4 else s + " ",
        lambda s: s.replace("(", "[", 1) if "(" in s else s + ")",
    ]
    out = rng.choice(options)(first)
    return out if out != first else first + "  "


def collect(n_clean: int, n_recovery: int, p: float, difficulty: str, max_obs: int):
    from unipost.envs.embedded.expert import ScriptedExpert
    from unipost.envs.registry import embedded_env_factory
    from unipost.objective import SFT, Recipe, StudentRollout, TeacherLabels
    from unipost.rollout.engine import RolloutEngine

    factory = embedded_env_factory(difficulty, max_obs, prompt_tools=False)
    clean = (
        RolloutEngine(
            factory,
            student=None,
            teacher=ScriptedExpert(),
            recipe=SFT(rejection_sampling=False),
            max_turns=40,
            concurrency=8,
            progress=True,
        )
        .collect([("train", DEMO_START + i) for i in range(n_clean)], iteration=0)
        .trajectories
    )
    recovery = (
        RolloutEngine(
            factory,
            student=ClumsyExpert(p=p),
            teacher=ScriptedExpert(),
            recipe=Recipe(StudentRollout(), TeacherLabels(), name="recovery-demos"),
            max_turns=40,
            concurrency=8,
            progress=True,
        )
        .collect([("train", DEMO_START + n_clean + i) for i in range(n_recovery)], iteration=0)
        .trajectories
    )
    return clean, recovery


def continue_training(
    parent: Path, which: str, trajs, *, lr: float, epochs: float, docs_per_step: int, seed: int
):
    from unipost.objective import SFT
    from unipost.rendering.chat import ChatRenderer
    from unipost.train.optimise import lr_factor, make_microbatches, optimise_epoch
    from unipost.train.warm_start import load_model

    model, tok = load_model(parent / which)
    model.train()
    renderer = ChatRenderer(tok, None)
    recipe = SFT(rejection_sampling=False)
    batches = make_microbatches(trajs, recipe, renderer, max_tokens=4096)
    accumulation = max(1, round(docs_per_step / (len(trajs) / max(len(batches), 1))))
    total = math.ceil(epochs * math.ceil(len(batches) / accumulation))
    warmup = max(1, round(0.05 * total))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    step = 0
    losses = []

    class DoneError(Exception):
        pass

    def on_step(metrics):
        nonlocal step
        step += 1
        losses.append(float(metrics.get("loss", float("nan"))))
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, total, schedule="cosine", warmup_steps=warmup, min_lr_ratio=0.05)
        if step % 25 == 0:
            print(f"{which} step {step}/{total} loss {sum(losses[-25:]) / 25:.3f}", flush=True)
        if step >= total:
            raise DoneError

    for g in opt.param_groups:
        g["lr"] = lr * lr_factor(0, total, schedule="cosine", warmup_steps=warmup)
    gen = torch.Generator().manual_seed(seed)
    try:
        while True:
            optimise_epoch(
                model,
                batches,
                recipe,
                opt,
                generator=gen,
                grad_accumulation=accumulation,
                grad_clip=1.0,
                on_step=on_step,
            )
    except DoneError:
        pass
    return model.eval(), tok, {"steps": total, "accumulation": accumulation, "final_loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--demos", type=int, default=800)
    ap.add_argument("--recovery", type=int, default=800)
    ap.add_argument("--p", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--teacher-epochs", type=float, default=3.0)
    args = ap.parse_args()

    from unipost.train.warm_start import ASSETS, MANIFEST, _hashes, _save, load_manifest

    torch.set_num_threads(1)
    started = time.perf_counter()
    parent = load_manifest(ASSETS)
    spec = parent["spec"]
    clean, recovery = collect(
        args.demos, args.recovery, args.p, spec["difficulty"], spec["max_observation_chars"]
    )
    errors = sum(t.tool_error for tr in recovery for t in tr.turns if t.executor == "student")
    print(
        f"{len(clean)} clean + {len(recovery)} recovery demos ({errors} broken turns) in "
        f"{time.perf_counter() - started:.0f} s; "
        f"recovery resolved {sum(t.outcome.resolved for t in recovery)}",
        flush=True,
    )
    data = clean + recovery
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    info = {}
    for which, epochs in (("student", args.epochs), ("teacher", args.teacher_epochs)):
        if epochs <= 0:  # keep the parent's network (a quick check of the student alone)
            shutil.copytree(ASSETS / which, tmp / which)
            continue
        model, tok, info[which] = continue_training(
            ASSETS, which, data, lr=args.lr, epochs=epochs, docs_per_step=spec["docs_per_step"], seed=0
        )
        _save(model, tok, tmp / which, spec["save_dtype"])
    manifest = {
        "spec": spec,
        "parent": {"root": str(ASSETS), "sha256": parent["sha256"], "command": parent["command"]},
        "continued": {
            **vars(args),
            "demo_start": DEMO_START,
            "training": info,
            "broken_turns": errors,
            "minutes": (time.perf_counter() - started) / 60,
        },
        "command": "python experiments/ablations/recovery_warm_start.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }
    manifest["sha256"] = _hashes(tmp)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(json.dumps(manifest["continued"], indent=1), flush=True)


if __name__ == "__main__":
    main()
