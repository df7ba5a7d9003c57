"""One Trainer for every method: the loop is fixed, the Recipe decides everything else.

    for iteration i:
        collect   RolloutEngine runs recipe.rollout (who executes each turn) and queries the teacher at
                  every visited state when recipe.labels need it; finished trajectories are appended
                  to the run's trajectory store as they finish
        label / score / filter   build_batch: recipe.keep, recipe.select_labels, tree packing
        (aggregate)  classic DAgger D = D_1 u ... u D_i, or the paper's fresh batch per iteration
        optimise  epochs over micro-batches of packed tokens, objective_loss (Eq. 14)
        evaluate  greedy held-out resolve rate, failure modes, reverse KL on student states (§4.4)
        checkpoint  model, optimizer, scheduler, RNG, iteration, store position, metrics: atomically

There is no per-method branch below: SFT, GRPO, OPD, DAgger, AggreVaTe and user compositions differ
only in the recipe object handed in. Nothing is built here either: :mod:`unipost.train.build` turns the
config into the student, tokenizer, policies, teacher and environment (or takes them injected), and
the config the run saves records the recipe it runs (a custom one part by part).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unipost.batch import group_keys
from unipost.data import Trajectory
from unipost.objective import Recipe
from unipost.rollout.store import TrajectoryStore
from unipost.train.build import (
    ConfigError,
    build_components,
    build_engine,
    failure_judge,
    scripted_expert,
    task_pool,
)
from unipost.train.checkpoint import CheckpointManager
from unipost.train.config import TrainConfig
from unipost.train.distributed import Distributed
from unipost.train.metrics import MetricsLogger
from unipost.train.optimise import lr_factor, make_microbatches, optimise_epoch, record_old_logprobs

logger = logging.getLogger(__name__)

__all__ = ["ConfigError", "Trainer", "seed_everything", "train"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Runs ``config.iterations`` iterations of collect -> label -> score -> optimise -> evaluate."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        recipe: Recipe | None = None,
        resume: bool = False,
        env_factory: Callable[[Any], Any] | None = None,
        train_tasks: Sequence[Any] | None = None,
        heldout_tasks: Sequence[Any] | None = None,
        student: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        teacher_policy: Any | None = None,
        teacher_model: torch.nn.Module | None = None,
        reference_model: torch.nn.Module | None = None,
    ) -> None:
        """Build everything a run needs (:func:`unipost.train.build.build_components`); every component
        can be injected instead of built.

        Injection is how a user brings their own environment (``env_factory`` + task lists), a
        pretrained student and its tokenizer, an API teacher policy, a white-box teacher model, or
        the frozen reference of a KL regulariser (default: built when the recipe needs one).
        """
        # a recipe object is recorded in the config the run saves (its composition, if not a named one)
        self.config = cfg = config.with_recipe(recipe) if recipe is not None else config
        self.recipe = recipe or cfg.build_recipe()
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        # started by `accelerate launch` / torchrun: the main process collects, every process trains
        self.dist = Distributed.from_environment()
        self._train_tasks = list(train_tasks) if train_tasks is not None else None
        self._heldout_tasks = list(heldout_tasks) if heldout_tasks is not None else None
        parts = build_components(
            cfg,
            self.recipe,
            probe_task=lambda: self.tasks_for(0)[0],
            run_dir=self.run_dir,
            is_main=self.is_main,
            dist=self.dist,
            env_factory=env_factory,
            student=student,
            tokenizer=tokenizer,
            teacher_policy=teacher_policy,
            teacher_model=teacher_model,
            reference_model=reference_model,
        )
        self.make_env, self.tools, self.tokenizer, self.renderer = (
            parts.make_env, parts.tools, parts.tokenizer, parts.renderer
        )  # fmt: skip
        self.student, self.student_policy = parts.student, parts.student_policy
        self.teacher_policy, self.teacher_model = parts.teacher_policy, parts.teacher_model
        self.reference = parts.reference
        self.engine = build_engine(cfg, self.recipe, parts)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        # stepped once per optimiser step; its horizon (schedule_steps) is known once data is seen
        self.schedule_steps: int | None = cfg.optim.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self._offline_data: list[Trajectory] | None = None
        self.train_optimizer = self.optimizer  # what optimise_epoch steps: prepared under accelerate
        if self.dist is not None:
            _, self.train_optimizer = self.dist.prepare(self.student, self.optimizer)
            self.dist.require_replicated("the Trainer's rollouts, evaluation and checkpoints")
        self.store = TrajectoryStore(self.run_dir / "trajectories.jsonl")
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep=2)
        self.history: list[dict[str, float]] = []
        self.start_iteration = 0
        self.effective_samples = 0
        resume_step = None
        if resume:
            resume_step = self._resume()
            self._sync_student_policy()
        self.metrics = (
            MetricsLogger(self.run_dir, config=cfg.model_dump(mode="json"), resume_from_step=resume_step)
            if self.is_main
            else _NoMetrics()
        )
        # per-task eval outcomes follow the metrics: none of a previous run, none past the resumed step
        if self.is_main:
            from unipost.eval import EVAL_OUTCOMES_DIR, prune_eval_outcomes

            prune_eval_outcomes(self.run_dir / EVAL_OUTCOMES_DIR, -1 if resume_step is None else resume_step)
        (self.run_dir / "config.json").write_text(cfg.to_json())

    @property
    def is_main(self) -> bool:
        """This process collects rollouts, evaluates, logs and writes the store and checkpoints."""
        return self.dist is None or self.dist.is_main

    # -- the optimiser's schedule -------------------------------------------------------------------

    def _sync_student_policy(self) -> None:
        """Push the student's current weights into a policy that holds its own copy (vLLM)."""
        sync = getattr(self.student_policy, "sync_weights", None)
        if sync is not None:
            sync(self.student)

    def _lr_factor(self, step: int) -> float:
        """LambdaLR's multiplier at optimiser step ``step`` (:func:`unipost.train.optimise.lr_factor`)."""
        o = self.config.optim
        total = self.schedule_steps or 1  # before the horizon is known no step has been taken
        warmup = o.warmup_steps or (math.ceil(o.warmup_ratio * total) if self.schedule_steps else 0)
        return lr_factor(step, total, schedule=o.schedule, warmup_steps=warmup, min_lr_ratio=o.min_lr_ratio)

    def _set_schedule_steps(self, microbatches: list) -> None:
        """Fix the LR schedule's horizon in optimiser steps from the first batch (exact for offline data,
        where every epoch is the same batch), unless ``optim.total_steps`` fixed it."""
        if self.schedule_steps is not None or not microbatches:
            return
        o = self.config.optim
        per_epoch = math.ceil(len(microbatches) / o.grad_accumulation)
        self.schedule_steps = self.config.iterations * o.epochs_per_batch * per_epoch
        step = self.scheduler.last_epoch
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self._lr_factor(step)

    # -- the loop -----------------------------------------------------------------------------------

    def tasks_for(self, iteration: int) -> list[Any]:
        """This iteration's training tasks: a seeded draw from the train pool (same for every method)."""
        rng = np.random.default_rng([self.config.seed, iteration, 7])
        pool = self.train_tasks()
        n = self.config.rollout.episodes_per_iteration
        picks = rng.choice(len(pool), size=n, replace=n > len(pool))
        return [pool[int(i)] for i in picks]

    def train_tasks(self) -> list[Any]:
        """The training task pool (injected, or ``env.train_tasks`` capped by a file-backed split)."""
        if self._train_tasks is None:
            self._train_tasks = task_pool(self.config.env, "train")
        return list(self._train_tasks)

    def heldout_tasks(self) -> list[Any]:
        """The evaluation tasks; built on first use, so a run that never evaluates never reads the
        held-out instance file."""
        if self._heldout_tasks is None:
            self._heldout_tasks = task_pool(self.config.env, "heldout")
        return list(self._heldout_tasks)

    def fit(self, initial_eval: dict[str, float] | None = None) -> list[dict[str, float]]:
        """Run the remaining iterations; returns the metrics history (one dict per logged step).

        ``initial_eval``: step-0 metrics computed elsewhere for the SAME initial student and seed
        (e.g. the other arm of a comparison), so the evaluation before training is not paid twice.
        """
        if self.start_iteration == 0 and not self.history and self.config.eval.every:
            self._log(0, dict(initial_eval) if initial_eval is not None else self.evaluate(0))
        for i in range(self.start_iteration, self.config.iterations):
            if self.budget_spent:
                break
            self.run_iteration(i)
        self.metrics.close()
        return self.history

    @property
    def budget_spent(self) -> bool:
        """The matched effective-sample budget (``max_effective_samples``) is used up."""
        budget = self.config.max_effective_samples
        return budget is not None and self.effective_samples >= budget

    def _fit_budget(self, data: list[Trajectory], microbatches: list) -> tuple[list[Trajectory], list]:
        """Keep the shortest prefix of the batch whose labels reach the remaining effective-sample budget.

        Labels are counted exactly as ``train/effective_samples`` counts them (one per labelled
        transition of a kept trajectory), so a run ends on the budget in one iteration. The batch is
        cut between groups, never inside one: a GRPO group's baseline needs all its samples, so the
        overshoot is under one group's labels (one trajectory's when group_size is 1).
        """
        budget = self.config.max_effective_samples
        if budget is None:
            return data, microbatches
        remaining = budget - self.effective_samples
        groups: dict[str, list[Trajectory]] = {}
        for traj, key in zip(data, group_keys(data), strict=True):
            groups.setdefault(key, []).append(traj)
        members = list(groups.values())
        while len(members) > 1:
            fewer = self._microbatches([t for group in members[:-1] for t in group])
            if sum(b.packed.num_labels for b in fewer) < remaining:
                break
            members, microbatches = members[:-1], fewer
        return [t for group in members for t in group], microbatches

    def _microbatches(self, data: list[Trajectory]) -> list:
        return make_microbatches(
            data,
            self.recipe,
            self.renderer,
            max_tokens=self.config.optim.micro_batch_tokens,
            vocab_size=len(self.tokenizer),
        )

    def run_iteration(self, i: int) -> dict[str, float]:
        cfg = self.config
        started = time.perf_counter()
        self.student_policy.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        self.student.eval()
        self._say(f"iteration {i + 1} of {self._iterations_phrase()}: {self._collect_phrase(i)}")
        batch, data = self._collect(i)
        rollout = _floats(batch.stats.to_dict()) if batch is not None else {}  # None: offline data
        metrics: dict[str, float] = {f"rollout/{k}": v for k, v in rollout.items()}
        microbatches = self._microbatches(data)
        data, microbatches = self._fit_budget(data, microbatches)
        self._set_schedule_steps(microbatches)
        labels = sum(b.packed.num_labels for b in microbatches)
        metrics["train/batch_labels"] = float(labels)
        metrics["train/kept_trajectories"] = float(sum(b.num_sequences for b in microbatches))
        if not microbatches:
            logger.warning("iteration %d: no trajectory has a label to train on (all filtered); skipping", i)
        if self.recipe.ratio_clip is not None:  # pi_old of the importance ratio: before any update
            record_old_logprobs(self.student, microbatches)
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + i)
        epochs = cfg.optim.epochs_per_batch
        for epoch in range(epochs):
            epoch_started = time.perf_counter()
            stats = optimise_epoch(
                self.student,
                microbatches,
                self.recipe,
                self.train_optimizer,
                generator=generator,
                grad_accumulation=cfg.optim.grad_accumulation,
                grad_clip=cfg.optim.grad_clip,
                teacher=self.teacher_model,
                reference=self.reference,
                dist=self.dist,
                scheduler=self.scheduler,
                head=cfg.optim.head,
            )
            metrics.update({f"train/{k}": v for k, v in stats.items()})
            self._say(
                f"optimised epoch {epoch + 1}/{epochs} over {_n(len(microbatches), 'micro-batch')} "
                f"({_n(labels, 'labelled transition')}): loss {stats.get('loss', float('nan')):.3f}, "
                f"{time.perf_counter() - epoch_started:.0f} s"
            )
        self._sync_student_policy()
        self.effective_samples += labels
        metrics["train/effective_samples"] = float(self.effective_samples)
        metrics["train/optimizer_steps"] = float(self.scheduler.last_epoch)
        metrics["time/iteration_s"] = time.perf_counter() - started
        last = i + 1 == cfg.iterations or self.budget_spent
        if cfg.eval.every and ((i + 1) % cfg.eval.every == 0 or last):
            metrics.update(self.evaluate(i + 1))
        self._log(i + 1, metrics)
        if self.is_main:  # under DDP every rank holds the same weights; FSDP: see docs/scaling.md
            self.checkpoints.save(
                i,
                model=self.student,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                state={
                    "iteration": i,
                    "store_position": list(self.store.position()),
                    "history": self.history,
                    "effective_samples": self.effective_samples,
                    "schedule_steps": self.schedule_steps,
                    "config": cfg.model_dump(mode="json"),
                },
            )
        return metrics

    def _collect(self, i: int) -> tuple[Any, list[Trajectory]]:
        """This iteration's rollouts and training data (the store's D_1 u ... u D_i when aggregating).

        With several processes the main one collects and alone appends to the store; the others
        receive the same trajectories, so every process packs identical micro-batches and knows
        each optimiser step's global normaliser (unipost.train.distributed).
        """
        batch, data = None, None
        if self.is_main and self.engine is None:  # offline data: every iteration is one epoch over it
            data = self.offline_trajectories()
        elif self.is_main:
            batch = self.engine.collect(self.tasks_for(i), i, store=self.store)
            data = self.store_trajectories(upto_iteration=i) if self.config.aggregate else batch.trajectories
        if self.dist is not None:
            batch, data = self.dist.broadcast((batch, data))
        return batch, data

    def offline_trajectories(self) -> list[Trajectory]:
        """The recipe's stored dataset (``OfflineData``, e.g. teacher rollouts of every training task),
        read once. The paper's SFT trains several epochs on one such dataset (App. F.2): here each
        iteration is one epoch over it, through the same filter, packing and objective as online data."""
        if self._offline_data is None:
            self._offline_data = list(self.recipe.rollout.trajectories())  # type: ignore[attr-defined]
            if not self._offline_data:
                raise ConfigError(f"{self.recipe.rollout!r} holds no trajectories")
        return self._offline_data

    def store_trajectories(self, upto_iteration: int) -> list[Trajectory]:
        """D_1 u ... u D_i: every stored trajectory of this run up to ``upto_iteration``."""
        return [t for t in self.store.load().trajectories if t.meta.get("iteration", 0) <= upto_iteration]

    def evaluate_heldout(self, *, expert: Any = None, progress: bool = False, iteration: int = 0):
        """Greedy student-only episodes on the held-out tasks under the training budgets (an EvalResult)."""
        from unipost.eval import evaluate_policy

        cfg = self.config
        return evaluate_policy(
            self.make_env,
            self.student_policy,
            self.heldout_tasks(),
            max_turns=cfg.rollout.max_turns,
            context_budget=cfg.rollout.context_budget,
            count_tokens=self.renderer.count_tokens,
            concurrency=cfg.rollout.concurrency,
            seed=cfg.seed,
            progress=progress,
            iteration=iteration,
            expert=expert,
        )

    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy held-out evaluation and the reverse-KL diagnostic on student-visited states."""
        if not self.is_main:  # the main process evaluates and logs; the others only train
            return {}
        from unipost.eval import (
            EVAL_OUTCOMES_DIR,
            EvalResult,
            collect_student_states,
            reverse_kl_on_student_states,
            save_eval_outcomes,
        )

        cfg = self.config
        self.student.eval()
        expert = None
        if cfg.eval.expert_labels:  # the live teacher, else the environment's scripted expert
            expert = self.teacher_policy or scripted_expert(cfg.env, why="eval.expert_labels=True")
        tasks = len(self.heldout_tasks())
        self._say(f"step {step}: held-out evaluation, {_n(tasks, 'greedy student episode')}")
        result = self.evaluate_heldout(expert=expert, progress=cfg.progress)
        judge = failure_judge(cfg)
        if judge is not None:  # the paper's LLM judge instead of the environment's rules (§4.5)
            result = EvalResult.from_trajectories(
                judge.relabel(result.trajectories), stats=result.stats, iteration=result.iteration
            )
        out = _floats(result.to_dict())
        if cfg.eval.expert_labels:
            from unipost.eval.imitation import expert_label_nll

            nll = expert_label_nll(
                self.student,
                result.trajectories,
                self.renderer,
                micro_batch_tokens=cfg.optim.micro_batch_tokens,
            )
            if nll is not None:
                out["eval/expert_nll"] = nll
        if self.teacher_model is not None and cfg.eval.kl_tasks > 0:
            self.student_policy.generator = torch.Generator().manual_seed(cfg.seed * 31 + step)
            kl_tasks = self.heldout_tasks()[: cfg.eval.kl_tasks]
            episodes = _n(len(kl_tasks), "sampled student episode")
            self._say(f"step {step}: reverse KL to the teacher (§4.4), {episodes}")
            trajs = collect_student_states(
                self.make_env,
                self.student_policy,
                kl_tasks,
                max_turns=cfg.rollout.max_turns,
                context_budget=cfg.rollout.context_budget,
                count_tokens=self.renderer.count_tokens,
                seed=cfg.seed + step,
                progress=cfg.progress,
            )
            kl = reverse_kl_on_student_states(self.student, self.teacher_model, trajs, self.renderer)
            out["eval/reverse_kl"] = float(kl.mean_kl)
        # per-task outcomes beside the metrics, so runs can be compared paired afterwards (unipost compare)
        save_eval_outcomes(self.run_dir / EVAL_OUTCOMES_DIR, step, result, out)
        return out

    def _say(self, message: str) -> None:
        """One progress line on the terminal (``config.progress``, main process), naming the run."""
        if self.config.progress and self.is_main:
            print(f"[{self.config.name}] {message}", flush=True)

    def _iterations_phrase(self) -> str:
        """``"4"``, or ``"at most 6 (until 320 effective samples; 120 so far)"`` under a budget."""
        cfg = self.config
        if cfg.max_effective_samples is None:
            return str(cfg.iterations)
        return (
            f"at most {cfg.iterations} (until {cfg.max_effective_samples} effective samples; "
            f"{self.effective_samples} so far)"
        )

    def _collect_phrase(self, i: int) -> str:
        if self.engine is None:
            return "one epoch over the stored dataset"
        n = self.config.rollout.episodes_per_iteration * self.recipe.group_size
        return f"collecting {_n(n, 'training episode')} ({self.recipe.display_name})"

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": float(step), **metrics}
        self.history.append(record)
        self.metrics.log(step, metrics)
        if self.config.progress:
            keys = ["eval/resolve_rate", "eval/submission_rate", "eval/reverse_kl", "train/loss"]
            shown = ", ".join(f"{k.split('/')[1]} {metrics[k]:.3f}" for k in keys if k in metrics)
            if shown:  # step 0 handed in by fit(initial_eval=...) may hold nothing to show
                print(f"[{self.config.name}] step {step}: {shown}")

    def _resume(self) -> int | None:
        ckpt = self.checkpoints.latest()
        if ckpt is None:
            logger.warning("resume requested but %s holds no valid checkpoint: starting fresh", self.run_dir)
            if self.is_main:
                self.store.truncate_to((0, 0))
            return 0
        state = self.checkpoints.load(
            ckpt, model=self.student, optimizer=self.optimizer, scheduler=self.scheduler
        )
        if self.is_main:  # the main process alone writes the shared store
            self.store.truncate_to(tuple(state["store_position"]))
        self.history = list(state["history"])
        self.effective_samples = int(state["effective_samples"])
        self.schedule_steps = state.get("schedule_steps", self.schedule_steps)
        self.start_iteration = int(state["iteration"]) + 1
        return self.start_iteration  # metrics logged at steps > this belong to the lost iteration


class _NoMetrics:
    """The metrics sink of a non-main process: the main process alone writes the run's metrics."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _n(count: int, noun: str) -> str:
    """``"1 micro-batch"``, ``"3 micro-batches"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{'es' if noun.endswith('h') else 's'}"


def _floats(d: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (bool, int, float)):
            out[k] = float(v)
    return out


def train(config: TrainConfig | str | Path, *, recipe: Recipe | None = None, resume: bool = False):
    """Build a Trainer from a config (or a JSON config file) and run it; returns the Trainer."""
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_file(config)
    trainer = Trainer(config, recipe=recipe, resume=resume)
    trainer.fit()
    return trainer
