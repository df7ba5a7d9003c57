"""Data-parallel training through accelerate: N processes take exactly the optimiser steps of one.

Launch any training script with ``accelerate launch`` (``configs/accelerate/*.yaml``: DDP, FSDP2,
DeepSpeed) and :meth:`Distributed.from_environment` returns the layer below; without a launcher it
returns ``None`` and training is the plain single-process loop, untouched.

Why N processes equal one process on the same global batch (``tests/test_distributed.py`` checks it
to fp32 rounding):

* One optimiser step consumes ``grad_accumulation`` micro-batches *in total*, whatever the number of
  processes. Every rank holds the same micro-batches (the trajectories are collected on the main
  process and broadcast, then packed identically everywhere), so every rank knows the step's global
  normaliser (label tokens for ``token_mean``, trajectories for ``sequence_mean``) *before* the step is
  sharded: each micro-batch loss is scaled by ``n_b / n_step`` exactly as in one process.
* Rank r takes the step's micro-batches r, r + N, ... (largest first, for balance). A GRPO group never
  straddles micro-batches (:func:`~unipost.train.optimise.make_microbatches`), so group statistics are
  computed whole, on one rank, as in one process.
* DDP, FSDP and DeepSpeed *average* gradients over ranks; the local loss is multiplied by N so the
  average is the global sum, i.e. the single-process gradient.
* A rank with fewer micro-batches in a step runs a zero-weighted copy of one, so every rank makes the
  same forward/backward and collective calls (DDP and FSDP hang otherwise). Set ``grad_accumulation``
  to a multiple of the number of processes and nothing is wasted.

The fused log-likelihood head calls the decoder and the LM-head weight directly (it never builds
``[tokens x vocab]`` logits), so the hooks DDP / FSDP put on a module's ``forward`` would never fire on
the causal LM itself. :class:`PackedLogprobs` makes "packed batch -> label log-probs" the forward of
one module, and that module is what gets prepared.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from unipost.kernels.model import LabelLogprobs, packed_logprobs
from unipost.kernels.packing import PackedBatch

logger = logging.getLogger(__name__)

T = TypeVar("T")

StudentForward = Callable[..., LabelLogprobs]  # (packed, return_entropy[, loss_fn]) -> LabelLogprobs
# (batch, forward) -> (loss already scaled by the step's global normaliser, metrics)
StepLoss = Callable[[Any, StudentForward], tuple[torch.Tensor, dict[str, float]]]


class PackedLogprobs(torch.nn.Module):
    """A causal LM's training forward as a module: ``packed batch -> label-token log-probs``.

    Data-parallel wrappers synchronise through ``forward``; wrapping the LM in this module routes the
    fused head through it. ``_no_split_modules`` is forwarded so FSDP's auto-wrap policy still finds
    the decoder layers.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, packed: PackedBatch, return_entropy: bool = False, loss_fn=None) -> LabelLogprobs:
        """``loss_fn``: the three-GEMM head's per-token loss (``packed_logprobs``), else None."""
        return packed_logprobs(self.model, packed, return_entropy=return_entropy, loss_fn=loss_fn)


