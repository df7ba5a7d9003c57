"""The covariate-shift diagnostic of paper §4.4: reverse KL(student || teacher) on student-visited states.

Why this quantity: imitation from expert-only data (SFT) fits the teacher on the *teacher's* state
distribution; at deployment the student visits its own states, where it may drift from the teacher.
The paper samples one student rollout per instance and averages, over the tokens the student generated,

    KL(pi_s(.|ctx) || pi_T(.|ctx)) = sum_v pi_s(v|ctx) (log pi_s(v|ctx) - log pi_T(v|ctx)),

where ctx is the rendered context plus the action's earlier tokens. A rebound of this number during
SFT, flat under DAgger / AggreVaTe, is the paper's Figure 1.

How it is computed (and why): this is the *exact* KL over the full vocabulary, not the one-sample
estimate ``log pi_s(y) - log pi_T(y)`` at the sampled token (that estimate is unbiased but noisy, and
can be negative per token). The student actions are packed once with tree packing (one trajectory's
executed conversation is encoded once, each action scored at its own positions), both models run their
*decoders* on the same :class:`~unipost.kernels.PackedBatch`, and the hidden states are gathered at the
label positions. The LM heads are then applied chunk by chunk over label positions: a [chunk, V]
log-softmax per model at a time, never [N, V] for all N positions (N x V floats is ~60 GB for 100k
tokens of a 150k vocabulary). Both models must therefore share one tokenizer, so that a token id means
the same string to both; this is checked.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from unipost.data import Trajectory
from unipost.envs.base import Environment
from unipost.eval.evaluate import student_rollouts
from unipost.kernels.model import head_params, hidden_states, split_causal_lm
from unipost.kernels.packing import PackSequence, pack, split_sequences
from unipost.objective import OwnSamples
from unipost.rendering.chat import ChatRenderer, LabelSpec, trajectory_sequences
from unipost.rollout.engine import CountTokens
from unipost.rollout.policy import Policy


class VocabularyMismatchError(ValueError):
    """The student and teacher do not share a vocabulary, so a token-level KL is undefined."""


@dataclass
class KLResult:
    """Mean token-level reverse KL on student-visited contexts, overall and per trajectory.

    ``mean_kl`` averages over all student-generated tokens (the paper's "average token-level reverse
    KL"); ``per_trajectory[b]`` averages over trajectory b's student tokens and is NaN for a trajectory
    without student-executed turns (``trajectory_tokens[b] == 0``).
    """

    mean_kl: float
    per_trajectory: list[float]
    tokens: int
    trajectory_tokens: list[int] = field(default_factory=list)

    def to_dict(self, prefix: str = "kl/") -> dict[str, float]:
        """Flat floats for metric loggers."""
        finite = [x for x in self.per_trajectory if not math.isnan(x)]
        return {
            f"{prefix}reverse_kl": self.mean_kl,
            f"{prefix}reverse_kl_trajectory_mean": sum(finite) / len(finite) if finite else float("nan"),
            f"{prefix}tokens": float(self.tokens),
            f"{prefix}trajectories": float(len(finite)),
        }

    def summary(self) -> str:
        """One line for logs."""
        n = sum(t > 0 for t in self.trajectory_tokens)
        return (
            f"reverse KL(student || teacher) {self.mean_kl:.4f} nats/token over {self.tokens} tokens, "
            f"{n} rollouts"
        )


# -- checks -----------------------------------------------------------------------------------------


def _vocab_size(model: torch.nn.Module, role: str) -> int:
    _, head = split_causal_lm(model)
    weight, _ = head_params(head)
    if weight.dim() != 2:
        raise TypeError(f"{role} LM head weight has shape {tuple(weight.shape)}; expected [vocab, hidden]")
    return int(weight.shape[0])


def _check_vocabularies(
    student_model: torch.nn.Module,
    teacher_model: torch.nn.Module,
    renderer: ChatRenderer,
    teacher_tokenizer: Any | None,
) -> int:
    v_s = _vocab_size(student_model, "student")
    v_t = _vocab_size(teacher_model, "teacher")
    if v_s != v_t:
        raise VocabularyMismatchError(
            f"student and teacher LM heads have different vocabulary sizes ({v_s} vs {v_t}); the "
            "token-level KL needs one shared tokenizer (pick a teacher of the student's family, or a "
            "black-box metric instead)"
        )
    tokenizer = renderer.tokenizer
    if len(tokenizer) > v_s:
        raise VocabularyMismatchError(
            f"the renderer's tokenizer has {len(tokenizer)} tokens but the models' heads only {v_s}; "
            "the renderer must use the models' own tokenizer"
        )
    if (
        teacher_tokenizer is not None
        and teacher_tokenizer is not tokenizer
        and teacher_tokenizer.get_vocab() != tokenizer.get_vocab()
    ):
        raise VocabularyMismatchError(
            "the teacher's tokenizer maps tokens to different ids than the student's (renderer's); "
            "the token-level KL needs one shared vocabulary"
        )
    return v_s


@contextlib.contextmanager
def _eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Dropout off while measuring (a model mid-training is in train mode); restored afterwards."""
    was = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, flag in zip(models, was, strict=True):
            m.train(flag)


# -- documents --------------------------------------------------------------------------------------


def student_action_documents(
    trajectories: Sequence[Trajectory], renderer: ChatRenderer, *, mode: str = "tree"
) -> list[PackSequence]:
    """Token documents whose labels are the student-executed actions (``meta["traj"]`` = index).

    Exact sampled tokens (``Turn.action_token_ids``) are used where the engine recorded them, so the
    KL is measured on what the student actually generated, not on a re-tokenisation.
    """
    labels = OwnSamples("student")
    documents: list[PackSequence] = []
    for b, traj in enumerate(trajectories):
        if not isinstance(traj, Trajectory):
            raise TypeError(f"trajectories[{b}] is a {type(traj).__name__}, not a unipost Trajectory")
        refs = labels.select(traj)
        if not refs:
            continue
        specs = [LabelSpec(r.turn, r.message, meta={"traj": b}, token_ids=r.token_ids) for r in refs]
        documents.extend(trajectory_sequences(traj, specs, renderer, mode=mode))
    return documents


def _log_softmax_chunk(
    hidden_CH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None
) -> torch.Tensor:
    """float32 log pi(.|ctx) for a chunk of positions: the head in the model's dtype, softmax in fp32."""
    logits_CV = torch.nn.functional.linear(hidden_CH.to(weight_VH.dtype), weight_VH, bias_V)
    return torch.log_softmax(logits_CV.float(), dim=-1)


# -- the diagnostic ---------------------------------------------------------------------------------


def reverse_kl_on_student_states(
    student_model: torch.nn.Module,
    teacher_model: torch.nn.Module,
    trajectories: Sequence[Trajectory],
    renderer: ChatRenderer,
    *,
    chunk_tokens: int = 512,
    max_batch_tokens: int = 8192,
    teacher_tokenizer: Any | None = None,
    mode: str = "tree",
) -> KLResult:
    """Mean exact token-level KL(pi_student || pi_teacher) over the student's generated tokens.

    Args:
        student_model, teacher_model: transformers causal LMs (PEFT-wrapped allowed) sharing one
            vocabulary; either may live on any device.
        trajectories: rollouts in which the student executed turns (``collect_student_states``);
            teacher-executed turns are ignored (they are not student-visited actions).
        renderer: the student's :class:`ChatRenderer` (its tokenizer and the environment's tools), the
            same one used to build training batches.
        chunk_tokens: label positions per [chunk, V] log-softmax (peak memory ~ 4 x chunk x V floats).
        max_batch_tokens: packed tokens per forward pass; trajectories are grouped first-fit (a single
            longer trajectory gets a pass of its own).
        teacher_tokenizer: when given, checked to map every token to the same id as the renderer's.
        mode: ``"tree"`` (each trajectory encoded once) or ``"per_transition"`` (needed for
            flash-attention models, which cannot express tree branches).

    Raises:
        VocabularyMismatchError: the models' heads or tokenizers differ.
        ValueError: no trajectory has a student-executed turn, or a bad chunk size.
    """
    for name, value in (("chunk_tokens", chunk_tokens), ("max_batch_tokens", max_batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    vocab = _check_vocabularies(student_model, teacher_model, renderer, teacher_tokenizer)
    trajectories = list(trajectories)
    documents = student_action_documents(trajectories, renderer, mode=mode)
    if not documents:
        raise ValueError(
            f"none of the {len(trajectories)} trajectories has a student-executed turn; the reverse KL "
            "is measured on student rollouts (collect them with collect_student_states)"
        )
    kl_sum_B = torch.zeros(len(trajectories), dtype=torch.float64)
    tokens_B = torch.zeros(len(trajectories), dtype=torch.long)
    _, s_head = split_causal_lm(student_model)
    _, t_head = split_causal_lm(teacher_model)
    s_weight, s_bias = head_params(s_head)
    t_weight, t_bias = head_params(t_head)
    with _eval_mode(student_model, teacher_model), torch.inference_mode():
        for group in split_sequences(documents, max_batch_tokens):
            packed = pack(group, vocab_size=vocab)
            traj_of_seq_S = torch.tensor([m["traj"] for m in packed.seq_meta], dtype=torch.long)
            traj_L = traj_of_seq_S[packed.label_seq_L]
            s_hidden_T = hidden_states(student_model, packed)
            t_hidden_T = hidden_states(teacher_model, packed)
            s_hidden_L = s_hidden_T.index_select(0, packed.label_src_L.to(s_hidden_T.device))
            t_hidden_L = t_hidden_T.index_select(0, packed.label_src_L.to(t_hidden_T.device))
            del s_hidden_T, t_hidden_T
            kl_L = torch.empty(packed.num_label_tokens, dtype=torch.float64)
            for start in range(0, packed.num_label_tokens, chunk_tokens):
                stop = min(start + chunk_tokens, packed.num_label_tokens)
                logp_s_CV = _log_softmax_chunk(s_hidden_L[start:stop], s_weight, s_bias)
                logp_t_CV = _log_softmax_chunk(t_hidden_L[start:stop], t_weight, t_bias)
                logp_t_CV = logp_t_CV.to(logp_s_CV.device)
                kl_C = (logp_s_CV.exp() * (logp_s_CV - logp_t_CV)).sum(-1)
                kl_L[start:stop] = kl_C.double().cpu()
            kl_sum_B.index_add_(0, traj_L, kl_L)
            tokens_B.index_add_(0, traj_L, torch.ones_like(traj_L))
    total = int(tokens_B.sum())
    per_traj = [
        float(s / n) if n > 0 else float("nan")
        for s, n in zip(kl_sum_B.tolist(), tokens_B.tolist(), strict=True)
    ]
    return KLResult(
        mean_kl=float(kl_sum_B.sum() / total),
        per_trajectory=per_traj,
        tokens=total,
        trajectory_tokens=tokens_B.tolist(),
    )


def collect_student_states(
    env_factory: Callable[[Any], Environment],
    student: Policy,
    tasks: Sequence[Any],
    *,
    max_turns: int,
    temperature: float | None = None,
    context_budget: int | None = None,
    count_tokens: CountTokens | None = None,
    concurrency: int = 8,
    seed: int = 0,
    progress: bool = False,
    iteration: int = 0,
) -> list[Trajectory]:
    """One *sampled* student rollout per task: the student-visited states the KL is measured on.

    As in the paper's §4.4 the rollouts are sampled (not greedy), one per instance, so that the
    contexts follow the student's own deployment-time distribution. ``temperature`` overrides the
    policy's sampling temperature for this collection only (the caller's policy is not modified); it
    needs a policy with a ``temperature`` attribute (a :class:`~unipost.rollout.TransformersPolicy`).
    """
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not hasattr(student, "temperature"):
            raise TypeError(
                f"{type(student).__name__} has no sampling temperature to override; pass temperature=None"
            )
        student = copy.copy(student)  # shares the model; only the sampling temperature differs
        student.temperature = float(temperature)  # type: ignore[attr-defined]
    batch = student_rollouts(
        env_factory,
        student,
        tasks,
        caller="collect_student_states",
        purpose="kl-diagnostic",
        greedy=False,
        max_turns=max_turns,
        context_budget=context_budget,
        count_tokens=count_tokens,
        concurrency=concurrency,
        seed=seed,
        progress=progress,
        iteration=iteration,
    )
    return batch.trajectories
