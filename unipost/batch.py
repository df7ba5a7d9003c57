"""From finished trajectories and a Recipe to the Eq. 14 loss, through the one fused kernel.

    trajectories --recipe.keep / recipe.select_labels--> (context, label) transitions
                 --ChatRenderer + tree packing-------> PackedBatch
                 --packed_logprobs (fused head)------> logp_L (+ entropy_L)
                 --recipe.loss_weights (score w)-----> sg(w_L)
                 --weighted_nll + recipe.regularization--> loss

Every method (SFT, GRPO, OPD, DAgger, AggreVaTe, and user compositions) goes through exactly this
function; only the recipe's parts differ. OPD's teacher log-probs and a KL regulariser's reference
log-probs are computed here on the *same* packed batch with the white-box teacher / reference model
(same tokenizer), so the log-ratio is taken on exactly the tokens being trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from unipost.data import Trajectory
from unipost.kernels.loss import weighted_nll
from unipost.kernels.model import LabelLogprobs, packed_logprobs
from unipost.kernels.packing import PackedBatch, PackSequence, first_fit, pack, pack_shared, packed_size
from unipost.objective import Need, Recipe, RegularizerInputs, ScoreInputs, clipped_ratio
from unipost.objective.needs import logp_scope_of
from unipost.rendering.chat import ChatRenderer, LabelSpec, RenderStats, trajectory_sequences


class EmptyBatchError(ValueError):
    """No trajectory survived the recipe's filter, or none had a label to train on."""


@dataclass
class TrainingBatch:
    """A packed batch plus the per-trajectory data the score needs (S labels, B trajectories)."""

    packed: PackedBatch
    trajectories: list[Trajectory]  # the kept ones, index b
    traj_of_seq_S: torch.Tensor
    reward_B: torch.Tensor
    resolved_B: torch.Tensor
    submitted_B: torch.Tensor
    group_of_traj_B: torch.Tensor
    render_stats: RenderStats = field(default_factory=RenderStats)
    old_logp_L: torch.Tensor | None = None  # log pi_old per label token (Recipe.ratio_clip), detached

    @property
    def num_label_tokens(self) -> int:
        return self.packed.num_label_tokens

    @property
    def num_sequences(self) -> int:
        """Trajectories with at least one label: the sequences of ``sequence_mean``.

        A GRPO group member kept only for its group's baseline has no label and is not counted.
        """
        return int(torch.unique(self.traj_of_seq_S).numel())

    @property
    def traj_of_token_L(self) -> torch.Tensor:
        """int64 [L]: the trajectory (index b) each label token belongs to."""
        return self.traj_of_seq_S[self.packed.label_seq_L]


def group_keys(trajectories: Sequence[Trajectory]) -> list[str]:
    """Each trajectory's GRPO group: its iteration and ``meta['group']`` (default: its task).

    The one definition of a group: the batch builder's baselines, the micro-batch packer and the
    trainer's budget cut (which must never split a group) all read it. The iteration is always part of
    the key because the rollout engine numbers groups per collection (``meta['group']`` is the task's
    index in that iteration's batch): without it, aggregated data (``aggregate=True``: D_1 u ... u D_i)
    would merge group 0 of every iteration, i.e. different tasks, into one baseline.
    """
    return [repr((t.meta.get("iteration"), t.meta.get("group", t.task_id))) for t in trajectories]


def _group_ids(trajectories: Sequence[Trajectory]) -> torch.Tensor:
    """Group keys as contiguous int ids, in order of first appearance."""
    keys: dict[str, int] = {}
    ids = [keys.setdefault(key, len(keys)) for key in group_keys(trajectories)]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class RenderedTrajectory:
    """One kept trajectory's token documents (rendered once, packed into any micro-batch later)."""

    trajectory: Trajectory
    group: int
    documents: list[PackSequence]

    @property
    def packed_size(self) -> int:
        return sum(packed_size(doc) for doc in self.documents)


