"""The decomposition is honest: for every named recipe, the loss the library optimises on a batch equals
Eq. 14 with that recipe's parts, computed by hand from separate (unpacked) forward passes.

    L = sum_{(x, y) selected} sum_j sg(w_j) * (-log pi(y_j | x, y_<j)) / (number of label tokens)

Values and parameter gradients, fp32, atol 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from factories import TOOLS, make_trajectory

from unipost.batch import EmptyBatchError, build_batch, group_keys, objective_loss
from unipost.kernels.model import packed_logprobs
from unipost.models import build_tiny_qwen3
from unipost.objective import (
    GRPO,
    OPD,
    SFT,
    AggreVaTe,
    DAgger,
    GroupAdvantage,
    OwnSamples,
    Recipe,
    StudentRollout,
    TeacherLogRatio,
    TurnMixture,
)
from unipost.rendering.chat import ChatRenderer


def separate_logp(model, renderer, traj, turn, message) -> torch.Tensor:
    context = renderer.context_ids(traj.context(turn))
    label = renderer.label_ids(traj.context(turn), message)
    logits = model(input_ids=torch.tensor([context + label])).logits[0].float()
    c = len(context)
    return torch.log_softmax(logits[c - 1 : c - 1 + len(label)], -1).gather(1, torch.tensor(label)[:, None])[
        :, 0
    ]


def hand_loss(model, renderer, selected):
    """selected: list of (traj, turn, message, weight_fn(logp_detached) -> weights)."""
    terms, n = [], 0
    for traj, turn, message, weight_fn in selected:
        logp = separate_logp(model, renderer, traj, turn, message)
        terms.append((weight_fn(logp.detach()) * -logp).sum())
        n += logp.numel()
    return torch.stack(terms).sum() / n


def compare(model, ours_fn, hand_fn):
    model.zero_grad()
    ours, metrics = ours_fn()
    ours.backward()
    g1 = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref = hand_fn()
    ref.backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(g1[k], p.grad, atol=1e-5, rtol=1e-4, msg=k)
    return metrics


@pytest.fixture()
def renderer(tokenizer):
    return ChatRenderer(tokenizer, TOOLS)


def test_sft_with_rejection_sampling_is_sft_on_the_retained_subset(tiny_model, renderer):
    """Rejection sampling changes the dataset (paper App. A), it does not zero-weight rejected tokens:
    loss, gradients and label count equal plain SFT on the resolved trajectories alone (before the fix,
    unresolved tokens stayed in the token-mean denominator: loss 5.09 vs 7.66 here)."""
    trajs = [
        make_trajectory("tttt", seed=0, resolved=True),
        make_trajectory("ttt", seed=1, resolved=False),
        make_trajectory("tt", seed=2, resolved=True),
    ]
    retained = [trajs[0], trajs[2]]
    recipe = SFT(rejection_sampling=True)
    batch = build_batch(trajs, recipe, renderer)
    subset = build_batch(retained, SFT(rejection_sampling=False), renderer)
    assert batch.packed.num_labels == subset.packed.num_labels == 6  # effective samples: retained only
    assert batch.num_label_tokens == subset.num_label_tokens
    selected = [(tr, t.index, t.action, torch.ones_like) for tr in retained for t in tr.turns]
    compare(
        tiny_model,
        lambda: objective_loss(tiny_model, batch, recipe),
        lambda: objective_loss(tiny_model, subset, SFT(rejection_sampling=False))[0],
    )
    compare(
        tiny_model,
        lambda: objective_loss(tiny_model, batch, recipe),
        lambda: hand_loss(tiny_model, renderer, selected),
    )


def test_dagger_teacher_labels_at_every_state_and_submission_filter(tiny_model, renderer):
    trajs = [
        make_trajectory("tstss", seed=0),
        make_trajectory("ssts", seed=3, submitted=False, resolved=False),  # filtered (App. F.2)
        make_trajectory("sst", seed=5, resolved=False),  # submitted but unresolved: kept
    ]
    recipe = DAgger()
    kept = [trajs[0], trajs[2]]
    selected = [(tr, t.index, t.label, torch.ones_like) for tr in kept for t in tr.turns]
    batch = build_batch(trajs, recipe, renderer)
    assert len(batch.trajectories) == 2
    per_trajectory = build_batch(trajs, recipe, renderer, share_prefixes=False).packed  # one tree each
    assert per_trajectory.num_branches == sum(t.executor == "student" for tr in kept for t in tr.turns)
    compare(
        tiny_model,
        lambda: objective_loss(tiny_model, batch, recipe),
        lambda: hand_loss(tiny_model, renderer, selected),
    )


def test_aggrevate_same_objective_as_dagger_on_prefix_trajectory(tiny_model, renderer):
    trajs = [
        make_trajectory("ssttt", seed=1),
        make_trajectory("sttt", seed=2),
    ]  # student prefix k, then teacher
    recipe = AggreVaTe()
    selected = [(tr, t.index, t.label, torch.ones_like) for tr in trajs for t in tr.turns]
    batch = build_batch(trajs, recipe, renderer)
    compare(
        tiny_model,
        lambda: objective_loss(tiny_model, batch, recipe),
        lambda: hand_loss(tiny_model, renderer, selected),
    )


def test_grpo_group_advantage(tiny_model, renderer):
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5]
    groups = ["a", "a", "a", "b", "b"]
    trajs = [
        make_trajectory("sss"[: 2 + i % 2], task_id=g, seed=i, reward=r, resolved=r == 1.0, meta={"group": g})
        for i, (r, g) in enumerate(zip(rewards, groups, strict=True))
    ]
    recipe = GRPO(group_size=3)

    def advantage(i):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        mean = sum(members) / len(members)
        std = torch.tensor(members).std().item()  # Bessel-corrected, as TRL
        return (rewards[i] - mean) / (std + 1e-6)

    advantages = [advantage(i) for i in range(len(trajs))]
    selected = [
        (tr, t.index, t.action, lambda lp, a=advantages[i]: torch.full_like(lp, a))
        for i, tr in enumerate(trajs)
        for t in tr.turns
    ]
    batch = build_batch(trajs, recipe, renderer)
    compare(
        tiny_model,
        lambda: objective_loss(tiny_model, batch, recipe),
        lambda: hand_loss(tiny_model, renderer, selected),
    )


def test_group_baseline_counts_samples_without_labels(tiny_model, renderer):
    """A group member with nothing to train on (here: filtered as unsubmitted) still sets the baseline.

    Group a: rewards [1 (filtered: not submitted), 0, 0]; only the two zeros carry labels, and their
    advantage is computed against the whole group (-0.577 each), not against themselves (0). Group b
    has no labelled member at all and is dropped.
    """
    spec = [("a", 1.0, False), ("a", 0.0, True), ("a", 0.0, True), ("b", 1.0, False)]
    trajs = [
        make_trajectory("ss", task_id=g, seed=i, reward=r, resolved=False, submitted=sub, meta={"group": g})
        for i, (g, r, sub) in enumerate(spec)
    ]
    recipe = Recipe(StudentRollout(group_size=3), OwnSamples(), GroupAdvantage(), filter_unsubmitted=True)
    batch = build_batch(trajs, recipe, renderer)
    assert len(batch.trajectories) == 3 and batch.reward_B.tolist() == [1.0, 0.0, 0.0]
    advantage = (0.0 - 1 / 3) / (torch.tensor([1.0, 0.0, 0.0]).std().item() + 1e-6)
    selected = [
        (tr, t.index, t.action, lambda lp: torch.full_like(lp, advantage))
        for tr in trajs[1:3]
        for t in tr.turns
    ]
    compare(
        tiny_model,
        lambda: objective_loss(tiny_model, batch, recipe),
        lambda: hand_loss(tiny_model, renderer, selected),
    )


def test_opd_teacher_log_ratio(tiny_model, renderer, tokenizer):
    teacher = build_tiny_qwen3(len(tokenizer), seed=11)
    trajs = [make_trajectory("sss", seed=0), make_trajectory("ss", seed=4)]
    recipe = OPD()

    def ratio(traj, turn, message):
        with torch.no_grad():
            t_logp = separate_logp(teacher, renderer, traj, turn, message)
        return lambda lp: t_logp - lp

    selected = [(tr, t.index, t.action, ratio(tr, t.index, t.action)) for tr in trajs for t in tr.turns]
    batch = build_batch(trajs, recipe, renderer)
    metrics = compare(
        tiny_model,
        lambda: objective_loss(tiny_model, batch, recipe, teacher=teacher),
        lambda: hand_loss(tiny_model, renderer, selected),
    )
    assert "reverse_kl_sampled" in metrics
    with pytest.raises(ValueError, match="white-box `teacher`"):
        objective_loss(tiny_model, batch, recipe)


def test_user_composition_mixture_rollouts_with_opd_score(tiny_model, renderer, tokenizer):
    """A new method in one line: DAgger's mixture contexts, OPD's own-sample labels and score."""
    teacher = build_tiny_qwen3(len(tokenizer), seed=12)
    recipe = Recipe(TurnMixture(0.5), OwnSamples(), TeacherLogRatio(), name="mixture-OPD")
    trajs = [make_trajectory("tsts", seed=2)]

    def ratio(traj, turn, message):
        with torch.no_grad():
            t_logp = separate_logp(teacher, renderer, traj, turn, message)
        return lambda lp: t_logp - lp

    selected = [
        (tr, t.index, t.action, ratio(tr, t.index, t.action))
        for tr in trajs
        for t in tr.turns
        if t.executor == "student"
    ]
    batch = build_batch(trajs, recipe, renderer)
    compare(
        tiny_model,
        lambda: objective_loss(tiny_model, batch, recipe, teacher=teacher),
        lambda: hand_loss(tiny_model, renderer, selected),
    )


def test_empty_batch_is_a_clear_error(renderer):
    trajs = [make_trajectory("ts", submitted=False, resolved=False)]
    with pytest.raises(EmptyBatchError, match="has a label to train on"):
        build_batch(trajs, DAgger(), renderer)


def test_sequence_mean_averages_per_trajectory_not_per_turn(tiny_model, renderer):
    """GRPO's per-sequence mean 1/G sum_i 1/|o_i| sum_t: a multi-turn trajectory is one sequence o_i."""
    trajs = [make_trajectory("sss", seed=0), make_trajectory("s", seed=5)]
    recipe = Recipe(StudentRollout(), OwnSamples(), normalization="sequence_mean")
    batch = build_batch(trajs, recipe, renderer)

    def hand():
        per_traj = []
        for tr in trajs:
            logp = torch.cat([separate_logp(tiny_model, renderer, tr, t.index, t.action) for t in tr.turns])
            per_traj.append(-logp.sum() / logp.numel())
        return torch.stack(per_traj).mean()

    compare(tiny_model, lambda: objective_loss(tiny_model, batch, recipe), hand)


