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

import pytest
import torch
from factories import TINY, tiny_train_config

from unipost.batch import build_batch, objective_loss
from unipost.data import Outcome
from unipost.envs.base import StepResult
from unipost.objective import SFT
from unipost.train.config import (
    OptimConfig,
    RolloutConfig,
    TeacherConfig,
    TrainConfig,
)
from unipost.train.setup import build_task_tokenizer, expert_trajectories
from unipost.train.trainer import ConfigError, Trainer


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("unipost-cache"))


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