def render_trajectories(
    trajectories: Sequence[Trajectory],
    recipe: Recipe,
    renderer: ChatRenderer,
    *,
    mode: str = "tree",
    stats: RenderStats | None = None,
) -> list[RenderedTrajectory]:
    """The recipe's transitions of each kept trajectory as token documents.

    Groups are computed over *all* trajectories before the submission filter (a GRPO group's
    baseline includes its failed samples); filtered trajectories are then dropped. When the score
    needs groups, a trajectory without labels (filtered, or with no student turn under a mixture)
    is kept with no documents, so its reward still counts in its group's baseline; groups with no
    label at all are dropped.
    """
    stats = stats if stats is not None else RenderStats()
    keep_unlabelled = Need.GROUPS in recipe.needs
    rendered = []
    for traj, group in zip(trajectories, _group_ids(trajectories).tolist(), strict=True):
        refs = recipe.select_labels(traj)
        if not refs:
            if keep_unlabelled:
                rendered.append(RenderedTrajectory(traj, group, []))
            continue
        specs = [LabelSpec(r.turn, r.message, token_ids=r.token_ids) for r in refs]
        rendered.append(
            RenderedTrajectory(
                traj, group, trajectory_sequences(traj, specs, renderer, mode=mode, stats=stats)
            )
        )
    if keep_unlabelled:
        labelled = {r.group for r in rendered if r.documents}
        rendered = [r for r in rendered if r.group in labelled]
    return rendered


def pack_rendered(
    rendered: Sequence[RenderedTrajectory],
    *,
    vocab_size: int | None = None,
    stats: RenderStats | None = None,
    empty_message: str = "no trajectory has a label to train on",
    share_prefixes: bool = True,
) -> TrainingBatch:
    """Pack rendered trajectories into one :class:`TrainingBatch` (trajectory b = index in ``rendered``).

    ``share_prefixes`` (default): one prefix tree over all documents (:func:`pack_shared`), so a
    prompt shared by a GRPO group, or the system prompt and tool schemas shared by every trajectory,
    is encoded once; the same labels in the same order, the same log-probs and gradients as one tree
    per trajectory (:func:`pack`, ``share_prefixes=False``).
    """
    documents = [doc for r in rendered for doc in r.documents]
    if not documents:
        raise EmptyBatchError(empty_message)
    packer = pack_shared if share_prefixes else pack
    packed = packer(documents, vocab_size=vocab_size)
    outcomes = [r.trajectory.outcome for r in rendered]
    return TrainingBatch(
        packed=packed,
        trajectories=[r.trajectory for r in rendered],
        traj_of_seq_S=torch.tensor(
            [b for b, r in enumerate(rendered) for doc in r.documents for _ in doc.labels], dtype=torch.long
        ),
        reward_B=torch.tensor([o.reward for o in outcomes], dtype=torch.float32),
        resolved_B=torch.tensor([o.resolved for o in outcomes], dtype=torch.bool),
        submitted_B=torch.tensor([o.submitted for o in outcomes], dtype=torch.bool),
        group_of_traj_B=torch.tensor([r.group for r in rendered], dtype=torch.long),
        render_stats=stats or RenderStats(),
    )


def make_microbatches(
    trajectories: Sequence[Trajectory],
    recipe: Recipe,
    renderer: ChatRenderer,
    *,
    max_tokens: int,
    vocab_size: int | None = None,
    share_prefixes: bool = True,
) -> list[TrainingBatch]:
    """Greedy first-fit of whole groups into micro-batches of at most ``max_tokens`` packed tokens.

    Every trajectory is rendered once; sizes come from the rendered documents. A group is never split
    (its GRPO baseline must see all its samples). It sits with batch building, not with the optimiser,
    because evaluation (``eval.imitation``) batches label NLLs the same way. With ``share_prefixes``
    (default) a micro-batch is one prefix tree over all its trajectories (see :func:`pack_rendered`).
    The bins are chosen by the *unshared* token count either way, so sharing never changes which
    trajectories share a micro-batch, hence not the number of optimiser steps or any update: it only
    removes repeated prefix tokens from each micro-batch (the same loss and gradients, less compute).
    Counting shared tokens instead would pack more per micro-batch and take fewer, larger steps,
    which silently changed training dynamics (measured: the OPD progress test's KL drop 0.82x vs 0.8x).
    """
    groups: dict[int, list[RenderedTrajectory]] = {}
    for rendered in render_trajectories(trajectories, recipe, renderer):
        groups.setdefault(rendered.group, []).append(rendered)
    members = list(groups.values())
    units = [[doc for r in group for doc in r.documents] for group in members]
    bins = first_fit(units, max_tokens, False)  # same bins (and optimiser steps) with or without sharing
    return [
        pack_rendered(
            [r for g in b for r in members[g]], vocab_size=vocab_size, share_prefixes=share_prefixes
        )
        for b in bins
    ]


