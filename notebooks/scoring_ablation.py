# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Scoring-function ablation: which tokens does the score reinforce?
#
# Paper §3.3, Eq. 14: every method in the family is one update
#
#     grad L = E_{x ~ d_C} E_{y ~ d_L(.|x)} [ sg(w(x, y)) * grad(-log pi_theta(y | x)) ] + grad R
#
# Here the context distribution d_C and the label distribution d_L are held fixed and only the
# score w changes. Contexts: a turn-level mixture in which the teacher executes each turn with
# probability beta; labels: the student's **own** sampled turns (y ~ pi_theta, which score-function
# weights need). The paper's GRPO and OPD use pure student rollouts (`StudentRollout`); a student this
# small rarely resolves a task on its own, so there SuccessFilter and GroupAdvantage would be zero on
# almost every token. Mixture contexts let some episodes resolve (an outcome-based score then credits the
# student turns of those episodes, treating the teacher's turns as part of the environment). The
# scores:
#
# | score | w per label token | needs |
# |---|---|---|
# | `Uniform()` | 1: plain self-imitation of the student's samples | nothing |
# | `SuccessFilter()` | 1[episode resolved]: rejection-sampling fine-tuning | rewards |
# | `GroupAdvantage()` | (r - mean_group r) / std_group r: GRPO | rewards, groups |
# | `TeacherLogRatio()` | log pi_T(y_j) - log pi_theta(y_j): OPD's per-token reverse-KL | white-box teacher |
# | `SuccessFilter() * TeacherLogRatio()` | distil the teacher only on resolved episodes | both |
#
# Each variant is one `Recipe(...)` line. Every variant is trained with the real `Trainer` on the
# embedded mini-SWE environment, from the same warm start (the tiny lab's), with the same seed, tasks
# and budget. We then look at (1) what each score does to the *same* tokens, and (2) what training with
# it does to the student: the reverse KL to the teacher on held-out student-visited states (paper
# §4.4; the states the warm start visits, the same for every variant, so the comparison is paired) and
# the NLL of the expert's actions on held-out expert states.
#
# Budget: `UNIPOST_NB_BUDGET=smoke | small | full` (see `notebooks/README.md`). The student is the tiny
# lab's warm start (a few-MB Qwen3 behaviour-cloned on scripted-expert demos): the point is that the
# whole pipeline runs and the checks below hold, not the size of the effects.

# %%
import copy
import math
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from unipost.batch import build_batch, objective_loss
from unipost.eval import collect_student_states, reverse_kl_on_student_states
from unipost.kernels import packed_logprobs
from unipost.objective import (
    SFT,
    GroupAdvantage,
    OwnSamples,
    Recipe,
    ScoreInputs,
    SuccessFilter,
    TeacherLogRatio,
    TurnMixture,
    Uniform,
)
from unipost.rollout.transformers_policy import TransformersPolicy
from unipost.train.config import TrainConfig
from unipost.train.lab import tiny_config
from unipost.train.setup import expert_trajectories
from unipost.train.trainer import Trainer

BUDGET = os.environ.get("UNIPOST_NB_BUDGET", "small")
BUDGETS = {
    # tasks x group_size episodes per iteration; the expert needs 6 turns on an easy task, so a turn
    # budget of 7-8 leaves room for a (harmless or wasted) student turn or two in a resolved episode
    "smoke": dict(
        iterations=1,
        tasks=1,
        group=2,
        beta=0.5,
        max_turns=3,
        new_tokens=8,
        kl_tasks=1,
        kl_turns=2,
        seeds=[0],
    ),
    "small": dict(
        iterations=1,
        tasks=2,
        group=2,
        beta=0.8,
        max_turns=7,
        new_tokens=12,
        kl_tasks=2,
        kl_turns=3,
        seeds=[0],
    ),
    "full": dict(
        iterations=3,
        tasks=3,
        group=2,
        beta=0.75,
        max_turns=8,
        new_tokens=16,
        kl_tasks=3,
        kl_turns=3,
        seeds=[0, 1],
    ),
}
if BUDGET not in BUDGETS:
    raise ValueError(f"UNIPOST_NB_BUDGET={BUDGET!r}: choose one of {sorted(BUDGETS)}")
B = BUDGETS[BUDGET]
FIGURES = Path(os.environ.get("UNIPOST_NB_FIGURES", "figures"))
OUT = Path(tempfile.mkdtemp(prefix="unipost-scoring-"))  # runs, and any cache: never ~/.cache/unipost
ASSETS = os.environ.get("UNIPOST_LAB_ASSETS")  # None: the shipped warm start (unipost/assets/tiny-lab)
torch.set_num_threads(min(2, os.cpu_count() or 1))
print(f"budget {BUDGET}: {B}; runs in {OUT}")

