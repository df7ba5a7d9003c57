"""A recipe as JSON: its composition, part by part, so a run's saved config rebuilds the recipe it ran.

    recipe_to_spec(Recipe(TurnMixture(0.5), OwnSamples(), TeacherLogRatio(), name="mixture-OPD"))
    == {"rollout": {"part": "TurnMixture", "beta": {"part": "Constant", "value": 0.5}, "group_size": 1},
        "labels": {"part": "OwnSamples", "executor": "student"},
        "score": {"part": "TeacherLogRatio", "clip": None}, "regularizer": None,
        "name": "mixture-OPD", "filter_unsubmitted": False, "normalization": "token_mean", "ratio_clip": None}

Every part of :mod:`unipost.objective` is a frozen dataclass, written as its class name and its
constructor arguments. A user's own part is written as ``"module:QualName"`` when it is a dataclass that
``module`` exports (rebuilt by importing it); anything else (a lambda as a schedule, a class defined in
``__main__``) is written as ``{"unsaved": ..., "repr": ...}``: the record stays honest, and rebuilding
refuses, naming the part, instead of substituting something else.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from pathlib import PurePath
from typing import Any

from unipost.objective.labels import OwnSamples, TeacherLabels
from unipost.objective.recipe import Recipe, RecipeError
from unipost.objective.regularizers import EntropyBonus, KLToReference, RegularizerSum
from unipost.objective.rollouts import OfflineData, PrefixSwitch, StudentRollout, TeacherRollout, TurnMixture
from unipost.objective.schedules import (
    Constant,
    Cosine,
    FixedPrefix,
    LinearDecay,
    ShiftingPrefix,
    UniformPrefix,
)
from unipost.objective.scores import GroupAdvantage, Product, SuccessFilter, TeacherLogRatio, Uniform

# The parts a spec names by class name alone (a test checks every part unipost.objective exports is here).
PARTS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        TeacherRollout,
        StudentRollout,
        TurnMixture,
        PrefixSwitch,
        OfflineData,
        TeacherLabels,
        OwnSamples,
        Uniform,
        SuccessFilter,
        GroupAdvantage,
        TeacherLogRatio,
        Product,
        KLToReference,
        EntropyBonus,
        RegularizerSum,
        Constant,
        LinearDecay,
        Cosine,
        FixedPrefix,
        UniformPrefix,
        ShiftingPrefix,
    )
}

_RECIPE_FIELDS = ("rollout", "labels", "score", "regularizer")
_RECIPE_OPTIONS = ("name", "filter_unsubmitted", "normalization", "ratio_clip")


def recipe_to_spec(recipe: Recipe) -> dict[str, Any]:
    """The recipe's composition as JSON-able data (parts, their arguments, the recipe's options)."""
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe_to_spec needs a Recipe, got {recipe!r}")
    spec = {f: _part_to_spec(getattr(recipe, f), f"recipe.{f}") for f in _RECIPE_FIELDS}
    spec.update({f: getattr(recipe, f) for f in _RECIPE_OPTIONS})
    return spec


def unsaved_parts(spec: Any, where: str = "recipe") -> list[str]:
    """``"where: repr (why)"`` for every part of ``spec`` that was not serialisable (empty: it rebuilds)."""
    if isinstance(spec, dict):
        if "unsaved" in spec:
            return [f"{where} = {spec.get('repr')} ({spec['unsaved']})"]
        return [u for k, v in spec.items() if k != "part" for u in unsaved_parts(v, f"{where}.{k}")]
    if isinstance(spec, list):
        return [u for i, v in enumerate(spec) for u in unsaved_parts(v, f"{where}[{i}]")]
    return []


def recipe_from_spec(spec: dict[str, Any]) -> Recipe:
    """Rebuild the recipe :func:`recipe_to_spec` wrote; refuses, naming the part, if one was not saved."""
    if not isinstance(spec, dict) or not set(_RECIPE_FIELDS[:2]) <= set(spec):
        raise RecipeError(f"a recipe spec is a dict with rollout, labels, score, regularizer; got {spec!r}")
    missing = unsaved_parts(spec)
    if missing:
        raise RecipeError(
            "this recipe was recorded but cannot be rebuilt from JSON: "
            + "; ".join(missing)
            + ". Build it in code and pass it (Trainer(config, recipe=...), or an experiment file's recipe())"
        )
    unknown = set(spec) - set(_RECIPE_FIELDS) - set(_RECIPE_OPTIONS)
    if unknown:
        raise RecipeError(f"recipe spec has unknown keys {sorted(unknown)}")
    parts = {f: _part_from_spec(spec.get(f), f"recipe.{f}") for f in _RECIPE_FIELDS if f in spec}
    options = {f: spec[f] for f in _RECIPE_OPTIONS if f in spec}
    return Recipe(**parts, **options)


def _part_to_spec(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_part_to_spec(v, f"{where}[{i}]") for i, v in enumerate(value)]
    cls = type(value)
    if not dataclasses.is_dataclass(value):
        return _unsaved(value, "not a dataclass: its arguments cannot be recorded")
    if PARTS.get(cls.__name__) is cls:
        name = cls.__name__
    else:
        name = f"{cls.__module__}:{cls.__qualname__}"
        if _import_part(name) is not cls:
            return _unsaved(value, f"{name} cannot be imported again (define it in an importable module)")
    args = {
        f.name: _part_to_spec(getattr(value, f.name), f"{where}.{f.name}")
        for f in dataclasses.fields(value)
        if f.init
    }
    return {"part": name, **args}


def _unsaved(value: Any, why: str) -> dict[str, str]:
    return {"unsaved": why, "repr": repr(value)}


def _import_part(name: str) -> type | None:
    module, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for attr in qualname.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def _part_from_spec(spec: Any, where: str) -> Any:
    if isinstance(spec, list):
        return [_part_from_spec(v, f"{where}[{i}]") for i, v in enumerate(spec)]
    if not isinstance(spec, dict):
        return spec
    name = spec.get("part")
    if not isinstance(name, str):
        raise RecipeError(f"recipe spec {where}: a part is a dict with 'part' (its class name); got {spec!r}")
    cls = PARTS.get(name) or (_import_part(name) if ":" in name else None)
    if cls is None or not dataclasses.is_dataclass(cls):
        close = difflib.get_close_matches(name, list(PARTS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(PARTS))}"
        raise RecipeError(
            f"recipe spec {where}: unknown part {name!r}; {hint} (or 'module:Class' of an importable "
            "dataclass)"
        )
    kwargs = {k: _part_from_spec(v, f"{where}.{k}") for k, v in spec.items() if k != "part"}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise RecipeError(f"recipe spec {where}: {name}({kwargs}) failed: {exc}") from exc
