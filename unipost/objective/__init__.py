"""unipost.objective: the four parts of paper Eq. 14 as composable objects, and the named methods.

    grad L = E_{x ~ d_C} E_{y ~ d_L(.|x)} [ sg(w(x, y)) * grad(-log pi_theta(y | x)) ] + grad R

* rollout protocols (d_C): TeacherRollout, StudentRollout, TurnMixture, PrefixSwitch, OfflineData
* label sources (d_L): TeacherLabels, OwnSamples
* scores (w): Uniform, SuccessFilter, GroupAdvantage, TeacherLogRatio, Product (``a * b``)
* regularisers (R): KLToReference, EntropyBonus (``a + b``)
* schedules: Constant, LinearDecay, Cosine; prefix laws UniformPrefix, ShiftingPrefix, FixedPrefix
* Recipe and the named recipes SFT, GRPO, OPD, DAgger, AggreVaTe
* recipe_to_spec / recipe_from_spec: a recipe's composition as JSON (what a run's config.json records)
"""

from unipost.objective.labels import LabelError, LabelRef, LabelSource, OwnSamples, TeacherLabels
from unipost.objective.needs import Need, needs_of
from unipost.objective.recipe import (
    GRPO,
    NORMALIZATIONS,
    OPD,
    RECIPES,
    SFT,
    AggreVaTe,
    DAgger,
    Recipe,
    RecipeError,
    clipped_ratio,
    get_recipe,
)
from unipost.objective.regularizers import (
    EntropyBonus,
    KLToReference,
    Regularizer,
    RegularizerInputs,
    RegularizerSum,
)
from unipost.objective.rollouts import (
    EpisodePlan,
    OfflineData,
    PrefixSwitch,
    RolloutProtocol,
    StudentRollout,
    TeacherRollout,
    TurnMixture,
)
from unipost.objective.schedules import (
    Constant,
    Cosine,
    FixedPrefix,
    LinearDecay,
    PrefixSchedule,
    Schedule,
    ShiftingPrefix,
    UniformPrefix,
    as_prefix_schedule,
    as_schedule,
)
from unipost.objective.scores import (
    GroupAdvantage,
    Product,
    Score,
    ScoreInputs,
    SuccessFilter,
    TeacherLogRatio,
    TrajectoryFilter,
    Uniform,
    score_factors,
)
from unipost.objective.spec import recipe_from_spec, recipe_to_spec

__all__ = [
    "GRPO",
    "NORMALIZATIONS",
    "OPD",
    "RECIPES",
    "SFT",
    "AggreVaTe",
    "Constant",
    "Cosine",
    "DAgger",
    "EntropyBonus",
    "EpisodePlan",
    "FixedPrefix",
    "GroupAdvantage",
    "KLToReference",
    "LabelError",
    "LabelRef",
    "LabelSource",
    "LinearDecay",
    "Need",
    "OfflineData",
    "OwnSamples",
    "PrefixSchedule",
    "PrefixSwitch",
    "Product",
    "Recipe",
    "RecipeError",
    "Regularizer",
    "RegularizerInputs",
    "RegularizerSum",
    "RolloutProtocol",
    "Schedule",
    "Score",
    "ScoreInputs",
    "ShiftingPrefix",
    "StudentRollout",
    "SuccessFilter",
    "TeacherLabels",
    "TeacherLogRatio",
    "TeacherRollout",
    "TrajectoryFilter",
    "TurnMixture",
    "Uniform",
    "UniformPrefix",
    "as_prefix_schedule",
    "as_schedule",
    "clipped_ratio",
    "get_recipe",
    "needs_of",
    "recipe_from_spec",
    "recipe_to_spec",
    "score_factors",
]