# %% [markdown]
# ## The shared set-up: the tiny lab's warm start and white-box teacher
#
# `unipost.train.lab.tiny_config` is the project's one CPU set-up (the README's main job and
# `benchmarks/bench_methods.py` start from it too): the student is the shipped warm start, the
# white-box teacher the same behaviour-cloning run trained longer; both are hash-checked files
# (`unipost/assets/tiny-lab/manifest.json` says how they were built), so nothing is built or cached
# here. A Trainer built from that config loads them; the notebook only states what differs from the
# lab (its budget). The scripted expert executes the teacher's turns; the teacher network only
# supplies log-probs (OPD's weight and the KL diagnostic).

# %%
started = time.perf_counter()


def base_config(seed: int) -> TrainConfig:
    return tiny_config(
        str(OUT / f"seed{seed}"),
        recipe="opd",  # the set-up Trainer below then loads the white-box teacher
        assets=ASSETS,
        name="scoring",
        seed=seed,
        iterations=B["iterations"],
        progress=False,
        cache_dir=str(OUT / "cache"),
        env={"heldout_tasks": B["kl_tasks"]},
        rollout={
            "episodes_per_iteration": B["tasks"],
            "max_turns": B["max_turns"],
            "max_new_tokens": B["new_tokens"],
        },
        eval={"every": 0, "kl_tasks": 0},  # the diagnostics below are computed here, on fixed tasks
    )


lab = Trainer(base_config(0).replace(name="setup"))  # loads student, tokenizer and white-box teacher
warm_start, teacher, tokenizer, renderer = lab.student, lab.teacher_model, lab.tokenizer, lab.renderer
make_env, heldout = lab.make_env, lab.heldout_tasks()
heldout_expert = expert_trajectories(
    len(heldout),
    split="heldout",
    **lab.config.env.model_dump(include={"difficulty", "max_observation_chars", "prompt_tools"}),
)
print(f"set-up {time.perf_counter() - started:.1f}s; warm start from {lab.config.model.path}")


def student_states(student: torch.nn.Module) -> list:
    """One sampled rollout per held-out task (seeded): the student-visited states of paper §4.4."""
    policy = TransformersPolicy(student, tokenizer, max_new_tokens=B["new_tokens"], seed=123)
    return collect_student_states(make_env, policy, heldout, max_turns=B["kl_turns"], seed=0)


def diagnostics(student: torch.nn.Module) -> dict[str, float]:
    """Reverse KL(student || teacher) on the warm start's held-out student states (the same states for
    every variant: a paired comparison, no sampling noise between variants), and the NLL of the
    expert's actions on held-out expert states."""
    kl = reverse_kl_on_student_states(student, teacher, fixed_states, renderer).mean_kl
    sft = SFT(rejection_sampling=False)
    with torch.no_grad():
        nll, _ = objective_loss(student, build_batch(heldout_expert, sft, renderer), sft)
    return {"reverse_kl": float(kl), "expert_nll": float(nll)}


fixed_states = student_states(warm_start)
warm_diag = diagnostics(warm_start)
print("warm start:", {k: round(v, 3) for k, v in warm_diag.items()})

# %% [markdown]
# ## The variants: one line each
#
# Context and labels are the same object in every recipe; only the score differs. A product of two
# scores is `a * b`.

# %%
context = TurnMixture(B["beta"], group_size=B["group"])
variants = {
    "Uniform": Recipe(context, OwnSamples(), Uniform(), name="Uniform"),
    "SuccessFilter": Recipe(context, OwnSamples(), SuccessFilter(), name="SuccessFilter"),
    "GroupAdvantage": Recipe(context, OwnSamples(), GroupAdvantage(), name="GroupAdvantage"),
    "TeacherLogRatio": Recipe(context, OwnSamples(), TeacherLogRatio(), name="TeacherLogRatio"),
    "SuccessFilter x TeacherLogRatio": Recipe(context, OwnSamples(), SuccessFilter() * TeacherLogRatio()),
}
for name, recipe in variants.items():
    print(f"{name:32s} {recipe.describe()}")

# %% [markdown]
# ## Train every variant (same warm start, seed, tasks and budget)

# %%
runs: dict[tuple[str, int], dict] = {}
for seed in B["seeds"]:
    for name, recipe in variants.items():
        t0 = time.perf_counter()
        config = base_config(seed).replace(name=name.replace(" ", "_"))
        trainer = Trainer(
            config,
            recipe=recipe,
            tokenizer=tokenizer,
            student=copy.deepcopy(warm_start),
            teacher_model=teacher,
        )
        history = trainer.fit()
        changed = any(
            not torch.equal(p, q)
            for p, q in zip(trainer.student.parameters(), warm_start.parameters(), strict=True)
        )
        runs[name, seed] = dict(
            history=history,
            trajectories=trainer.store.load().trajectories,
            changed=changed,
            diag=diagnostics(trainer.student),
            seconds=time.perf_counter() - t0,
        )
        print(f"seed {seed} {name:32s} {runs[name, seed]['seconds']:.0f}s")

