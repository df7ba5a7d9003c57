"""Schedules, rollout protocols, label sources and recipes of unipost.objective."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from unipost.data import Outcome, Trajectory, Turn
from unipost.objective import (
    GRPO,
    OPD,
    RECIPES,
    SFT,
    AggreVaTe,
    Constant,
    Cosine,
    DAgger,
    EntropyBonus,
    FixedPrefix,
    GroupAdvantage,
    KLToReference,
    LabelError,
    LinearDecay,
    Need,
    OfflineData,
    OwnSamples,
    PrefixSwitch,
    Recipe,
    RecipeError,
    ShiftingPrefix,
    StudentRollout,
    SuccessFilter,
    TeacherLabels,
    TeacherLogRatio,
    TeacherRollout,
    TurnMixture,
    Uniform,
    UniformPrefix,
    get_recipe,
)

Z_999 = 3.2905  # two-sided 99.9% normal quantile

# ---------------------------------------------------------------------------------------------------
# schedules


def test_linear_decay_paper_values():
    beta = LinearDecay(1.0, 0.1, 0.2)
    values = [beta(i) for i in range(11)]
    expected = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.2, 0.2]
    assert values == pytest.approx(expected, abs=1e-12)
    assert beta(1000) == 0.2


def test_constant_and_cosine():
    assert Constant(0.3)(7) == 0.3
    cos = Cosine(1.0, 0.2, iterations=4)
    assert [cos(i) for i in (0, 2, 4, 9)] == pytest.approx([1.0, 0.6, 0.2, 0.2])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LinearDecay(1.5, 0.1, 0.2), "LinearDecay.start must be a probability"),
        (lambda: LinearDecay(1.0, 0.1, -0.1), "LinearDecay.floor must be a probability"),
        (lambda: LinearDecay(0.2, 0.1, 0.5), "LinearDecay.floor must be <= start"),
        (lambda: LinearDecay(1.0, -0.1, 0.2), "LinearDecay.step must be a finite non-negative"),
        (lambda: Constant(2.0), "Constant.value must be a probability"),
        (lambda: Cosine(1.0, 0.0, iterations=0), "Cosine.iterations must be a positive integer"),
        (lambda: UniformPrefix(5, 2), "UniformPrefix.low must be <= high"),
        (lambda: UniformPrefix(-1, 2), "UniformPrefix.low must be a non-negative integer"),
        (lambda: ShiftingPrefix(0, 4, -1.0), "ShiftingPrefix.shift_per_iter must be a finite non-negative"),
        (lambda: ShiftingPrefix(3, 1), "ShiftingPrefix.low must be <= high"),
        (lambda: FixedPrefix(-2), "FixedPrefix.k must be a non-negative integer"),
        (lambda: TurnMixture(1.2), "TurnMixture.beta"),
        (lambda: TurnMixture("high"), "TurnMixture.beta must be a float"),
        (lambda: PrefixSwitch(2.5), "PrefixSwitch.k must be a non-negative int"),
        (lambda: StudentRollout(group_size=0), "StudentRollout.group_size must be a positive integer"),
        (lambda: LinearDecay()(-1), "iteration must be a non-negative integer"),
    ],
)
def test_invalid_schedules_name_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_prefix_laws_probabilities_and_shifting_mean():
    uniform = UniformPrefix(2, 6)
    assert uniform.probs(0) == pytest.approx(np.full(5, 0.2))
    assert list(uniform.support()) == [2, 3, 4, 5, 6]

    law = ShiftingPrefix(1, 10, shift_per_iter=0.5)
    means = [law.mean(i) for i in range(12)]
    for i in range(12):
        p = law.probs(i)
        assert p.shape == (10,) and (p >= 0).all() and p.sum() == pytest.approx(1.0, abs=1e-12)
    assert law.probs(0) == pytest.approx(np.full(10, 0.1))  # tilt 0: uniform
    assert means[0] == pytest.approx(5.5)
    assert all(b > a + 1e-3 for a, b in itertools.pairwise(means))  # strictly increasing
    # the stated law: P_i(k) proportional to exp(tau_i (k - low) / (high - low)), tau_i = 0.5 i
    tau, ks = 0.5 * 7, np.arange(1, 11)
    ref = np.exp(tau * (ks - 1) / 9)
    assert law.probs(7) == pytest.approx(ref / ref.sum(), abs=1e-12)
    assert law.probs(10_000)[-1] == pytest.approx(1.0)  # large tilts: stable, all mass on `high`
    teacher_heavy = ShiftingPrefix(0, 8, 1.0, initial_tilt=-4.0)
    assert teacher_heavy.mean(0) < 4.0 < teacher_heavy.mean(8)


def test_prefix_law_sampling_matches_probs():
    law, rng = ShiftingPrefix(0, 5, 1.0), np.random.default_rng(0)
    n = 20_000
    draws = np.array([law(3, rng) for _ in range(n)])
    freq = np.bincount(draws, minlength=6) / n
    p = law.probs(3)
    assert np.all(np.abs(freq - p) <= Z_999 * np.sqrt(p * (1 - p) / n) + 1e-12)


# ---------------------------------------------------------------------------------------------------
# rollout protocols


def test_turn_mixture_teacher_fraction_matches_beta():
    proto = TurnMixture(LinearDecay(1.0, 0.1, 0.2))
    rng = np.random.default_rng(123)
    for iteration in (3, 8):
        beta = proto.beta(iteration)
        plans = [proto.plan(iteration, rng) for _ in range(200)]
        z = np.array([[e == "teacher" for e in plan.executors(50)] for plan in plans])
        n = z.size
        half_width = Z_999 * math.sqrt(beta * (1 - beta) / n)
        assert abs(z.mean() - beta) <= half_width, (iteration, z.mean(), beta)
        assert all(plan.meta["beta"] == beta and plan.meta["iteration"] == iteration for plan in plans)
    # independence across turns: the teacher fraction is the same early and late in the episode
    late = np.array([[p.executor(t) == "teacher" for t in range(40, 50)] for p in plans]).mean()
    assert abs(late - 0.2) <= Z_999 * math.sqrt(0.2 * 0.8 / 2000)


def test_turn_mixture_plans_are_reproducible_and_order_independent():
    proto = TurnMixture(0.5)
    a = proto.plan(0, np.random.default_rng(7))
    b = proto.plan(0, np.random.default_rng(7))
    forward = a.executors(30)
    backward = [b.executor(t) for t in reversed(range(30))][::-1]  # lazily drawn, asked in reverse order
    assert forward == backward
    assert a.executor(12) == forward[12]  # asking twice gives the same answer
    other = proto.plan(0, np.random.default_rng(8)).executors(30)
    assert other != forward
    assert set(forward) == {"teacher", "student"}
    assert TurnMixture(1.0).plan(0, np.random.default_rng(0)).executors(20) == ["teacher"] * 20
    assert TurnMixture(0.0).plan(0, np.random.default_rng(0)).executors(20) == ["student"] * 20


def test_prefix_switch_switches_exactly_at_k():
    plan = PrefixSwitch(3).plan(0, np.random.default_rng(0))
    assert plan.executors(6) == ["student"] * 3 + ["teacher"] * 3
    assert plan.meta["prefix_k"] == 3
    assert PrefixSwitch(0).plan(0, np.random.default_rng(0)).executors(3) == ["teacher"] * 3

    proto = PrefixSwitch(UniformPrefix(1, 8))
    seen = set()
    for seed in range(50):
        plan = proto.plan(4, np.random.default_rng(seed))
        k = plan.meta["prefix_k"]
        seen.add(k)
        ex = plan.executors(12)
        assert ex == ["student"] * k + ["teacher"] * (12 - k)
        assert proto.plan(4, np.random.default_rng(seed)).meta["prefix_k"] == k  # reproducible
    assert seen == set(range(1, 9))


def test_teacher_student_and_offline_protocols(tmp_path):
    rng = np.random.default_rng(0)
    assert TeacherRollout().plan(0, rng).executors(4) == ["teacher"] * 4
    assert StudentRollout(group_size=4).plan(2, rng).executors(4) == ["student"] * 4
    assert TeacherRollout().uses_teacher and not TeacherRollout().uses_student
    assert StudentRollout().uses_student and not StudentRollout().uses_teacher
    assert TurnMixture(0.5).needs == frozenset()  # executing teacher turns is uses_teacher, not a Need
    with pytest.raises(ValueError, match="turn index t must be a non-negative integer"):
        TeacherRollout().plan(0, rng).executor(-1)
    with pytest.raises(ValueError, match=r"numpy\.random\.Generator"):
        StudentRollout().plan(0, 42)

    path = tmp_path / "trajs.jsonl"
    trajs = [_mixture_trajectory(), _mixture_trajectory(submitted=False)]
    path.write_text("\n".join(t.model_dump_json() for t in trajs) + "\n\n")
    data = OfflineData(path)
    assert list(data.trajectories()) == trajs
    with pytest.raises(RuntimeError, match="collects no rollouts"):
        data.plan(0, rng)
    with pytest.raises(FileNotFoundError, match="no trajectory file"):
        list(OfflineData(tmp_path / "missing.jsonl").trajectories())


# ---------------------------------------------------------------------------------------------------
# label sources


def _msg(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _mixture_trajectory(*, submitted: bool = True, label_at_student: bool = True) -> Trajectory:
    """Turns: teacher, student (label differs), student (label equals action), teacher."""
    obs = [{"role": "tool", "content": "ok", "tool_call_id": "x"}]
    turns = [
        Turn(index=0, executor="teacher", action=_msg("t0"), observation=obs),
        Turn(
            index=1,
            executor="student",
            action=_msg("s1"),
            label=_msg("T1") if label_at_student else None,
            action_token_ids=[5, 6],
            action_logprobs=[-0.1, -0.2],
        ),
        Turn(index=2, executor="student", action=_msg("same"), label=_msg("same"), action_token_ids=[7]),
        Turn(index=3, executor="teacher", action=_msg("t3")),
    ]
    return Trajectory(
        task_id="task-1",
        prompt=[{"role": "user", "content": "fix it"}],
        turns=turns,
        outcome=Outcome(submitted=submitted, resolved=submitted),
    )


def test_teacher_labels_cover_every_visited_state():
    refs = TeacherLabels().select(_mixture_trajectory())
    assert [(r.turn, r.message["content"], r.is_executed) for r in refs] == [
        (0, "t0", True),
        (1, "T1", False),  # a branch off s_1
        (2, "same", True),  # the student happened to act like the teacher: no branch needed
        (3, "t3", True),
    ]
    with pytest.raises(LabelError, match="turn 1: executed by the student but has no teacher label"):
        TeacherLabels().select(_mixture_trajectory(label_at_student=False))
    skipped = TeacherLabels(on_missing="skip").select(_mixture_trajectory(label_at_student=False))
    assert [r.turn for r in skipped] == [0, 2, 3]


def test_own_samples_are_the_executed_actions():
    traj = _mixture_trajectory()
    refs = OwnSamples().select(traj)
    assert [(r.turn, r.message["content"], r.is_executed, r.token_ids) for r in refs] == [
        (1, "s1", True, (5, 6)),
        (2, "same", True, (7,)),
    ]
    assert [r.turn for r in OwnSamples("teacher").select(traj)] == [0, 3]
    assert [r.turn for r in OwnSamples("any").select(traj)] == [0, 1, 2, 3]
    assert OwnSamples().needs == {Need.STUDENT_LOGPROBS} and OwnSamples("teacher").needs == frozenset()
    with pytest.raises(ValueError, match=r"OwnSamples\.executor must be"):
        OwnSamples("expert")


# ---------------------------------------------------------------------------------------------------
# recipes


def test_named_recipes_construct_with_the_papers_parts():
    sft, grpo, opd, dagger, aggrevate = SFT(), GRPO(), OPD(), DAgger(), AggreVaTe()
    assert isinstance(sft.rollout, TeacherRollout) and isinstance(sft.score, SuccessFilter)
    assert isinstance(SFT(rejection_sampling=False).score, Uniform)
    assert isinstance(SFT(data="teacher.jsonl").rollout, OfflineData)
    assert grpo.group_size == 8 and isinstance(grpo.score, GroupAdvantage) and grpo.regularizer is None
    assert isinstance(GRPO(4, kl_coef=0.05).regularizer, KLToReference)
    assert isinstance(opd.score, TeacherLogRatio) and opd.filter_unsubmitted
    assert isinstance(dagger.rollout, TurnMixture) and dagger.filter_unsubmitted
    assert dagger.rollout.beta(0) == 1.0 and dagger.rollout.beta(20) == 0.2
    assert isinstance(aggrevate.rollout, PrefixSwitch) and isinstance(aggrevate.labels, TeacherLabels)
    assert grpo.needs == {Need.REWARDS, Need.GROUPS, Need.STUDENT_LOGPROBS}
    assert opd.needs == {Need.TEACHER_LOGPROBS, Need.STUDENT_LOGPROBS}
    assert dagger.needs == {Need.TEACHER_ACTIONS}
    assert set(RECIPES) == {"sft", "grpo", "opd", "dagger", "aggrevate"}
    assert get_recipe("DAgger", beta=0.3).rollout.beta(5) == 0.3
    with pytest.raises(RecipeError, match="unknown recipe 'ppo'"):
        get_recipe("ppo")
    assert DAgger() == DAgger() and hash(DAgger()) == hash(DAgger())  # plain, comparable config


def test_user_composition_mixture_opd_just_works():
    recipe = Recipe(
        TurnMixture(0.5), OwnSamples(), TeacherLogRatio(), KLToReference(0.01) + EntropyBonus(0.001)
    )
    # no TEACHER_ACTIONS: the teacher executes some turns but is never asked for labels at student turns
    assert recipe.needs == {
        Need.STUDENT_LOGPROBS,
        Need.TEACHER_LOGPROBS,
        Need.REFERENCE_LOGPROBS,
        Need.ENTROPY,
    }
    line = recipe.describe()
    assert "\n" not in line
    for part in ("TurnMixture", "OwnSamples", "TeacherLogRatio", "KLToReference", "EntropyBonus"):
        assert part in line
    assert DAgger().describe().startswith("DAgger: context TurnMixture(beta=LinearDecay(")
    Recipe(StudentRollout(group_size=4), OwnSamples(), SuccessFilter() * GroupAdvantage())


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: Recipe(TeacherRollout(), OwnSamples(), Uniform()),
            r"OwnSamples\(\) imitates the student's own executed actions, but TeacherRollout.* never lets "
            "the student act: nothing to label",
        ),
        (
            lambda: Recipe(StudentRollout(), OwnSamples("teacher")),
            "never lets the teacher act",
        ),
        (
            lambda: Recipe(TurnMixture(0.5), TeacherLabels(), TeacherLogRatio()),
            r"TeacherLogRatio is a score-function .* needs labels sampled from the student itself",
        ),
        (
            lambda: Recipe(StudentRollout(group_size=8), TeacherLabels(), GroupAdvantage()),
            "GroupAdvantage is a score-function",
        ),
        (
            lambda: Recipe(StudentRollout(group_size=8), OwnSamples("any"), GroupAdvantage()),
            "GroupAdvantage is a score-function",
        ),
        (
            lambda: Recipe(StudentRollout(), OwnSamples(), GroupAdvantage()),
            "GroupAdvantage normalises rewards within groups .* group_size=1",
        ),
        (
            lambda: Recipe(StudentRollout(), OwnSamples(), SuccessFilter() * GroupAdvantage()),
            "group_size=1",
        ),
        (
            lambda: Recipe(OfflineData("s.jsonl", teacher_actions=False), TeacherLabels()),
            r"TeacherLabels needs the teacher's action at every stored state, but OfflineData.* has no",
        ),
        (
            lambda: Recipe(OfflineData("s.jsonl"), OwnSamples(), TeacherLogRatio()),
            "replays stored actions",
        ),
        (lambda: Recipe(TurnMixture, TeacherLabels()), r"got the class TurnMixture; pass an instance"),
        (lambda: Recipe(TurnMixture(0.5), "teacher"), "Recipe.labels must be one of"),
        (lambda: Recipe(TurnMixture(0.5), TeacherLabels(), 1.0), "Recipe.score must be one of"),
        (
            lambda: Recipe(TurnMixture(0.5), TeacherLabels(), normalization="mean"),
            "Recipe.normalization must be one of token_mean",
        ),
    ],
)
def test_invalid_compositions_fail_at_construction(build, message):
    with pytest.raises(RecipeError, match=message):
        build()


def test_offline_own_samples_with_uniform_score_is_allowed():
    recipe = Recipe(OfflineData("students.jsonl", teacher_actions=False), OwnSamples("any"))
    assert not recipe.needs_teacher
    recipe.check_teacher(None)


def test_check_teacher():
    message = (
        "OPD's TeacherLogRatio needs teacher log-probs; an OpenAI-compatible teacher only returns actions "
        "— use DAgger/AggreVaTe/SFT or a white-box teacher"
    )
    with pytest.raises(RecipeError, match=message):
        OPD().check_teacher(white_box=False)
    with pytest.raises(RecipeError, match="OPD's TeacherLogRatio needs teacher log-probs"):
        Recipe(TurnMixture(0.5), OwnSamples(), SuccessFilter() * TeacherLogRatio()).check_teacher(False)
    OPD().check_teacher(white_box=True)
    for recipe in (DAgger(), AggreVaTe(), SFT()):
        recipe.check_teacher(white_box=False)  # actions are enough
        with pytest.raises(RecipeError, match="needs a teacher"):
            recipe.check_teacher(None)
    GRPO().check_teacher(None)  # no teacher involved
    SFT(data="teacher.jsonl").check_teacher(None)  # the teacher's actions are already stored


def test_keep_and_select_labels_apply_the_submission_filter():
    submitted, unsubmitted = _mixture_trajectory(), _mixture_trajectory(submitted=False)
    dagger = DAgger()
    assert dagger.keep(submitted) and not dagger.keep(unsubmitted)
    assert len(dagger.select_labels(submitted)) == 4 and dagger.select_labels(unsubmitted) == []
    no_filter = DAgger(filter_unsubmitted=False)
    assert no_filter.keep(unsubmitted) and len(no_filter.select_labels(unsubmitted)) == 4


def test_normalizations_match_the_kernel_loss():
    from typing import get_args

    from unipost.kernels.loss import Normalization
    from unipost.objective import NORMALIZATIONS

    assert set(NORMALIZATIONS) == set(get_args(Normalization))
