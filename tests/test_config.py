"""A run's saved config reproduces the run: a custom recipe is recorded part by part, never as a named one."""

from __future__ import annotations

import dataclasses
import json

import pytest

import unipost.objective as objective
from unipost.objective import (
    AggreVaTe,
    DAgger,
    GroupAdvantage,
    KLToReference,
    OwnSamples,
    PrefixSwitch,
    Recipe,
    RecipeError,
    ShiftingPrefix,
    StudentRollout,
    SuccessFilter,
    TeacherLabels,
    TeacherLogRatio,
    TurnMixture,
    Uniform,
    recipe_from_spec,
)
from unipost.objective.spec import PARTS
from unipost.train.config import ConfigError, TrainConfig

MIXTURE_OPD = Recipe(TurnMixture(0.5), OwnSamples(), TeacherLogRatio(), name="mixture-OPD")


def saved_and_loaded(config: TrainConfig) -> TrainConfig:
    """What a run writes to config.json, read back as ``unipost train/eval`` read it."""
    return TrainConfig.model_validate_json(config.to_json())


def test_a_custom_recipe_round_trips_through_the_saved_config():
    config = TrainConfig(recipe="dagger").with_recipe(MIXTURE_OPD)
    assert config.recipe == "custom" and config.recipe_kwargs == {}  # not "dagger"
    saved = json.loads(config.to_json())
    assert saved["recipe_spec"]["score"] == {"part": "TeacherLogRatio", "clip": None}
    assert saved["recipe_spec"]["rollout"]["beta"] == {"part": "Constant", "value": 0.5}
    assert saved_and_loaded(config).build_recipe() == MIXTURE_OPD


@pytest.mark.parametrize(
    "recipe",
    [
        DAgger(beta=0.3),  # a named recipe's class with other arguments is still not TrainConfig's "dagger"
        Recipe(
            StudentRollout(group_size=4),
            OwnSamples(),
            GroupAdvantage(normalize_std=False) * SuccessFilter(),
            KLToReference(0.1),
            normalization="sequence_mean",
            ratio_clip=0.2,
        ),
        Recipe(PrefixSwitch(ShiftingPrefix(2, 9, 0.25, -1.0)), TeacherLabels(on_missing="skip"), Uniform()),
    ],
    ids=["dagger-other-beta", "grpo-composed", "aggrevate-law"],
)
def test_every_composition_of_the_library_parts_round_trips(recipe):
    assert saved_and_loaded(TrainConfig().with_recipe(recipe)).build_recipe() == recipe


def test_a_recipe_equal_to_the_configs_named_one_keeps_the_name():
    config = TrainConfig(recipe="aggrevate")
    assert config.with_recipe(AggreVaTe()) is config
    assert TrainConfig(recipe="dagger").with_recipe(AggreVaTe()).recipe == "custom"


@dataclasses.dataclass(frozen=True)
class HalfUniform(Uniform):
    """A user's own score, defined in an importable module (this one)."""

    factor: float = 0.5


def test_a_users_importable_dataclass_part_is_recorded_by_module_and_rebuilt():
    recipe = Recipe(TurnMixture(0.5), TeacherLabels(), HalfUniform(0.25))
    spec = recipe.to_spec()
    assert spec["score"] == {"part": f"{__name__}:HalfUniform", "factor": 0.25}
    assert saved_and_loaded(TrainConfig().with_recipe(recipe)).build_recipe() == recipe


def test_a_part_that_cannot_be_saved_is_recorded_honestly_and_rebuilding_refuses():
    recipe = Recipe(TurnMixture(lambda i: 0.5), TeacherLabels(), Uniform(), name="lambda-beta")
    config = saved_and_loaded(TrainConfig().with_recipe(recipe))  # still a valid record of the run
    assert config.recipe == "custom" and "lambda" in config.recipe_spec["rollout"]["beta"]["repr"]
    with pytest.raises(ConfigError, match=r"recipe\.rollout\.beta = <function .*pass it"):
        config.build_recipe()
    with pytest.raises(RecipeError, match="cannot be rebuilt"):
        recipe_from_spec(config.recipe_spec)
    # the Trainer given the object again (e.g. an experiment's recipe()) records it the same way
    assert TrainConfig().with_recipe(recipe).with_recipe(recipe).recipe == "custom"


def test_custom_and_spec_go_together_and_a_bad_spec_names_the_part():
    with pytest.raises(ValueError, match="recipe_spec"):
        TrainConfig(recipe="custom")
    with pytest.raises(ValueError, match="recipe_spec"):
        TrainConfig(recipe="dagger", recipe_spec=MIXTURE_OPD.to_spec())
    spec = {**MIXTURE_OPD.to_spec(), "score": {"part": "TeacherLogRatios"}}
    meant = r"recipe\.score: unknown part 'TeacherLogRatios'; did you mean 'TeacherLogRatio'"
    with pytest.raises(ValueError, match=meant):
        TrainConfig(recipe="custom", recipe_spec=spec)
    spec = {**MIXTURE_OPD.to_spec(), "labels": {"part": "TeacherLabels"}}  # TeacherLogRatio needs own samples
    with pytest.raises(ValueError, match="OwnSamples"):
        TrainConfig(recipe="custom", recipe_spec=spec)


def test_every_part_unipost_objective_exports_is_saved_by_name():
    exported = {
        name: obj
        for name in objective.__all__
        if isinstance(obj := getattr(objective, name), type) and dataclasses.is_dataclass(obj)
    }
    not_parts = {"Recipe", "EpisodePlan", "LabelRef", "ScoreInputs", "RegularizerInputs"}  # data, not parts
    parts = {n: c for n, c in exported.items() if n not in not_parts}
    assert parts == {n: PARTS[n] for n in parts} and set(parts) == set(PARTS)


def test_training_from_a_config_whose_recipe_only_code_can_rebuild_is_a_one_line_error(tmp_path, capsys):
    from unipost.cli import app

    recipe = Recipe(TurnMixture(lambda i: 0.5), TeacherLabels(), Uniform())
    path = tmp_path / "config.json"
    path.write_text(TrainConfig(output_dir=str(tmp_path)).with_recipe(recipe).to_json())
    with pytest.raises(SystemExit) as exit_:
        app(["train", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 2, err
    assert err[0].startswith("error: recipe='custom': this recipe was recorded but cannot be rebuilt")
    assert "recipe.rollout.beta = <function" in err[0] and "recipe()" in err[0]