# %% [markdown]
# ## Lens 1: what each score does to the same tokens
#
# Every variant's first iteration collected the *same* episodes (same warm start, seed and tasks; the
# score plays no part in collection). On that shared batch we evaluate each recipe's weights
# `recipe.loss_weights(...)` exactly as the trainer does (with the warm-start student's log-probs).
# A group member without student turns has no label but still counts in its group's GRPO baseline.

# %%
first_seed = B["seeds"][0]
shared = [t for t in runs["Uniform", first_seed]["trajectories"] if t.meta.get("iteration") == 0]


def weights_on(recipe: Recipe, trajectories) -> tuple[torch.Tensor, object]:
    """weights_L of ``recipe`` on ``trajectories`` under the warm start (the trainer's own path)."""
    # the same tokens for every score: packed under Uniform (the variants differ only in the score),
    # so a filter's rejections show here as w = 0 (the trainer drops them before packing instead)
    batch = build_batch(trajectories, variants["Uniform"], renderer)
    with torch.no_grad():
        logp_L = packed_logprobs(warm_start, batch.packed).logp_L
        teacher_logp_L = packed_logprobs(teacher, batch.packed).logp_L
    inputs = ScoreInputs(
        logp_L=logp_L,
        label_seq_L=batch.packed.label_seq_L,
        traj_of_seq_S=batch.traj_of_seq_S,
        reward_B=batch.reward_B,
        resolved_B=batch.resolved_B,
        submitted_B=batch.submitted_B,
        teacher_logp_L=teacher_logp_L,
        group_of_traj_B=batch.group_of_traj_B,
    )
    return recipe.loss_weights(inputs) * batch.packed.label_weight_L, batch


scored = {name: weights_on(recipe, shared) for name, recipe in variants.items()}
weights = {name: w for name, (w, _) in scored.items()}
shared_batch = scored["Uniform"][1]
resolved = sum(t.outcome.resolved for t in shared)
student_turns = sum(t.executor == "student" for tr in shared for t in tr.turns)
print(
    f"shared batch: {len(shared)} episodes, {resolved} resolved, {student_turns} student turns, "
    f"{shared_batch.packed.num_labels} labels, {shared_batch.packed.num_label_tokens} label tokens"
)
print(f"{'score':32s} {'mean w':>8s} {'nonzero':>8s} {'min':>8s} {'max':>8s}")
for name, w in weights.items():
    print(f"{name:32s} {w.mean():8.3f} {(w != 0).float().mean():8.0%} {w.min():8.3f} {w.max():8.3f}")

fig, ax = plt.subplots(figsize=(9, 3.6))
ax.boxplot([w.numpy() for w in weights.values()], showfliers=True)
ax.set_xticks(range(1, len(weights) + 1), [n.replace(" x ", "\nx ") for n in weights], fontsize=8)
ax.axhline(0, color="grey", linewidth=0.8)
ax.set_ylabel("w per label token")
ax.set_title(
    f"Scores on the same {shared_batch.packed.num_label_tokens} label tokens ({resolved} resolved episodes)"
)
fig.tight_layout()
FIGURES.mkdir(parents=True, exist_ok=True)
fig.savefig(FIGURES / f"scoring_weights_{BUDGET}.png", dpi=110)
plt.show()

# %% [markdown]
# ## Lens 2: what training with each score does to the student

# %%
rows = []
for (name, seed), run in runs.items():
    last = run["history"][-1]
    weights_seen = [r["train/mean_weight"] for r in run["history"] if "train/mean_weight" in r]
    rows.append(
        dict(
            variant=name,
            seed=seed,
            loss=last.get("train/loss", math.nan),
            any_weight=any(w != 0 for w in weights_seen),
            changed=run["changed"],
            effective=last["train/effective_samples"],
            d_kl=run["diag"]["reverse_kl"] - warm_diag["reverse_kl"],
            d_nll=run["diag"]["expert_nll"] - warm_diag["expert_nll"],
        )
    )
print(f"warm start: reverse KL {warm_diag['reverse_kl']:.3f}, expert NLL {warm_diag['expert_nll']:.3f}")
print(
    " ".join(
        ["variant".ljust(32), "seed", "loss".rjust(8), "signal", " moved", "labels", "     dKL", "    dNLL"]
    )
)
for r in rows:
    print(
        f"{r['variant']:32s} {r['seed']:4d} {r['loss']:8.3f} {r['any_weight']!s:>6s} {r['changed']!s:>6s} "
        f"{r['effective']:6.0f} {r['d_kl']:+8.3f} {r['d_nll']:+8.3f}"
    )

