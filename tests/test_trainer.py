"""One Trainer for all five methods: seeded "makes progress" tests, bad configs, the honest loop.

Progress is measured on held-out data and must exceed a stated margin:
* SFT / DAgger / AggreVaTe: NLL of the expert's actions on held-out expert states drops by > 1 nat
  (a random-init student starts near ln|V|);
* OPD: reverse KL(student || teacher) on held-out student-visited states drops by > 20 % (student
  and teacher: the same network behaviour-cloned for 3 and 6 epochs; measured 1.51 -> 0.59);
* GRPO: mean reward of sampled rollouts on held-out prompts rises by > 0.1 (a real environment in
  this file whose verifier scores the fraction of vowels in the answer, so rewards vary within a
  group even for a random-init student, which a pass/fail SWE task would not give it).
"""

from __future__ import annotations

import copy
import json
import math
import re
import threading
from http.server import ThreadingHTTPServer

import pytest
import torch
from factories import TINY, session_cache, tiny_train_config

from unipost.batch import build_batch, objective_loss
from unipost.data import Outcome
from unipost.envs.base import StepResult
from unipost.objective import SFT
from unipost.train.config import (
    OptimConfig,
    ReferenceConfig,
    RolloutConfig,
    TeacherConfig,
    TrainConfig,
)
from unipost.train.optimise import lr_factor
from unipost.train.setup import build_task_tokenizer, expert_trajectories
from unipost.train.trainer import ConfigError, Trainer


@pytest.fixture(scope="module")
def cache_dir():
    """The test process's shared cache (its task tokenizer is built once for every module that uses it);
    test_max_effective_samples_stops_on_the_budget is the one Trainer test on an empty cache."""
    return session_cache()


