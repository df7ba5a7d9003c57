"""Optimisation over collected trajectories: micro-batches of packed tokens, one update each.

A micro-batch never splits a GRPO group (the group's baseline must see all its samples), and each
update normalises by its own label tokens (or trajectories) as the recipe says. With
``grad_accumulation > 1`` the micro-batch losses are rescaled so the accumulated gradient equals the
gradient of the recipe's normalised loss over all accumulated micro-batches (exact, not approximate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from unipost.batch import TrainingBatch, make_microbatches, objective_loss
from unipost.kernels.model import packed_logprobs
from unipost.objective import Recipe

# make_microbatches lives in unipost.batch
__all__ = ["lr_factor", "make_microbatches", "optimise_epoch", "record_old_logprobs"]

if TYPE_CHECKING:
    from unipost.train.distributed import Distributed


def _scale(batch: TrainingBatch, recipe: Recipe, totals: tuple[int, int]) -> float:
    """This micro-batch's share of the step's normaliser (label tokens, or sequences = trajectories)."""
    tokens, sequences = totals
    if recipe.normalization == "token_mean":
        return batch.packed.num_label_tokens / max(tokens, 1)
    if recipe.normalization == "sequence_mean":
        return batch.num_sequences / max(sequences, 1)
    return 1.0


def record_old_logprobs(model: torch.nn.Module, batches: Sequence[TrainingBatch]) -> None:
    """Store log pi_old of every label token on its batch (``TrainingBatch.old_logp_L``).

    Called once per collected batch, before its first update, when the recipe uses an importance
    ratio (``Recipe.ratio_clip``). Recomputed with the training forward rather than taken from the
    sampler, as verl and SkyRL do: the sampler's log-probs come from another kernel (vLLM), at the
    sampling temperature, and on re-tokenised text, so they would not give r = 1 on the first epoch.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch.old_logp_L = packed_logprobs(model, batch.packed).logp_L.detach()
    model.train(was_training)


def lr_factor(
    step: int,
    total_steps: int,
    *,
    schedule: str = "constant",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning-rate multiplier of optimiser step ``step`` (0-based) of ``total_steps``.

    Linear warmup over the first ``warmup_steps`` steps ((step + 1) / warmup_steps, so the first
    update is not wasted at LR 0), then constant, or cosine from 1 down to ``min_lr_ratio`` reached at
    the last step (the paper's SFT: cosine from a maximum to a minimum LR with a warmup ratio, App. F.2).
    Everything is measured in optimiser steps, never in iterations.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown LR schedule {schedule!r}; use 'constant' or 'cosine'")
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimise_epoch(
    model: torch.nn.Module,
    batches: Sequence[TrainingBatch],
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    *,
    generator: torch.Generator | None = None,
    grad_accumulation: int = 1,
    grad_clip: float | None = 1.0,
    teacher: torch.nn.Module | None = None,
    reference: torch.nn.Module | None = None,
    on_step=None,
    dist: Distributed | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    head: str = "auto",
) -> dict[str, float]:
    """One pass over ``batches`` in a seeded random order; returns mean metrics over updates.

    With ``dist`` (a prepared :class:`~unipost.train.distributed.Distributed`; ``optimizer`` is then
    the prepared optimiser) each update's ``grad_accumulation`` micro-batches are split over the
    processes, and the update equals the single-process one (see that module for why).
    ``scheduler`` is stepped after every optimiser step (LR schedules count optimiser steps).
    ``head``: the LM-head path of every micro-batch (:func:`unipost.batch.select_head`; ``"auto"``:
    three GEMMs where the recipe's loss is per-token, else four).
    """
    if not batches:
        return {"loss": float("nan"), "updates": 0.0}
    model.train()
    order = torch.randperm(len(batches), generator=generator).tolist()
    sums: dict[str, float] = {}
    updates = 0
    for start in range(0, len(order), grad_accumulation):
        group = [batches[i] for i in order[start : start + grad_accumulation]]
        totals = (sum(b.packed.num_label_tokens for b in group), sum(b.num_sequences for b in group))
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, float] = {}
        if dist is None:
            for batch in group:
                loss, metrics = objective_loss(
                    model, batch, recipe, teacher=teacher, reference=reference, head=head
                )
                (loss * _scale(batch, recipe, totals)).backward()
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v / len(group)
        else:

            def scaled_loss(batch: TrainingBatch, forward, totals=totals):
                loss, metrics = objective_loss(
                    model, batch, recipe, teacher=teacher, reference=reference, student_forward=forward,
                    head=head,
                )  # fmt: skip
                return loss * _scale(batch, recipe, totals), metrics

            step_metrics = dist.accumulate(group, scaled_loss, size=lambda b: b.packed.num_tokens)
        if grad_clip is not None and dist is not None:
            step_metrics["grad_norm"] = dist.clip_grad_norm_(grad_clip)
        elif grad_clip is not None:
            step_metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        step_metrics["lr"] = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        updates += 1
        if on_step is not None:
            on_step(step_metrics)
        for k, v in step_metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    out = {k: v / updates for k, v in sums.items()}
    out["updates"] = float(updates)
    return out