def build_batch(
    trajectories: Sequence[Trajectory],
    recipe: Recipe,
    renderer: ChatRenderer,
    *,
    mode: str = "tree",
    vocab_size: int | None = None,
    share_prefixes: bool | None = None,
) -> TrainingBatch:
    """Select, render and pack the recipe's transitions of ``trajectories`` (one batch).

    ``share_prefixes`` (default: on for ``mode="tree"``, off for ``"per_transition"``, the unpacked
    baseline): encode prefixes shared across documents once (:func:`pack_rendered`).
    """
    if share_prefixes is None:
        share_prefixes = mode == "tree"
    stats = RenderStats()
    rendered = render_trajectories(trajectories, recipe, renderer, mode=mode, stats=stats)
    empty = (
        f"none of the {len(trajectories)} trajectories has a label to train on under "
        f"{recipe.display_name} (all filtered out, e.g. no valid submission, or no turns)"
    )
    return pack_rendered(
        rendered, vocab_size=vocab_size, stats=stats, empty_message=empty, share_prefixes=share_prefixes
    )


HEADS = ("auto", "fused_loss", "logprobs")


def select_head(
    recipe: Recipe,
    head: str = "auto",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """The LM-head path :func:`objective_loss` runs for ``recipe``: ``"fused_loss"`` or ``"logprobs"``.

    ``"fused_loss"`` (three GEMMs, :func:`~unipost.kernels.fused_loss.fused_token_loss`) forms the
    gradient inside the forward sweep; it needs a loss made of per-token terms, i.e. a recipe whose
    ``logp_scope`` is "none" or "token" (every built-in score and regulariser, ratio clipping
    included). ``"logprobs"`` (four GEMMs, ``token_logprobs``) takes any loss. ``head="auto"`` picks
    ``"fused_loss"`` where it applies and the torch kernel is the one that would run (CPU); on CUDA the
    Triton ``token_logprobs`` stays. A forced ``"fused_loss"`` on a recipe whose loss reads other
    tokens' log-probs is an error, never a silent approximation.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    per_token = recipe.logp_scope != "batch"
    if head == "fused_loss" and not per_token:
        raise ValueError(
            f"{recipe.display_name}: head='fused_loss' needs a loss made of per-token terms, but a part of "
            f"{recipe.describe()} reads other tokens' log-probs (logp_scope 'batch'); use head='logprobs' "
            "or 'auto'"
        )
    if head != "auto":
        return head
    from unipost.kernels.logprobs import select_logprobs_backend

    torch_kernel = device is None or select_logprobs_backend(device, dtype or torch.float32) == "torch"
    return "fused_loss" if per_token and torch_kernel else "logprobs"


class _ObjectiveTerms:
    """The recipe's loss as a function of the student's ``(logp_L, entropy_L)``, for either head.

    The four-GEMM head evaluates it once on differentiable log-probs; the three-GEMM head once per row
    chunk on detached values (for the chunk's gradient) and once more for the value, so both heads
    compute the one loss by the one code path. Weights that read no log-prob are computed once.
    """

    def __init__(self, recipe, batch, teacher_logp, ref_logp, normalization_constant) -> None:
        self.recipe, self.batch = recipe, batch
        self.teacher_logp, self.ref_logp = teacher_logp, ref_logp
        self.constant = normalization_constant
        self._fixed_weights: torch.Tensor | None = None
        self._reads_logp = recipe.ratio_clip is not None or logp_scope_of(recipe.score) != "none"

    def inputs(self, logp_L: torch.Tensor) -> ScoreInputs:
        device, batch = logp_L.device, self.batch
        return ScoreInputs(
            logp_L=logp_L.detach(),
            label_seq_L=batch.packed.label_seq_L.to(device),
            traj_of_seq_S=batch.traj_of_seq_S.to(device),
            reward_B=batch.reward_B.to(device),
            resolved_B=batch.resolved_B.to(device),
            submitted_B=batch.submitted_B.to(device),
            teacher_logp_L=None if self.teacher_logp is None else self.teacher_logp.to(device),
            group_of_traj_B=batch.group_of_traj_B.to(device),
            old_logp_L=None if batch.old_logp_L is None else batch.old_logp_L.to(device),
        )

    def weights(self, logp_L: torch.Tensor) -> torch.Tensor:
        if self._fixed_weights is not None:
            return self._fixed_weights
        w = self.recipe.loss_weights(self.inputs(logp_L)) * self.batch.packed.label_weight_L.to(logp_L.device)
        if not self._reads_logp:
            self._fixed_weights = w
        return w

    def __call__(self, logp_L: torch.Tensor, entropy_L: torch.Tensor | None):
        """``(loss, nll, regulariser, metrics)``; differentiable through ``logp_L`` / ``entropy_L``."""
        device = logp_L.device
        nll, metrics = weighted_nll(
            logp_L,
            self.weights(logp_L),
            self.batch.traj_of_token_L.to(device),  # sequence_mean: one sequence per trajectory
            normalization=self.recipe.normalization,
            constant=self.constant,
        )
        ref = None if self.ref_logp is None else self.ref_logp.to(device)
        reg = self.recipe.regularization(
            RegularizerInputs(logp_L=logp_L, ref_logp_L=ref, entropy_L=entropy_L)
        )
        return nll + reg, nll, reg, metrics


def objective_loss(
    model: torch.nn.Module,
    batch: TrainingBatch,
    recipe: Recipe,
    *,
    teacher: torch.nn.Module | None = None,
    reference: torch.nn.Module | None = None,
    normalization_constant: float | None = None,
    student_forward: Callable[..., LabelLogprobs] | None = None,
    head: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The Eq. 14 surrogate for one batch: sum_t sg(w_t) (-log pi(y_t|x)) / Z + R.

    ``Z`` follows ``recipe.normalization``; for ``sequence_mean`` a sequence is a trajectory. With
    ``recipe.ratio_clip`` the weights carry the clipped ratio against ``batch.old_logp_L`` (ratio 1
    when the batch has none, i.e. before any update on it). ``normalization_constant`` is used when
    ``recipe.normalization == "constant"`` (e.g. the global label-token count when a batch is split
    into micro-batches). ``student_forward(packed, return_entropy[, loss_fn])`` replaces
    ``packed_logprobs(model, ...)`` for the student, so a data-parallel wrapper's forward (and its
    gradient hooks) runs; see :mod:`unipost.train.distributed`. ``head`` picks the LM-head path
    (:func:`select_head`: three GEMMs where the loss is per-token, else four); the loss and gradients
    are the same either way to fp32 rounding, and ``metrics["head_three_gemm"]`` says which ran.
    """
    needs = recipe.needs
    packed = batch.packed
    want_entropy = Need.ENTROPY in needs
    param = next(model.parameters(), None)
    device, dtype = (None, None) if param is None else (param.device, param.dtype)
    chosen = select_head(recipe, head, device=device, dtype=dtype)
    teacher_logp = None
    if Need.TEACHER_LOGPROBS in needs:
        if teacher is None:
            raise ValueError(
                f"{recipe.display_name} needs teacher log-probs: pass a white-box `teacher` model"
            )
        with torch.no_grad():
            teacher_logp = packed_logprobs(teacher, packed).logp_L
    ref_logp = None
    if Need.REFERENCE_LOGPROBS in needs:
        if reference is None:
            raise ValueError(
                f"{recipe.display_name} needs reference log-probs: pass a frozen `reference` model"
            )
        with torch.no_grad():
            ref_logp = packed_logprobs(reference, packed).logp_L
    terms = _ObjectiveTerms(recipe, batch, teacher_logp, ref_logp, normalization_constant)
    if chosen == "fused_loss":

        def loss_fn(logp_L: torch.Tensor, entropy_L: torch.Tensor | None) -> torch.Tensor:
            return terms(logp_L, entropy_L)[0]

        if student_forward is not None:
            out = student_forward(packed, want_entropy, loss_fn)
        else:
            out = packed_logprobs(model, packed, return_entropy=want_entropy, loss_fn=loss_fn)
        with torch.no_grad():
            _, nll, reg, metrics = terms(out.logp_L, out.entropy_L)
        loss = out.loss
    else:
        if student_forward is not None:
            out = student_forward(packed, want_entropy)
        else:
            out = packed_logprobs(model, packed, return_entropy=want_entropy)
        loss, nll, reg, metrics = terms(out.logp_L, out.entropy_L)
    device = out.logp_L.device
    metrics.update(
        {
            "loss": float(loss.detach()),
            "nll": float(nll.detach()),
            "regularizer": float(reg.detach()),
            "packed_tokens": float(packed.num_tokens),
            "labels": float(packed.num_labels),
            "trajectories": float(batch.num_sequences),
            "head_three_gemm": 1.0 if chosen == "fused_loss" else 0.0,
        }
    )
    if recipe.ratio_clip is not None and batch.old_logp_L is not None and out.logp_L.numel():
        inputs = terms.inputs(out.logp_L)
        unclipped_w = recipe.loss_weights(replace(inputs, old_logp_L=None))
        ratio = clipped_ratio(inputs.logp_L, inputs.old_logp_L, unclipped_w, recipe.ratio_clip)
        metrics["ratio_clipped_frac"] = float((ratio == 0).double().mean())
    if teacher_logp is not None:
        metrics["reverse_kl_sampled"] = float((out.logp_L.detach() - teacher_logp.to(device)).mean())
    return loss, metrics
