"""Scores and regularisers against their definitions, and OPD's weight against the reverse-KL gradient.

The OPD tests enumerate every action sequence of a tiny policy exactly (no sampling), so the expected
gradient E_y[sg(w) grad(-log pi(y))] is computed to float64 precision and compared at atol 1e-6.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from unipost.objective import (
    OPD,
    EntropyBonus,
    GroupAdvantage,
    KLToReference,
    Need,
    OwnSamples,
    Product,
    Recipe,
    RegularizerInputs,
    ScoreInputs,
    StudentRollout,
    SuccessFilter,
    TeacherLogRatio,
    Uniform,
)

F64 = torch.float64
ATOL = 1e-6


def _inputs(logp_L, label_seq_L, traj_of_seq_S, reward_B, **kw) -> ScoreInputs:
    B = len(reward_B)
    return ScoreInputs(
        logp_L=torch.as_tensor(logp_L),
        label_seq_L=torch.as_tensor(label_seq_L, dtype=torch.int64),
        traj_of_seq_S=torch.as_tensor(traj_of_seq_S, dtype=torch.int64),
        reward_B=torch.as_tensor(reward_B, dtype=torch.float32),
        resolved_B=kw.pop("resolved_B", torch.zeros(B, dtype=torch.bool)),
        submitted_B=kw.pop("submitted_B", torch.ones(B, dtype=torch.bool)),
        **kw,
    )


def _grad(scalar: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, params, retain_graph=True)])


# ---------------------------------------------------------------------------------------------------
# OPD: the per-token teacher log-ratio weight gives the reverse-KL gradient, by exact enumeration


def test_opd_weight_one_step_equals_reverse_kl_gradient():
    """One step, V = 5: sum_y pi(y) sg(w(y)) grad(-log pi(y)) == grad KL(pi || pi_T)."""
    gen = torch.Generator().manual_seed(0)
    V = 5
    theta = torch.randn(V, generator=gen, dtype=F64, requires_grad=True)
    log_pt = torch.log_softmax(torch.randn(V, generator=gen, dtype=F64), -1)
    log_pi = torch.log_softmax(theta, -1)

    # every action y is one "trajectory" with one label of one token
    ctx = _inputs(log_pi, range(V), range(V), torch.zeros(V), teacher_logp_L=log_pt)
    w = TeacherLogRatio()(ctx)
    assert not w.requires_grad and w.dtype == F64
    surrogate = (log_pi.exp().detach() * w * -log_pi).sum()

    kl = (log_pi.exp() * (log_pi - log_pt)).sum()
    g_kl = _grad(kl, [theta])
    torch.testing.assert_close(_grad(surrogate, [theta]), g_kl, atol=ATOL, rtol=0)
    assert g_kl.abs().max() > 1e-2  # a non-trivial gradient is being compared


def _two_step(theta1, theta2):
    """2-token autoregressive policy: pi(y1) = softmax(theta1), pi(y2 | y1) = softmax(theta2[y1])."""
    return torch.log_softmax(theta1, -1), torch.log_softmax(theta2, -1)  # [V], [V, V]


def test_opd_weight_two_step_equals_per_token_reverse_kl_gradient():
    """Two steps, V = 3, through the real Recipe: E_y[sum_j sg(w_j) grad(-log pi(y_j|y<j))] equals
    sum_j E_{y<j}[grad KL(pi(.|y<j) || pi_T(.|y<j))] with the prefix probability held fixed (stop-grad),
    which is what OPD optimises. It is NOT the gradient of the sequence-level KL (checked too)."""
    gen = torch.Generator().manual_seed(1)
    V = 3
    theta1 = torch.randn(V, generator=gen, dtype=F64, requires_grad=True)
    theta2 = torch.randn(V, V, generator=gen, dtype=F64, requires_grad=True)
    lp1, lp2 = _two_step(theta1, theta2)
    lt1, lt2 = _two_step(
        torch.randn(V, generator=gen, dtype=F64), torch.randn(V, V, generator=gen, dtype=F64)
    )

    seqs = list(itertools.product(range(V), repeat=2))  # all V^2 action sequences = trajectories
    logp_L = torch.stack([t for a, b in seqs for t in (lp1[a], lp2[a, b])])
    teacher_L = torch.stack([t for a, b in seqs for t in (lt1[a], lt2[a, b])])
    label_seq_L = torch.arange(len(seqs)).repeat_interleave(2)
    prob_S = torch.stack([(lp1[a] + lp2[a, b]).exp() for a, b in seqs]).detach()  # pi(y), sampling dist.

    recipe = Recipe(StudentRollout(), OwnSamples(), TeacherLogRatio())
    ctx = _inputs(logp_L, label_seq_L, range(len(seqs)), torch.zeros(len(seqs)), teacher_logp_L=teacher_L)
    w_L = recipe.loss_weights(ctx)
    surrogate = (prob_S[label_seq_L] * w_L * -logp_L).sum()
    g_opd = _grad(surrogate, [theta1, theta2])

    def kl(lp, lt):
        return (lp.exp() * (lp - lt)).sum(-1)

    per_token_kl = kl(lp1, lt1) + (lp1.exp().detach() * kl(lp2, lt2)).sum()
    torch.testing.assert_close(g_opd, _grad(per_token_kl, [theta1, theta2]), atol=ATOL, rtol=0)

    joint_lp = (lp1[:, None] + lp2).reshape(-1)
    joint_lt = (lt1[:, None] + lt2).reshape(-1)
    g_seq = _grad(kl(joint_lp, joint_lt), [theta1, theta2])
    assert (g_opd - g_seq).abs().max() > 1e-3  # the stop-grad on the prefix matters


def test_opd_weight_clip_and_missing_teacher():
    ctx = _inputs([-1.0, -2.0, -0.5], [0, 0, 0], [0], [0.0], teacher_logp_L=torch.tensor([-4.0, -1.0, -0.6]))
    torch.testing.assert_close(TeacherLogRatio()(ctx), torch.tensor([-3.0, 1.0, -0.1]))
    torch.testing.assert_close(TeacherLogRatio(clip=0.5)(ctx), torch.tensor([-0.5, 0.5, -0.1]))
    with pytest.raises(ValueError, match="teacher_logp_L"):
        TeacherLogRatio()(_inputs([-1.0], [0], [0], [0.0]))
    with pytest.raises(ValueError, match="clip"):
        TeacherLogRatio(clip=0)


# ---------------------------------------------------------------------------------------------------
# GroupAdvantage, SuccessFilter, Uniform, Product


def _grpo_batch(rewards, groups):
    """One label of two tokens per trajectory."""
    B = len(rewards)
    return _inputs(
        torch.full((2 * B,), -1.0),
        torch.arange(B).repeat_interleave(2),
        range(B),
        rewards,
        group_of_traj_B=torch.tensor(groups, dtype=torch.int64),
    )


def test_group_advantage_matches_hand_computed_values():
    # group 7: rewards 1, 0, 0, 1 -> mean 0.5, sample std sqrt(1/3); group 3: 2, 0 -> mean 1, std sqrt(2)
    # group 11: 5, 5 (all equal) -> 0; group 4: one member -> 0
    rewards = [1.0, 0.0, 2.0, 0.0, 1.0, 5.0, 5.0, 3.0, 0.0]
    groups = [7, 7, 3, 7, 7, 11, 11, 4, 3]
    eps = 1e-6
    s7, s3 = (1 / 3) ** 0.5, 2**0.5
    a7, a3 = 0.5 / (s7 + eps), 1 / (s3 + eps)
    expected_B = torch.tensor([a7, -a7, a3, -a7, a7, 0, 0, 0, -a3])
    w = GroupAdvantage(eps=eps)(_grpo_batch(rewards, groups))
    assert w.dtype == torch.float32 and not w.requires_grad
    torch.testing.assert_close(w, expected_B.repeat_interleave(2), atol=1e-6, rtol=1e-6)

    unscaled = GroupAdvantage(normalize_std=False)(_grpo_batch(rewards, groups))
    expected_unscaled = torch.tensor([0.5, -0.5, 1, -0.5, 0.5, 0, 0, 0, -1.0]).repeat_interleave(2)
    torch.testing.assert_close(unscaled, expected_unscaled)


def test_group_advantage_degenerate_groups_are_exactly_zero():
    ctx = _grpo_batch([0.0] * 4, [0, 0, 0, 1])
    # float64 rewards whose group mean is not exactly 0.1: 0.1 - mean is ~1e-17, not 0
    ctx = dataclasses.replace(ctx, reward_B=torch.tensor([0.1, 0.1, 0.1, 0.7], dtype=F64))
    assert ctx.reward_B[:3].mean() != 0.1
    for score in (GroupAdvantage(), GroupAdvantage(normalize_std=False)):
        assert torch.equal(score(ctx), torch.zeros(8))


def test_group_advantage_needs_groups():
    with pytest.raises(ValueError, match="group_of_traj_B"):
        GroupAdvantage()(_inputs([-1.0], [0], [0], [1.0]))
    assert GroupAdvantage.needs == {Need.REWARDS, Need.GROUPS}


def test_success_filter_uniform_and_product():
    # 3 trajectories, 4 labels: traj 0 resolved, traj 1 not, traj 2 resolved; label 3 belongs to traj 0
    ctx = _inputs(
        torch.tensor([-1.0, -1.0, -2.0, -3.0, -0.5, -0.1], requires_grad=True),
        [0, 0, 1, 2, 3, 3],
        [0, 1, 2, 0],
        [1.0, 0.0, 1.0],
        resolved_B=torch.tensor([True, False, True]),
        teacher_logp_L=torch.tensor([-2.0, -1.0, -2.0, -1.0, -0.5, -0.6]),
    )
    torch.testing.assert_close(SuccessFilter()(ctx), torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(Uniform()(ctx), torch.ones(6))
    prod = SuccessFilter() * TeacherLogRatio()
    assert isinstance(prod, Product)
    assert prod.needs == {Need.REWARDS, Need.TEACHER_LOGPROBS}
    assert prod.requires_own_samples
    torch.testing.assert_close(prod(ctx), torch.tensor([-1.0, 0.0, 0.0, 2.0, 0.0, -0.5]))
    for score in (SuccessFilter(), Uniform(), prod):
        w = score(ctx)
        assert w.dtype == torch.float32 and not w.requires_grad
    assert repr(prod) == "SuccessFilter() * TeacherLogRatio(clip=None)"
    with pytest.raises(ValueError, match="instance"):
        Product(Uniform, SuccessFilter())


def test_score_inputs_validation_names_the_field():
    good = dict(
        logp_L=torch.zeros(3),
        label_seq_L=torch.tensor([0, 0, 1]),
        traj_of_seq_S=torch.tensor([0, 1]),
        reward_B=torch.zeros(2),
        resolved_B=torch.zeros(2, dtype=torch.bool),
        submitted_B=torch.ones(2, dtype=torch.bool),
    )
    ScoreInputs(**good)
    cases = {
        "label_seq_L": (torch.tensor([0, 0]), "length 2, expected 3"),
        "traj_of_seq_S": (torch.tensor([0.0, 1.0]), "int64"),
        "resolved_B": (torch.zeros(3, dtype=torch.bool), "resolved_B has length 3"),
        "logp_L": (torch.zeros(1, 3), "1-D"),
    }
    for field_name, (value, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            ScoreInputs(**{**good, field_name: value})
    with pytest.raises(ValueError, match=r"label_seq_L must index labels in \[0, 2\)"):
        ScoreInputs(**{**good, "label_seq_L": torch.tensor([0, 1, 2])})
    with pytest.raises(ValueError, match=r"traj_of_seq_S must index trajectories in \[0, 2\)"):
        ScoreInputs(**{**good, "traj_of_seq_S": torch.tensor([0, 2])})


def test_recipe_loss_weights_drop_unsubmitted():
    ctx = _inputs(
        [-1.0, -1.0, -1.0],
        [0, 1, 1],
        [0, 1],
        [0.0, 0.0],
        submitted_B=torch.tensor([True, False]),
        teacher_logp_L=torch.tensor([0.0, 0.0, -1.0]),
    )
    torch.testing.assert_close(OPD().loss_weights(ctx), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(OPD(filter_unsubmitted=False).loss_weights(ctx), torch.tensor([1.0, 1.0, 0.0]))


# ---------------------------------------------------------------------------------------------------
# Regularisers


def test_kl_to_reference_k3_value_and_gradient_by_enumeration():
    """k3's expectation under pi is KL(pi || ref) and its expected gradient is grad KL(ref || pi)."""
    gen = torch.Generator().manual_seed(2)
    V = 4
    theta = torch.randn(V, generator=gen, dtype=F64, requires_grad=True)
    log_ref = torch.log_softmax(torch.randn(V, generator=gen, dtype=F64), -1)
    log_pi = torch.log_softmax(theta, -1)
    p = log_pi.exp()

    k3_L = KLToReference(1.0).per_token(RegularizerInputs(log_pi, ref_logp_L=log_ref))
    assert (k3_L >= 0).all()
    expected_value = (p.detach() * k3_L).sum()
    torch.testing.assert_close(expected_value, (p * (log_pi - log_ref)).sum(), atol=ATOL, rtol=0)
    forward_kl = (log_ref.exp() * (log_ref - log_pi)).sum()
    torch.testing.assert_close(_grad(expected_value, [theta]), _grad(forward_kl, [theta]), atol=ATOL, rtol=0)

    # the loss term is coef * mean over (masked) tokens
    mask = torch.tensor([True, False, True, True])
    reg = KLToReference(0.1)(RegularizerInputs(log_pi, ref_logp_L=log_ref, mask_L=mask))
    torch.testing.assert_close(reg, 0.1 * k3_L[mask].mean(), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="ref_logp_L"):
        KLToReference(0.1)(RegularizerInputs(log_pi))


def test_entropy_bonus_and_sum():
    ent = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    inputs = RegularizerInputs(torch.zeros(3), ref_logp_L=torch.zeros(3), entropy_L=ent)
    bonus = EntropyBonus(0.5)(inputs)
    torch.testing.assert_close(bonus, torch.tensor(-1.0))
    bonus.backward()
    torch.testing.assert_close(ent.grad, torch.full((3,), -0.5 / 3))
    both = KLToReference(0.1) + EntropyBonus(0.5)
    assert both.needs == {Need.REFERENCE_LOGPROBS, Need.ENTROPY}
    torch.testing.assert_close(both(inputs), torch.tensor(-1.0))  # k3 = 0 when pi == ref
    with pytest.raises(ValueError, match="coef"):
        EntropyBonus(-1.0)
    with pytest.raises(ValueError, match="entropy_L must have shape"):
        RegularizerInputs(torch.zeros(3), entropy_L=torch.zeros(2))
