"""Why does fine-tuning the lab's warm start hurt it? Ablations on VALIDATION tasks (train split 900,100+).

Each arm: one Trainer run from the shipped warm start (the main job's settings unless overridden),
then greedy episodes of the trained student on the same validation tasks as the warm start, compared
paired (difference, bootstrap 95% interval over tasks, exact McNemar p, tasks gained / lost).
Never the held-out split: held-out tasks are reserved for the reported results.

    python experiments/ablations/finetune_ablation.py --arm base --arm dagger:lr=3e-4 ...
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

VAL_START = 900_100


def parse_arm(spec: str) -> tuple[str, str, dict]:
    name = spec
    recipe, _, rest = spec.partition(":")
    over: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "beta":  # start/step/floor of DAgger's linear decay
            start, step, floor = (float(v) for v in value.split("/"))
            over["rk.beta"] = {"start": start, "step": step, "floor": floor}
            continue
        over[key] = (
            json.loads(value)
            if value[:1] in '[{"tf' or value in ("true", "false", "null")
            else float(value)
            if any(c in value for c in ".e")
            else int(value)
        )
    return name, recipe, over


def mcnemar(gained: int, lost: int) -> float:
    n = gained + lost
    if n == 0:
        return 1.0
    k = min(gained, lost)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * p)


def paired(a: np.ndarray, b: np.ndarray, reps: int = 10_000, seed: int = 0) -> dict:
    d = b.astype(float) - a.astype(float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(reps, len(d)))
    boots = d[idx].mean(1)
    gained, lost = int(((b == 1) & (a == 0)).sum()), int(((b == 0) & (a == 1)).sum())
    return {
        "diff": float(d.mean()),
        "ci": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
        "gained": gained,
        "lost": lost,
        "p": mcnemar(gained, lost),
    }


def greedy_outcomes(trainer) -> tuple[dict, dict]:
    """The trainer's held-out evaluation, keeping each episode's outcome (paired comparisons need it)."""
    from unipost.eval.evaluate import EvalResult, student_rollouts

    cfg = trainer.config
    batch = student_rollouts(
        trainer.make_env,
        trainer.student_policy,
        trainer.heldout_tasks(),
        caller="ablation",
        purpose="eval",
        greedy=True,
        max_turns=cfg.rollout.max_turns,
        context_budget=cfg.rollout.context_budget,
        count_tokens=trainer.renderer.count_tokens,
        concurrency=cfg.rollout.concurrency,
        seed=cfg.seed,
    )
    res = EvalResult.from_trajectories(batch.trajectories, stats=batch.stats)
    metrics = {k: v for k, v in res.to_dict().items() if isinstance(v, (int, float))}
    return {t.task_id: int(t.outcome.resolved) for t in batch.trajectories}, metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arm", action="append", default=[])
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--assets", default=None, help="a warm-start directory other than the shipped one")
    args = ap.parse_args()

    from unipost.train.lab import tiny_config  # noqa: F401
    from unipost.train.main_job import main_config
    from unipost.train.trainer import Trainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    val = [("train", VAL_START + i) for i in range(args.tasks)]
    tag = f"-{Path(args.assets).name}" if args.assets else ""  # a warm start other than the shipped one
    base_file = out / f"base-seed{args.seed}-n{args.tasks}{tag}.json"
    for spec in args.arm:
        name, recipe, over = parse_arm(spec)
        torch.set_num_threads(int(__import__("os").environ.get("ABL_THREADS", "2")))
        t0 = time.perf_counter()
        if recipe == "base":
            if base_file.exists():
                continue
            cfg = main_config(str(out), recipe="sft", seed=args.seed, assets=args.assets).replace(
                name=f"base-s{args.seed}", iterations=1
            )
            trainer = Trainer(cfg, heldout_tasks=val)
            outcomes, m = greedy_outcomes(trainer)
            base_file.write_text(json.dumps({"metrics": m, "outcomes": outcomes}))
            print(
                "base",
                m.get("eval/resolve_rate"),
                m.get("eval/tool_error_rate"),
                f"{(time.perf_counter() - t0) / 60:.1f} min",
                flush=True,
            )
            continue
        reread = bool(over.pop("reread", 1))  # the scripted expert's re-read after a refused edit
        from unipost.envs.embedded import expert as expert_module

        expert_module.ScriptedExpert.__init__.__kwdefaults__["reread_after_failed_edit"] = reread
        sections = {"optim": {}, "rollout": {}, "env": {}, "eval": {}}
        top = {}
        for key, value in over.items():
            sec, _, field = key.partition(".")
            if field and sec != "rk":
                sections[sec][field] = value
            else:
                top[key] = value
        cfg = main_config(str(out), recipe=recipe, seed=args.seed, assets=args.assets)
        upd = {k: {**dict(getattr(cfg, k)), **v} for k, v in sections.items() if v}
        recipe_kwargs = {k[3:]: top.pop(k) for k in list(top) if k.startswith("rk.")}
        if recipe_kwargs:
            top["recipe_kwargs"] = {**cfg.recipe_kwargs, **recipe_kwargs}
        cfg = cfg.replace(
            name=name.replace(":", "_").replace(",", "_").replace("=", "")[:120] + f"-s{args.seed}{tag}",
            eval={"every": 0},
            **upd,
            **top,
        )
        trainer = Trainer(cfg, heldout_tasks=val)
        trainer.fit()
        outcomes, m = greedy_outcomes(trainer)
        base = json.loads(base_file.read_text())
        ids = sorted(outcomes)
        a = np.array([base["outcomes"][i] for i in ids])
        b = np.array([outcomes[i] for i in ids])
        cmp = paired(a, b)
        row = {
            "arm": spec,
            "assets": args.assets,
            "seed": args.seed,
            "n": len(ids),
            "base": float(a.mean()),
            "resolve": float(b.mean()),
            **cmp,
            "eff": trainer.effective_samples,
            "minutes": (time.perf_counter() - t0) / 60,
            "tool_error_rate": m.get("eval/tool_error_rate"),
            "metrics": m,
            "outcomes": outcomes,
        }
        with results_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{spec} seed {args.seed}: base {a.mean():.3f} -> {b.mean():.3f}  diff {cmp['diff']:+.3f} "
            f"[{cmp['ci'][0]:+.3f}, {cmp['ci'][1]:+.3f}] +{cmp['gained']}/-{cmp['lost']} p={cmp['p']:.3f} "
            f"eff={trainer.effective_samples} err={m.get('eval/tool_error_rate'):.3f} "
            f"{row['minutes']:.1f} min",
            flush=True,
        )


if __name__ == "__main__":
    main()