@pytest.fixture(scope="module")
def task_tokenizer(cache_dir):
    return build_task_tokenizer(1024, difficulty="easy", max_observation_chars=600, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def heldout_expert():
    return expert_trajectories(3, difficulty="easy", max_observation_chars=600, split="heldout")


def tiny_config(tmp_path, cache_dir, recipe: str, **updates) -> TrainConfig:
    return tiny_train_config(tmp_path, cache_dir, recipe, **updates)


def expert_nll(model, tokenizer, tools, trajectories) -> float:
    from unipost.rendering.chat import ChatRenderer

    batch = build_batch(trajectories, SFT(rejection_sampling=False), ChatRenderer(tokenizer, tools))
    with torch.no_grad():
        loss, _ = objective_loss(model, batch, SFT(rejection_sampling=False))
    return float(loss)


@pytest.mark.parametrize("recipe", ["sft", "dagger", "aggrevate"])
def test_imitation_recipes_make_progress(recipe, tmp_path, cache_dir, task_tokenizer, heldout_expert):
    kwargs = (
        {"k": 2}
        if recipe == "aggrevate"
        else {"beta": 0.5, "filter_unsubmitted": False}
        if recipe == "dagger"
        else {}
    )
    cfg = tiny_config(tmp_path, cache_dir, recipe, recipe_kwargs=kwargs)
    trainer = Trainer(cfg, tokenizer=task_tokenizer)
    before = expert_nll(trainer.student, task_tokenizer, trainer.tools, heldout_expert)
    history = trainer.fit()
    after = expert_nll(trainer.student, task_tokenizer, trainer.tools, heldout_expert)
    assert before - after > 1.0, f"{recipe}: held-out expert NLL {before:.2f} -> {after:.2f}"
    del history
    if recipe != "sft":  # mixture rollouts: the expert's label is recorded at EVERY visited state
        trajs = trainer.store.load().trajectories
        assert any(t.executor == "student" for tr in trajs for t in tr.turns)
        assert all(t.label is not None for tr in trajs for t in tr.turns)
    assert (tmp_path / recipe / "metrics.jsonl").exists()
    assert trainer.checkpoints.latest().iteration == cfg.iterations - 1


def test_opd_makes_progress_on_reverse_kl(tmp_path, cache_dir, task_tokenizer):
    """OPD from a briefly cloned student towards the same network cloned longer (its teacher)."""
    from unipost.envs.embedded.tools import tool_schemas
    from unipost.eval import collect_student_states, reverse_kl_on_student_states
    from unipost.train.setup import cached_clones

    models = cached_clones(
        TINY,
        task_tokenizer,
        demos=6,
        snapshots=[3, 6],
        lr=1e-2,
        difficulty="easy",
        max_observation_chars=600,
        tools=tool_schemas(),
        cache_dir=cache_dir,
    )
    student, teacher = copy.deepcopy(models[3]), models[6]
    cfg = tiny_config(
        tmp_path,
        cache_dir,
        "opd",
        recipe_kwargs={"filter_unsubmitted": False},
        iterations=6,
        rollout=RolloutConfig(episodes_per_iteration=8, max_turns=3, context_budget=4096, max_new_tokens=32),
        optim=OptimConfig(lr=2e-3, micro_batch_tokens=4096, epochs_per_batch=2),
    )
    trainer = Trainer(cfg, tokenizer=task_tokenizer, student=student, teacher_model=teacher)

    def kl() -> float:
        trainer.student_policy.generator = torch.Generator().manual_seed(123)
        trajs = collect_student_states(
            trainer.make_env, trainer.student_policy, trainer.heldout_tasks(), max_turns=3, seed=0
        )
        return reverse_kl_on_student_states(trainer.student, teacher, trajs, trainer.renderer).mean_kl

    before = kl()
    trainer.fit()
    after = kl()
    assert after < 0.8 * before, f"reverse KL {before:.3f} -> {after:.3f}"


class VowelEnv:
    """A one-turn environment whose verifier rewards the fraction of vowels among the answer's letters."""

    def __init__(self, task: int):
        self.tools: list = []
        self.task = task
        self.answer = ""

    def reset(self):
        return [
            {"role": "system", "content": "Answer with many vowels."},
            {"role": "user", "content": f"Task {self.task}: write something."},
        ]

    def step(self, action):
        self.answer = action.get("content") or ""
        return StepResult(observation=[], done=True)

    def verify(self, ended_by=None):
        letters = [c for c in self.answer.lower() if c.isalpha()]
        reward = sum(c in "aeiou" for c in letters) / max(1, len(letters))
        return Outcome(resolved=reward > 0.5, submitted=True, reward=reward)

    def close(self):
        pass


def test_grpo_makes_progress_on_reward(tmp_path, cache_dir, task_tokenizer):
    cfg = tiny_config(
        tmp_path,
        cache_dir,
        "grpo",
        recipe_kwargs={"group_size": 8},
        iterations=6,
        rollout=RolloutConfig(episodes_per_iteration=6, max_turns=1, context_budget=4096, max_new_tokens=8),
        optim=OptimConfig(lr=3e-2, micro_batch_tokens=4096, epochs_per_batch=4),
    )
    trainer = Trainer(
        cfg,
        tokenizer=task_tokenizer,
        env_factory=VowelEnv,
        train_tasks=list(range(8)),
        heldout_tasks=list(range(100, 104)),
    )

    def mean_reward() -> float:
        from unipost.eval import collect_student_states

        trainer.student_policy.generator = torch.Generator().manual_seed(7)
        trajs = collect_student_states(
            VowelEnv, trainer.student_policy, list(range(100, 116)), max_turns=1, seed=0
        )
        return sum(t.outcome.reward for t in trajs) / len(trajs)

    before = mean_reward()
    trainer.fit()
    after = mean_reward()
    assert after > before + 0.1, f"mean reward {before:.3f} -> {after:.3f}"


def test_bad_configs_fail_fast_with_what_to_change(tmp_path, cache_dir, task_tokenizer):
    with pytest.raises(ValueError, match="unknown"):
        tiny_config(tmp_path, cache_dir, "dagger").replace(recipe="reinforce")
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        tiny_config(tmp_path, cache_dir, "dagger", recipe_kwargs={"beta": 1.5})
    with pytest.raises(ValueError, match="unexpected keyword"):
        tiny_config(tmp_path, cache_dir, "dagger", recipe_kwargs={"bta": 0.5})
    small = tiny_config(
        tmp_path,
        cache_dir,
        "dagger",
        rollout=RolloutConfig(context_budget=300, episodes_per_iteration=1, max_turns=2, max_new_tokens=8),
    )
    with pytest.raises(ConfigError, match=r"raise rollout\.context_budget"):
        Trainer(small, tokenizer=task_tokenizer)


def test_api_teacher_down_and_opd_refused(tmp_path, cache_dir, task_tokenizer):
    from unipost.objective import RecipeError
    from unipost.rollout.openai_policy import TeacherUnavailableError

    dead = TeacherConfig(
        kind="openai",
        base_url="http://127.0.0.1:9",
        model="teacher",
        max_retries=0,
        timeout_s=2.0,
        white_box="none",
        distill_epochs=1,
    )
    with pytest.raises(TeacherUnavailableError, match="did not answer"):
        Trainer(tiny_config(tmp_path, cache_dir, "dagger", teacher=dead), tokenizer=task_tokenizer)
    with pytest.raises(RecipeError, match="log-probs"):
        Trainer(tiny_config(tmp_path, cache_dir, "opd", teacher=dead), tokenizer=task_tokenizer)


# -- fidelity to the paper's runs (issue 12) ------------------------------------------------------


def _write_experiment(path, config_json: str) -> None:
    path.write_text(
        "from unipost.train.config import TrainConfig\n\n\n"
        f"def config():\n    return TrainConfig.model_validate_json({config_json!r})\n"
    )


def test_grpo_with_kl_trains_through_unipost_train(tmp_path, cache_dir):
    """A KL-regularised recipe gets its frozen reference (the initial student) from the Trainer; it
    used to fail after the rollouts with "GRPO needs reference log-probs"."""
    from typer.testing import CliRunner

    from unipost.cli import app

    cfg = tiny_config(
        tmp_path,
        cache_dir,
        "grpo",
        recipe_kwargs={"group_size": 2, "kl_coef": 0.05},
        iterations=1,
        rollout=RolloutConfig(episodes_per_iteration=2, max_turns=2, context_budget=4096, max_new_tokens=8),
        optim=OptimConfig(lr=1e-2, micro_batch_tokens=4096, epochs_per_batch=1),
    )
    experiment = tmp_path / "grpo_kl.py"
    _write_experiment(experiment, cfg.to_json())
    result = CliRunner().invoke(app, ["train", str(experiment)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train/regularizer" in r]
    assert trained and all(math.isfinite(r["train/regularizer"]) for r in trained)


def test_reference_is_the_frozen_initial_student_or_refused(tmp_path, cache_dir, task_tokenizer):
    cfg = tiny_config(
        tmp_path,
        cache_dir,
        "grpo",
        recipe_kwargs={"group_size": 2, "kl_coef": 0.05},
        iterations=1,
        rollout=RolloutConfig(episodes_per_iteration=2, max_turns=1, context_budget=4096, max_new_tokens=8),
    )
    trainer = Trainer(cfg, tokenizer=task_tokenizer, env_factory=VowelEnv, train_tasks=[0, 1])
    initial = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.fit()
    ref = trainer.reference
    assert ref is not None and ref is not trainer.student
    assert not any(p.requires_grad for p in ref.parameters())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(v, initial[k], rtol=0, atol=0)
    assert any(not torch.equal(v, initial[k]) for k, v in trainer.student.state_dict().items())
    # a recipe without a KL term builds no reference; one with it and reference.kind='none' is refused
    assert Trainer(cfg.replace(recipe_kwargs={"group_size": 2}), tokenizer=task_tokenizer).reference is None
    with pytest.raises(ConfigError, match="reference"):
        Trainer(cfg.replace(reference=ReferenceConfig(kind="none")), tokenizer=task_tokenizer)


def test_lr_schedule_counts_optimiser_steps(tmp_path, cache_dir, task_tokenizer):
    """Warmup ratio and cosine are measured in optimiser steps (App. F.2's SFT schedule), not iterations."""
    assert lr_factor(0, 20, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1) == 0.5
    assert lr_factor(1, 20, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1) == 1.0
    assert lr_factor(19, 20, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1) == pytest.approx(0.1)
    mid = lr_factor(10, 20, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert 0.1 < mid < 1.0
    assert lr_factor(5, 20, warmup_steps=2) == 1.0  # constant after warmup
    cfg = tiny_config(
        tmp_path,
        cache_dir,
        "grpo",
        recipe_kwargs={"group_size": 2},
        iterations=2,
        rollout=RolloutConfig(episodes_per_iteration=4, max_turns=1, context_budget=4096, max_new_tokens=8),
        optim=OptimConfig(
            lr=1e-2, micro_batch_tokens=64, epochs_per_batch=2, schedule="cosine", warmup_ratio=0.25
        ),
    )
    trainer = Trainer(cfg, tokenizer=task_tokenizer, env_factory=VowelEnv, train_tasks=list(range(8)))
    history = trainer.fit()
    updates = sum(r.get("train/updates", 0) for r in history) * 2  # train/updates is the last epoch's
    assert trainer.scheduler.last_epoch == updates > 2  # one scheduler step per optimiser step
    assert trainer.schedule_steps == updates  # exact here: every batch packs into the same count
    warmup = math.ceil(0.25 * updates)
    first_lr = history[1]["train/lr"]  # mean LR of the first iteration's last epoch
    assert first_lr < 1e-2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-2 * lr_factor(updates, updates, schedule="cosine", warmup_steps=warmup, min_lr_ratio=0.1)
    )
    with pytest.raises(ValueError, match="exclusive"):
        OptimConfig(warmup_steps=1, warmup_ratio=0.1)


def test_teacher_samples_with_the_rollout_settings(tmp_path, cache_dir, task_tokenizer):
    """Paper App. F.1: rollout collection uses the same temperature / top-p for every method, the
    teacher's turns included (it fell back to 1.0 / 1.0 / 1024 tokens)."""
    from test_openai_policy import FakeOpenAI

    fake = FakeOpenAI()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        teacher = TeacherConfig(
            kind="openai",
            base_url=f"http://127.0.0.1:{httpd.server_address[1]}",
            model="teacher-model",
            max_retries=0,
            white_box="none",
            distill_epochs=1,
        )
        rollout = RolloutConfig(
            episodes_per_iteration=1,
            max_turns=2,
            context_budget=4096,
            max_new_tokens=24,
            temperature=0.7,
            top_p=0.9,
        )
        cfg = tiny_config(tmp_path, cache_dir, "sft", teacher=teacher, rollout=rollout, iterations=1)
        trainer = Trainer(cfg, tokenizer=task_tokenizer)
        policy = trainer.teacher_policy
        assert (policy.temperature, policy.top_p, policy.max_tokens) == (0.7, 0.9, 24)
        trainer.engine.collect(trainer.tasks_for(0), 0)
        sent = [r for r in fake.requests if "messages" in r]
        assert sent and all((r["temperature"], r["top_p"], r["max_tokens"]) == (0.7, 0.9, 24) for r in sent)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_budget_cut_never_splits_a_grpo_group(tmp_path, cache_dir, task_tokenizer):
    from factories import make_trajectory

    cfg = tiny_config(
        tmp_path,
        cache_dir,
        "grpo",
        recipe_kwargs={"group_size": 3},
        max_effective_samples=4,
        rollout=RolloutConfig(episodes_per_iteration=1, max_turns=1, context_budget=4096, max_new_tokens=8),
    )
    trainer = Trainer(cfg, tokenizer=task_tokenizer, env_factory=VowelEnv, train_tasks=[0])
    data = [
        make_trajectory("s", task_id=f"t{g}", seed=3 * g + j, reward=float(j == 0), meta={"group": g})
        for g in range(3)
        for j in range(3)
    ]
    kept, microbatches = trainer._fit_budget(data, trainer._microbatches(data))
    groups = [t.meta["group"] for t in kept]
    assert all(groups.count(g) == 3 for g in set(groups)), groups  # whole groups only
    assert groups == [0, 0, 0, 1, 1, 1]  # the shortest whole-group prefix reaching 4 labels
    assert sum(b.packed.num_labels for b in microbatches) == 6


def test_offline_sft_from_a_store_runs_through_unipost_train(tmp_path, cache_dir):
    """The paper's SFT: one stored dataset of teacher trajectories, rejection-sampled, several epochs,
    through the same objective path (the engine refuses OfflineData; the Trainer reads it)."""
    from typer.testing import CliRunner

    from unipost.cli import app
    from unipost.rollout.store import TrajectoryStore

    demos = expert_trajectories(3, difficulty="easy", max_observation_chars=600)
    demos[1].outcome.resolved = False  # rejected by rejection sampling
    store = TrajectoryStore(tmp_path / "teacher.jsonl")
    for traj in demos:
        store.append(traj)
    cfg = tiny_config(
        tmp_path, cache_dir, "sft", recipe_kwargs={"data": str(tmp_path / "teacher.jsonl")}, iterations=3
    )
    experiment = tmp_path / "offline_sft.py"
    _write_experiment(experiment, cfg.to_json())
    result = CliRunner().invoke(app, ["train", str(experiment)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = len(demos[0].turns) + len(demos[2].turns)  # only the resolved ones count
    assert [r["train/batch_labels"] for r in rows if "train/batch_labels" in r] == [per_epoch] * 3
    assert rows[-1]["train/effective_samples"] == 3 * per_epoch
    assert (
        not (tmp_path / "sft" / "trajectories.jsonl").exists()
        or not (tmp_path / "sft" / "trajectories.jsonl").read_text().strip()
    )  # no rollouts were collected


def test_offline_sft_needs_no_live_teacher(tmp_path, cache_dir, task_tokenizer):
    """Training on a stored dataset must not require the teacher endpoint that produced it."""
    from factories import make_trajectory

    from unipost.rollout.store import TrajectoryStore

    TrajectoryStore(tmp_path / "teacher.jsonl").append(make_trajectory("tt"))
    dead = TeacherConfig(
        kind="openai", base_url="http://127.0.0.1:9", model="teacher", max_retries=0, timeout_s=2.0,
        white_box="none", distill_epochs=1,
    )  # fmt: skip
    cfg = tiny_config(
        tmp_path, cache_dir, "sft", recipe_kwargs={"data": str(tmp_path / "teacher.jsonl")}, teacher=dead
    )
    trainer = Trainer(cfg, tokenizer=task_tokenizer)
    assert trainer.teacher_policy is None and trainer.engine is None


def test_a_tokenizer_save_killed_midway_leaves_no_half_written_cache(tmp_path, monkeypatch):
    """The task tokenizer used to be saved straight into its cache folder: a process killed mid-save
    left a half-written tokenizer.json there, and every later run with that cache failed to load it.
    Now it is saved aside and renamed into place, so the next run simply builds it again."""
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    real_save = PreTrainedTokenizerFast.save_pretrained

    def killed_midway(self, save_directory, *args, **kwargs):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "tokenizer.json").write_text('{"version": "1.0", "trunc')
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        build_task_tokenizer(512, difficulty="easy", max_observation_chars=600, cache_dir=tmp_path)
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", real_save)
    tok = build_task_tokenizer(512, difficulty="easy", max_observation_chars=600, cache_dir=tmp_path)
    assert len(tok) > 256
    again = build_task_tokenizer(512, difficulty="easy", max_observation_chars=600, cache_dir=tmp_path)
    assert again.get_vocab() == tok.get_vocab()  # the second call reads the cached copy
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the killed save's folder too

    # an older unipost's partial saves: config files without tokenizer.json, or a truncated tokenizer.json
    (cached,) = [p for p in tmp_path.iterdir() if p.name.startswith("tokenizer-")]
    (cached / "tokenizer.json").unlink()
    assert build_task_tokenizer(512, difficulty="easy", max_observation_chars=600, cache_dir=tmp_path)
    (cached / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    assert build_task_tokenizer(512, difficulty="easy", max_observation_chars=600, cache_dir=tmp_path)


def test_max_effective_samples_stops_on_the_budget(tmp_path):
    """The matched budget ends a run after the iteration that reaches it, overshooting by < 1 trajectory.
    (Moved here from test_bench_methods.py: it tests the Trainer, not the benchmark.) It is also the
    cold-cache test: an empty cache, so the Trainer builds the task tokenizer and the student itself."""
    cold = tmp_path / "empty-cache"
    cfg = tiny_train_config(tmp_path / "runs", cold, "sft", iterations=4, max_effective_samples=7)
    cfg = cfg.replace(recipe_kwargs={"rejection_sampling": False})
    history = Trainer(cfg).fit()
    assert any(cold.iterdir()) and (tmp_path / "runs" / "sft" / "tokenizer" / "tokenizer.json").is_file()
    per_iteration = [r["train/batch_labels"] for r in history]
    assert len(history) < 4  # stopped by the budget, not by the iteration count
    assert history[-1]["train/effective_samples"] == sum(per_iteration) >= 7
    assert sum(per_iteration[:-1]) < 7  # it did not run an iteration past the budget
    labels_per_trajectory = cfg.rollout.max_turns
    assert history[-1]["train/effective_samples"] < 7 + labels_per_trajectory


# -- what a run says while it works (issue 13, item 9) ---------------------------------------------


def test_every_phase_says_what_it_does_and_shows_progress(tmp_path, lab_assets, capsys):
    """Collecting, optimising, the held-out evaluation and the KL diagnostic each print a line naming the
    phase and what it counts, and every episode phase has a live bar (evaluation used to be silent for
    minutes: no bar, no line)."""
    from unipost.train.lab import tiny_config as lab_config

    cfg = lab_config(str(tmp_path), quick=True, assets=lab_assets, max_effective_samples=1000)
    trainer = Trainer(cfg)
    assert cfg.progress and cfg.eval.kl_tasks == 1 and cfg.env.heldout_tasks == 2
    trainer.fit(initial_eval={})  # step 0's evaluation given: one evaluation, after the iteration
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[dagger]")]
    assert lines[0] == (
        "[dagger] iteration 1 of at most 1 (until 1000 effective samples; 0 so far): "
        "collecting 2 training episodes (DAgger)"
    )
    epoch = r"\[dagger\] optimised epoch 1/1 over \d+ micro-batch(es)? \(\d+ labelled transitions?\): .* s"
    assert re.fullmatch(epoch, lines[1]), lines[1]
    assert lines[2] == "[dagger] step 1: held-out evaluation, 2 greedy student episodes"
    assert lines[3] == "[dagger] step 1: reverse KL to the teacher (§4.4), 1 sampled student episode"
    assert lines[4].startswith("[dagger] step 1: resolve_rate ")
    # each bar names its phase (all three used to be titled "rollouts")
    bars = [line.split() for line in out.splitlines() if line.split()[1:2] == ["episodes"]]
    assert [(bar[0], bar[2]) for bar in bars] == [  # title, "episodes", done/total
        ("DAgger", "2/2"),
        ("eval", "2/2"),
        ("kl-diagnostic", "1/1"),
    ]


# -- building apart from the loop (issue 13, item 2) -----------------------------------------------


def test_the_expert_comes_from_the_env_registry_and_swe_has_none(tmp_path):
    """The teacher of env.name='swe' used to be the embedded world's ScriptedExpert (hard-coded in the
    Trainer), which cannot act in a SWE container; now each environment names its own expert."""
    from unipost.envs.embedded.expert import ScriptedExpert
    from unipost.objective import GRPO, DAgger
    from unipost.train.build import build_teacher_policy
    from unipost.train.config import EnvConfig

    embedded = TrainConfig(output_dir=str(tmp_path))
    assert isinstance(build_teacher_policy(embedded, DAgger()), ScriptedExpert)
    openhands = embedded.replace(env=EnvConfig(name="openhands"))
    assert isinstance(build_teacher_policy(openhands, DAgger()), ScriptedExpert)
    swe = embedded.replace(env=EnvConfig(name="swe", tasks_path=str(tmp_path / "instances.jsonl")))
    assert build_teacher_policy(swe, GRPO()) is None  # no live teacher needed: nothing to refuse
    with pytest.raises(ConfigError, match=r"'swe' has no scripted expert; set teacher.kind='openai'"):
        build_teacher_policy(swe, DAgger())