def launched_world_size() -> int:
    """Processes of the launch this process belongs to (``WORLD_SIZE`` set by torchrun / accelerate)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class Distributed:
    """The thin layer the trainer talks to; everything distributed is accelerate's.

    Build it with :meth:`from_environment` (inside ``accelerate launch``) or :meth:`create`.
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.model: torch.nn.Module | None = None  # the prepared PackedLogprobs wrapper

    @classmethod
    def create(cls, **accelerator_kwargs: Any) -> Distributed:
        """An ``accelerate.Accelerator`` from the launch environment (``mixed_precision`` etc. pass on)."""
        from accelerate import Accelerator

        accelerator_kwargs.setdefault("step_scheduler_with_optimizer", False)
        return cls(Accelerator(**accelerator_kwargs))

    @classmethod
    def from_environment(cls, **accelerator_kwargs: Any) -> Distributed | None:
        """The layer when this process was started by a multi-process launcher, else ``None``."""
        world = launched_world_size()
        if world <= 1:
            return None
        if not torch.cuda.is_available():  # accelerate would otherwise run each CPU process alone
            accelerator_kwargs.setdefault("cpu", True)
        dist = cls.create(**accelerator_kwargs)
        if dist.world_size != world:
            raise RuntimeError(
                f"launched with WORLD_SIZE={world} but accelerate set up {dist.world_size} process(es) "
                f"({dist!r}): each process would train alone; check the launcher and accelerate config"
            )
        return dist

    # -- who am I -----------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def __repr__(self) -> str:
        kind = getattr(self.accelerator.state, "distributed_type", "?")
        return f"Distributed(rank={self.rank}/{self.world_size}, type={kind}, device={self.device})"

    # -- setup ----------------------------------------------------------------------------------------

    def prepare(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Wrap ``model`` in :class:`PackedLogprobs` and prepare it and its optimiser (DDP / FSDP / DS).

        Returns (prepared wrapper, prepared optimiser). ``model`` keeps sharing its parameters with
        the wrapper (under DDP), so rollouts, evaluation and checkpoints keep using it unchanged.
        The learning-rate scheduler is *not* prepared: accelerate would step it once per process.
        """
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.uses_deepspeed and plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
            # no DataLoader to infer it from: one packed micro-batch per forward (DeepSpeed only logs it)
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        wrapper, prepared_optimizer = self.accelerator.prepare(PackedLogprobs(model), optimizer)
        self.model = wrapper
        return wrapper, prepared_optimizer

    def prepare_fsdp2(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """FSDP2 (``torch.distributed.fsdp.fully_shard``) applied here, not by accelerate's plugin.

        accelerate 1.x treats a CPU launch as DDP whatever its FSDP plugin says; this shards each
        decoder layer (the classes in ``model._no_split_modules``) and the :class:`PackedLogprobs`
        root, then points ``optimizer`` at the sharded parameters. It runs on CPU (gloo) and is
        checked against one process by the test. On GPUs prefer ``configs/accelerate/fsdp2.yaml``
        (mixed precision, CPU offload and state-dict handling come with it).
        """
        from torch.distributed.fsdp import fully_shard

        if any(optimizer.state.values()):
            raise RuntimeError("prepare_fsdp2 needs a fresh optimiser (its state holds unsharded tensors)")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        layer_classes = set(getattr(base, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ValueError(
                f"{type(base).__name__} names no decoder-layer class in _no_split_modules; FSDP2 would "
                "shard the whole model as one unit"
            )
        names = {id(p): n for n, p in model.named_parameters()}
        wrapper = PackedLogprobs(model)
        for layer in layers:
            fully_shard(layer)
        fully_shard(wrapper)
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        self.model = wrapper
        return wrapper, optimizer

    def forward(self, packed: PackedBatch, return_entropy: bool = False, loss_fn=None) -> LabelLogprobs:
        """The student's log-probs (or fused loss) through the prepared wrapper (so gradient hooks fire)."""
        if self.model is None:
            raise RuntimeError("Distributed.forward before Distributed.prepare(model, optimizer)")
        return self.model(packed, return_entropy, loss_fn)

    # -- one optimiser step ---------------------------------------------------------------------------

    def shard(self, items: Sequence[T], size: Callable[[T], int] | None = None) -> list[tuple[T, bool]]:
        """This rank's share of one step: ``(item, real)`` pairs, padded to the largest share.

        Items are ordered by ``size`` (largest first, stable) and dealt round-robin; a rank with
        fewer items gets ``(smallest item, False)`` pads, to be run with zero weight.
        """
        if not items:
            raise ValueError("cannot shard an empty optimiser step")
        order = sorted(range(len(items)), key=lambda i: -size(items[i])) if size else range(len(items))
        ordered = [items[i] for i in order]
        mine = [(item, True) for item in ordered[self.rank :: self.world_size]]
        longest = -(-len(ordered) // self.world_size)
        mine += [(ordered[-1], False)] * (longest - len(mine))
        return mine

    def accumulate(
        self, group: Sequence[Any], step_loss: StepLoss, size: Callable[[Any], int] | None = None
    ) -> dict[str, float]:
        """Forward/backward this rank's share of one optimiser step; gradients end summed over ranks.

        ``step_loss(batch, forward)`` returns the micro-batch loss already scaled by the step's
        global normaliser (as in one process) and its metrics. Returns the metrics averaged over the
        step's real micro-batches on all ranks (the single-process ``step_metrics``).
        """
        share = self.shard(group, size)
        if len(group) < self.world_size:
            logger.warning(
                "optimiser step of %d micro-batches on %d processes: %d run zero-weighted padding; set "
                "optim.grad_accumulation to a multiple of the number of processes",
                len(group),
                self.world_size,
                self.world_size - len(group),
            )
        sums: dict[str, float] = {}
        for j, (batch, real) in enumerate(share):
            sync = j == len(share) - 1  # gradients are reduced once, after the last local backward
            with self._sync(sync):
                loss, metrics = step_loss(batch, self.forward)
                weight = float(self.world_size) if real else 0.0  # DDP averages; padding counts zero
                self.accelerator.backward(loss * weight)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + (float(v) if real else 0.0)
        totals = self.sum_over_ranks(sums)
        return {k: v / len(group) for k, v in totals.items()}

    @property
    def shards_parameters(self) -> bool:
        """FSDP or DeepSpeed ZeRO-3: no process holds the whole model between steps."""
        if self.model is not None and any(hasattr(p, "full_tensor") for p in self.model.parameters()):
            return True  # DTensor parameters: FSDP2, whoever applied it
        kind = str(getattr(self.accelerator, "distributed_type", ""))
        if kind.endswith("FSDP"):
            return True
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return self.uses_deepspeed and getattr(plugin, "zero_stage", 0) == 3

    def require_replicated(self, purpose: str) -> None:
        """Refuse sharded parameters where one process must run the whole model alone."""
        if self.shards_parameters:
            raise NotImplementedError(
                f"{purpose} run the student on the main process alone, but {self!r} shards its "
                "parameters (FSDP / ZeRO-3), so that process would wait forever for the others. Use "
                "configs/accelerate/ddp.yaml or deepspeed-zero2.yaml, or drive optimise_epoch(dist=...) "
                "from your own loop (docs/scaling.md)"
            )

    @property
    def uses_deepspeed(self) -> bool:
        return str(getattr(self.accelerator, "distributed_type", "")).endswith("DEEPSPEED")

    @contextlib.contextmanager
    def _sync(self, sync: bool) -> Iterator[None]:
        """Reduce gradients on this backward only if ``sync`` (the step's last local micro-batch).

        DDP / FSDP: ``accelerator.no_sync`` on the others. DeepSpeed (not verified here: no GPU)
        reduces, clips (its ``gradient_clipping``) and steps *inside* ``accelerator.backward`` at its
        accumulation boundary, which follows accelerate's ``sync_gradients`` flag: set per backward.
        """
        if self.model is None:
            yield
        elif self.uses_deepspeed:
            self.accelerator.gradient_state._set_sync_gradients(sync)
            try:
                yield
            finally:
                self.accelerator.gradient_state._set_sync_gradients(True)
        elif sync:
            yield
        else:
            with self.accelerator.no_sync(self.model):
                yield

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the (already reduced) gradients; FSDP-aware through accelerate.

        Under DeepSpeed the engine has already clipped (config ``gradient_clipping``) and stepped;
        the norm it reports is returned (NaN when it reports none).
        """
        if self.model is None:
            raise RuntimeError("clip_grad_norm_ before prepare")
        if self.uses_deepspeed:
            engine = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
            norm = engine.engine.get_global_grad_norm() if engine is not None else None
            return float("nan") if norm is None else float(norm)
        return float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))

    # -- collectives on plain Python values -----------------------------------------------------------

    def sum_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Sum float metrics over ranks (every rank must pass the same keys)."""
        keys = sorted(values)
        local_K = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        total_K = self.accelerator.reduce(local_K, reduction="sum")
        return {k: float(v) for k, v in zip(keys, total_K.tolist(), strict=True)}

    def broadcast(self, obj: T) -> T:
        """The main process's ``obj`` on every rank (pickled; e.g. a collected rollout batch)."""
        from accelerate.utils import broadcast_object_list

        box = [obj if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]  # type: ignore[return-value]

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on the main process, then on the others (e.g. building a shared cache)."""
        with self.accelerator.main_process_first():
            yield

    def unwrap(self) -> torch.nn.Module:
        """The causal LM inside the prepared wrapper."""
        if self.model is None:
            raise RuntimeError("unwrap before prepare")
        return self.accelerator.unwrap_model(self.model).model

    def end(self) -> None:
        """Leave the process group (after the last collective)."""
        self.accelerator.end_training()