def test_ratio_clip_at_ratio_one_is_exactly_the_plain_loss(tiny_model, renderer):
    """PPO's clipped ratio is off by default; on, with pi_old = pi_theta (first epoch), it changes nothing."""
    rewards = [1.0, 0.0, 0.5]
    trajs = [make_trajectory("ss", task_id="a", seed=i, reward=r) for i, r in enumerate(rewards)]
    plain, clipped = GRPO(group_size=3), GRPO(group_size=3, ratio_clip=0.2)
    assert plain.ratio_clip is None
    batch = build_batch(trajs, clipped, renderer)
    with torch.no_grad():
        batch.old_logp_L = packed_logprobs(tiny_model, batch.packed).logp_L
    compare(
        tiny_model,
        lambda: objective_loss(tiny_model, batch, clipped),
        lambda: objective_loss(tiny_model, build_batch(trajs, plain, renderer), plain)[0],
    )


def test_ratio_clip_gives_ppo_clipped_surrogate_gradient(tiny_model, renderer):
    """Off-policy (pi_old != pi_theta): the gradient equals autograd of PPO's
    -mean_j min(r_j A_j, clip(r_j, 1 - eps, 1 + eps) A_j), r_j = exp(logp_j - logp_old_j)."""
    rewards = [1.0, 0.0, 0.0, 1.0]
    trajs = [make_trajectory("ss", task_id="a", seed=i, reward=r) for i, r in enumerate(rewards)]
    eps = 0.2
    recipe = GRPO(group_size=4, ratio_clip=eps)
    batch = build_batch(trajs, recipe, renderer)
    with torch.no_grad():
        logp = packed_logprobs(tiny_model, batch.packed).logp_L
    shift = torch.linspace(-0.5, 0.5, logp.numel())  # some ratios inside, some outside [0.8, 1.2]
    batch.old_logp_L = logp - shift
    adv_B = GroupAdvantage().advantages_B(batch.reward_B, batch.group_of_traj_B).float()

    def ppo():
        lp = packed_logprobs(tiny_model, batch.packed).logp_L
        adv = adv_B[batch.traj_of_token_L]
        r = torch.exp(lp - batch.old_logp_L)
        return -torch.minimum(r * adv, r.clamp(1 - eps, 1 + eps) * adv).mean()

    model = tiny_model
    model.zero_grad()
    ours, metrics = objective_loss(model, batch, recipe)
    ours.backward()
    g1 = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ppo().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(g1[k], p.grad, atol=1e-5, rtol=1e-4, msg=k)
    assert 0 < metrics["ratio_clipped_frac"] < 1


