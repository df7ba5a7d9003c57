"""The §4.4 covariate-shift diagnostic: exact reverse KL(student || teacher) on student-visited states.

The packed, chunked computation is compared with a brute-force reference that runs every (context,
action) pair through each model separately, takes the full log-softmax over the vocabulary and sums
pi_s (log pi_s - log pi_T) per position (tolerance 1e-5 nats on fp32 models).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from factories import TOOLS, make_trajectory

from unipost.data import Trajectory
from unipost.eval import (
    KLResult,
    VocabularyMismatchError,
    collect_student_states,
    reverse_kl_on_student_states,
)
from unipost.models import build_tiny_qwen3, build_tokenizer
from unipost.rendering.chat import ChatRenderer

TOL = 1e-5


@pytest.fixture(scope="module")
def models(tokenizer):
    student = build_tiny_qwen3(len(tokenizer), seed=0)
    teacher = build_tiny_qwen3(len(tokenizer), seed=1)
    return student, teacher


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return ChatRenderer(tokenizer, TOOLS)


def student_trajectories(tokenizer) -> list[Trajectory]:
    """Mixed executors; some student turns carry sampled token ids (random tokens + end of turn, so
    they hang off the spine as branches), others are re-rendered (on the spine); one has no student turn."""
    rng = random.Random(0)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for i, executors in enumerate(["tssts", "sst", "ttt", "stts"]):
        traj = make_trajectory(executors, task_id=f"t{i}", seed=i)
        for t, turn in enumerate(traj.turns):
            if turn.executor == "student" and (i + t) % 2 == 0:
                turn.action_token_ids = [rng.randrange(len(tokenizer)) for _ in range(3 + t)] + [eot]
        out.append(traj)
    return out


def brute_force(student, teacher, trajectories, renderer) -> tuple[float, list[float]]:
    """Separate full forward per (context, action); full log_softmax; KL per position; means."""
    sums, counts = [], []
    for traj in trajectories:
        s_sum, n = 0.0, 0
        for t, turn in enumerate(traj.turns):
            if turn.executor != "student":
                continue
            context = traj.context(t)
            ctx = renderer.context_ids(context)
            act = list(turn.action_token_ids or renderer.label_ids(context, turn.action))
            ids = torch.tensor([ctx + act])
            with torch.no_grad():
                logp_s = torch.log_softmax(student(input_ids=ids).logits[0].double(), -1)
                logp_t = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), -1)
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(act) - 1)
            ls, lt = logp_s[positions], logp_t[positions]
            s_sum += float((ls.exp() * (ls - lt)).sum())
            n += len(act)
        sums.append(s_sum)
        counts.append(n)
    mean = sum(sums) / sum(counts)
    return mean, [s / n if n else math.nan for s, n in zip(sums, counts, strict=True)]


def test_reverse_kl_equals_brute_force_reference(tokenizer, models, renderer):
    student, teacher = models
    trajs = student_trajectories(tokenizer)
    result = reverse_kl_on_student_states(student, teacher, trajs, renderer, chunk_tokens=64)
    ref_mean, ref_per = brute_force(student, teacher, trajs, renderer)
    assert isinstance(result, KLResult)
    assert result.mean_kl > 0.01, "two different random models must diverge"
    assert result.mean_kl == pytest.approx(ref_mean, abs=TOL)
    for got, want in zip(result.per_trajectory, ref_per, strict=True):
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, abs=TOL)
    assert result.trajectory_tokens[2] == 0  # "ttt": no student-visited action
    assert result.tokens == sum(result.trajectory_tokens) > 0
    flat = result.to_dict()
    assert flat["kl/reverse_kl"] == result.mean_kl and flat["kl/trajectories"] == 3.0


def test_kl_of_a_model_with_itself_is_zero(tokenizer, models, renderer):
    student, _ = models
    result = reverse_kl_on_student_states(student, student, student_trajectories(tokenizer), renderer)
    assert result.tokens > 0
    assert abs(result.mean_kl) < 1e-9
    assert all(math.isnan(x) or abs(x) < 1e-9 for x in result.per_trajectory)


def test_chunking_and_micro_batching_do_not_change_the_result(tokenizer, models, renderer):
    student, teacher = models
    trajs = student_trajectories(tokenizer)
    base = reverse_kl_on_student_states(student, teacher, trajs, renderer, chunk_tokens=10_000)
    for chunk, batch_tokens in [(3, 8192), (64, 1)]:  # max_batch_tokens=1: one trajectory a pass
        other = reverse_kl_on_student_states(
            student, teacher, trajs, renderer, chunk_tokens=chunk, max_batch_tokens=batch_tokens
        )
        assert other.tokens == base.tokens
        assert other.mean_kl == pytest.approx(base.mean_kl, abs=1e-6)
    per_transition = reverse_kl_on_student_states(student, teacher, trajs, renderer, mode="per_transition")
    assert per_transition.mean_kl == pytest.approx(base.mean_kl, abs=TOL)


def test_models_stay_in_their_mode_and_get_no_gradients(tokenizer, models, renderer):
    student, teacher = models
    student.train()
    teacher.eval()
    try:
        reverse_kl_on_student_states(student, teacher, student_trajectories(tokenizer)[:1], renderer)
        assert student.training and not teacher.training, "each model's train/eval mode is restored"
        assert all(p.grad is None for p in student.parameters())
    finally:
        student.eval()


def test_mismatched_vocabulary_raises(tokenizer, models, renderer):
    student, _ = models
    bigger = build_tiny_qwen3(len(tokenizer) + 16, seed=1)
    trajs = student_trajectories(tokenizer)
    with pytest.raises(VocabularyMismatchError, match="vocabulary sizes"):
        reverse_kl_on_student_states(student, bigger, trajs, renderer)
    other_tok = build_tokenizer(["completely different corpus " * 50], vocab_size=len(tokenizer))
    with pytest.raises(VocabularyMismatchError, match="different ids"):
        reverse_kl_on_student_states(student, student, trajs, renderer, teacher_tokenizer=other_tok)


def test_bad_input_raises_clearly(tokenizer, models, renderer):
    student, teacher = models
    teacher_only = [make_trajectory("ttt")]
    with pytest.raises(ValueError, match="student-executed turn"):
        reverse_kl_on_student_states(student, teacher, teacher_only, renderer)
    with pytest.raises(ValueError, match="chunk_tokens"):
        reverse_kl_on_student_states(
            student, teacher, student_trajectories(tokenizer), renderer, chunk_tokens=0
        )


def test_collect_student_states_then_kl_on_real_rollouts(tokenizer, models):
    """Sampled tiny-model rollouts on the embedded env: one per task, exact tokens, KL == reference."""
    from unipost.envs.embedded import EmbeddedEnv, bwrap_available
    from unipost.rollout.transformers_policy import TransformersPolicy

    if not bwrap_available():
        pytest.skip("the embedded env needs bubblewrap")
    student, teacher = models
    policy = TransformersPolicy(student, tokenizer, max_new_tokens=16, temperature=1.0, seed=0)
    tasks = [("heldout", i, "easy") for i in range(2)]
    trajs = collect_student_states(
        lambda t: EmbeddedEnv.from_split(*t), policy, tasks, max_turns=2, temperature=0.7, concurrency=2
    )
    assert policy.temperature == 1.0, "the caller's policy must not be modified"
    assert len(trajs) == len(tasks)
    assert all(not t.meta["greedy"] and t.turns for t in trajs)
    assert all(turn.executor == "student" and turn.action_token_ids for t in trajs for turn in t.turns)
    renderer = ChatRenderer(tokenizer, EmbeddedEnv.from_split(*tasks[0]).tools)
    result = reverse_kl_on_student_states(student, teacher, trajs, renderer, chunk_tokens=5)
    ref_mean, _ = brute_force(student, teacher, trajs, renderer)
    assert result.tokens == sum(len(turn.action_token_ids) for t in trajs for turn in t.turns)
    assert result.mean_kl == pytest.approx(ref_mean, abs=TOL)
    with pytest.raises(ValueError, match="temperature"):
        collect_student_states(
            lambda t: EmbeddedEnv.from_split(*t), policy, tasks, max_turns=1, temperature=0
        )
