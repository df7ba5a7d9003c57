"""Optimisation over collected trajectories: micro-batches of packed tokens, one update each.

A micro-batch never splits a GRPO group (the group's baseline must see all its samples), and each
update normalises by its own label tokens (or labels) as the recipe says. With
``grad_accumulation > 1`` the micro-batch losses are rescaled so the accumulated gradient equals the
gradient of the recipe's normalised loss over all accumulated micro-batches (exact, not approximate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from unipost.batch import TrainingBatch, make_microbatches, objective_loss
from unipost.objective import Recipe

__all__ = ["make_microbatches", "optimise_epoch"]  # make_microbatches lives in unipost.batch

if TYPE_CHECKING:
    from unipost.train.distributed import Distributed


def _scale(batch: TrainingBatch, recipe: Recipe, totals: tuple[int, int]) -> float:
    tokens, labels = totals
    if recipe.normalization == "token_mean":
        return batch.packed.num_label_tokens / max(tokens, 1)
    if recipe.normalization == "sequence_mean":
        return batch.packed.num_labels / max(labels, 1)
    return 1.0


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
) -> dict[str, float]:
    """One pass over ``batches`` in a seeded random order; returns mean metrics over updates.

    With ``dist`` (a prepared :class:`~unipost.train.distributed.Distributed`; ``optimizer`` is then
    the prepared optimiser) each update's ``grad_accumulation`` micro-batches are split over the
    processes, and the update equals the single-process one (see that module for why).
    """
    if not batches:
        return {"loss": float("nan"), "updates": 0.0}
    model.train()
    order = torch.randperm(len(batches), generator=generator).tolist()
    sums: dict[str, float] = {}
    updates = 0
    for start in range(0, len(order), grad_accumulation):
        group = [batches[i] for i in order[start : start + grad_accumulation]]
        totals = (sum(b.packed.num_label_tokens for b in group), sum(b.packed.num_labels for b in group))
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, float] = {}
        if dist is None:
            for batch in group:
                loss, metrics = objective_loss(model, batch, recipe, teacher=teacher, reference=reference)
                (loss * _scale(batch, recipe, totals)).backward()
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v / len(group)
        else:

            def scaled_loss(batch: TrainingBatch, forward, totals=totals):
                loss, metrics = objective_loss(
                    model, batch, recipe, teacher=teacher, reference=reference, student_forward=forward
                )
                return loss * _scale(batch, recipe, totals), metrics

            step_metrics = dist.accumulate(group, scaled_loss, size=lambda b: b.packed.num_tokens)
        if grad_clip is not None and dist is not None:
            step_metrics["grad_norm"] = dist.clip_grad_norm_(grad_clip)
        elif grad_clip is not None:
            step_metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        optimizer.step()
        updates += 1
        if on_step is not None:
            on_step(step_metrics)
        for k, v in step_metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    out = {k: v / updates for k, v in sums.items()}
    out["updates"] = float(updates)
    return out