def test_group_keys_keep_iterations_apart(tiny_model, renderer):
    """Aggregated data (D_1 u D_2) reuses group numbers: the engine numbers groups per collection.

    Group 0 of iteration 1 and group 0 of iteration 2 are different tasks; their baselines must not be
    pooled (the old key, ``meta['group']`` alone, pooled them: every advantage here would change).
    """
    spec = [(1, "t1", 1.0), (1, "t1", 0.0), (2, "t2", 0.0), (2, "t2", 0.0), (2, "t2", 1.0)]
    trajs = [
        make_trajectory(
            "ss", task_id=task, seed=i, reward=r, resolved=r == 1.0, meta={"group": 0, "iteration": it}
        )
        for i, (it, task, r) in enumerate(spec)
    ]
    keys = group_keys(trajs)
    assert keys[0] == keys[1] and keys[2] == keys[3] == keys[4] and keys[0] != keys[2]
    rewards = [r for _, _, r in spec]

    def advantage(i):
        members = [rewards[j] for j in range(len(spec)) if spec[j][0] == spec[i][0]]
        mean = sum(members) / len(members)
        return (rewards[i] - mean) / (torch.tensor(members).std().item() + 1e-6)

    advantages = [advantage(i) for i in range(len(spec))]
    selected = [
        (tr, t.index, t.action, lambda lp, a=advantages[i]: torch.full_like(lp, a))
        for i, tr in enumerate(trajs)
        for t in tr.turns
    ]
    recipe = GRPO(group_size=3)
    batch = build_batch(trajs, recipe, renderer)
    compare(
        tiny_model,
        lambda: objective_loss(tiny_model, batch, recipe),
        lambda: hand_loss(tiny_model, renderer, selected),
    )