names = list(variants)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, key, label in [
    (axes[0], "d_kl", "change in reverse KL on student states"),
    (axes[1], "d_nll", "change in held-out expert NLL"),
]:
    means = [np.mean([r[key] for r in rows if r["variant"] == n]) for n in names]
    ax.bar(range(len(names)), means, color=[f"C{i}" for i in range(len(names))])
    for seed in B["seeds"]:
        ax.plot(
            range(len(names)),
            [next(r[key] for r in rows if r["variant"] == n and r["seed"] == seed) for n in names],
            "k.",
            markersize=6,
        )
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(names)), [n.replace(" x ", "\nx ") for n in names], fontsize=8)
    ax.set_title(label + " (lower = better)")
fig.suptitle(f"After {B['iterations']} iteration(s) (bars: mean over seeds {B['seeds']}; dots: seed)")
fig.tight_layout()
fig.savefig(FIGURES / f"scoring_training_{BUDGET}.png", dpi=110)
plt.show()

# %% [markdown]
# ## Checks (each can fail)
#
# * every variant trained: finite loss, and the same data budget (the first iteration's batch is the
#   same episodes for every variant; total labels within 30 %);
# * the scores behave as Eq. 14 says on real rollouts: the product's weights are the product of its
#   factors' weights, SuccessFilter's are 1[resolved], GroupAdvantage's are zero in groups whose
#   episodes all got the same reward;
# * the stop-gradient weight is the *only* channel of the score: a variant whose weights were zero in
#   every update left the student bit-identical, and one with any nonzero weight moved it.
#
# Qualitative claims (e.g. "OPD lowers the reverse KL more than self-imitation") are printed with their
# numbers, and asserted only where they held at this budget across the seeds checked.

# %%
for r in rows:
    assert math.isfinite(r["loss"]) or not r["any_weight"], f"{r['variant']}: loss {r['loss']}"
    assert r["changed"] == r["any_weight"], (
        f"{r['variant']} seed {r['seed']}: nonzero weights {r['any_weight']}, parameters moved {r['changed']}"
    )
for seed in B["seeds"]:
    firsts = [
        [
            (t.task_id, [(u.executor, u.action) for u in t.turns], t.outcome.resolved)
            for t in runs[n, seed]["trajectories"]
            if t.meta.get("iteration") == 0
        ]
        for n in names
    ]
    assert all(f == firsts[0] for f in firsts), (
        f"seed {seed}: first-iteration episodes differ between variants"
    )
    # a SuccessFilter's rejected episodes are neither trained on nor counted (rejection-sampled SFT is
    # SFT on the retained subset), so only the unfiltered variants share a budget
    matched = [n for n in names if "SuccessFilter" not in n]
    totals = [next(r["effective"] for r in rows if r["variant"] == n and r["seed"] == seed) for n in matched]
    assert max(totals) <= 1.3 * min(totals), f"seed {seed}: label budgets differ by more than 30 %: {totals}"

sf, tlr = weights["SuccessFilter"], weights["TeacherLogRatio"]
torch.testing.assert_close(weights["SuccessFilter x TeacherLogRatio"], sf * tlr, rtol=1e-6, atol=1e-6)
resolved_of_token = shared_batch.resolved_B[shared_batch.traj_of_seq_S[shared_batch.packed.label_seq_L]]
assert torch.equal(sf, resolved_of_token.float()), (
    "SuccessFilter's weight is not 1[resolved] on the shared batch"
)
# the GRPO batch also holds group members without labels (their reward is part of the baseline)
grpo_batch = scored["GroupAdvantage"][1]
rewards, groups = grpo_batch.reward_B, grpo_batch.group_of_traj_B
traj_of_token = grpo_batch.traj_of_seq_S[grpo_batch.packed.label_seq_L]
for g in groups.unique():
    members = groups == g
    if rewards[members].unique().numel() == 1:  # a degenerate group carries no signal
        assert torch.all(weights["GroupAdvantage"][members[traj_of_token]] == 0), f"group {int(g)}"
    else:  # binary rewards that differ: every member's advantage is nonzero
        assert torch.all(weights["GroupAdvantage"][members[traj_of_token]] != 0), f"group {int(g)}"
assert torch.all(weights["Uniform"] == 1)

opd = np.mean([r["d_kl"] for r in rows if r["variant"] == "TeacherLogRatio"])
uniform = np.mean([r["d_kl"] for r in rows if r["variant"] == "Uniform"])
print(
    f"reverse KL change: TeacherLogRatio {opd:+.3f} vs Uniform {uniform:+.3f} "
    + ("(OPD lower, as expected)" if opd < uniform else "(inconclusive at this budget)")
)
print(f"notebook total {time.perf_counter() - started:.0f}s")
