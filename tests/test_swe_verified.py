"""SWE-bench Verified (unipost.envs.swe.verified, unipost.train.swe_verified, `unipost eval-swebench`).

No Docker engine, ``docker`` package or ``swebench`` exists here, so the run stops at that boundary
with an error naming what is missing; everything before it (instance selection, the eval config's
instance mapping, loading a trained run's checkpoint without a teacher and without touching its
config.json) and after it (patches from trajectories, the resolve rate and its interval from a
harness report) is tested on real objects.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
from factories import tiny_train_config
from typer.testing import CliRunner

from unipost._optional import OptionalDependencyError, available
from unipost.cli import app
from unipost.data import Outcome, Trajectory
from unipost.envs.registry import make_env_factory
from unipost.envs.swe import (
    DockerSWEEnv,
    DockerUnavailableError,
    load_instances,
    select_instances,
)
from unipost.envs.swe.verified import patches_from
from unipost.eval.evaluate import wilson_interval
from unipost.train.config import TrainConfig
from unipost.train.swe_verified import eval_config, evaluate_run, load_for_eval, summarise

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "swe"
INSTANCES = FIXTURES / "instances.jsonl"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("unipost-cache"))


@pytest.fixture(scope="module")
def instances():
    return load_instances(INSTANCES)


def _with_matplotlib(instances):
    mpl = replace(instances[1], instance_id="matplotlib__matplotlib-1", repo="matplotlib/matplotlib")
    return [instances[0], mpl, *instances[1:]]


def test_selection_excludes_matplotlib_and_honours_ids_and_limit(instances):
    pool = _with_matplotlib(instances)
    ids = [i.instance_id for i in instances]
    assert [i.instance_id for i in select_instances(pool)] == ids  # the paper's default exclusion
    assert len(select_instances(pool, exclude_repos=())) == 4
    assert [i.instance_id for i in select_instances(pool, limit=2)] == ids[:2]
    subset = select_instances(pool, instance_ids=[ids[2], ids[0]])
    assert [i.instance_id for i in subset] == [ids[0], ids[2]]  # file order, as the split file keeps it
    with pytest.raises(ValueError, match="not in the instances file"):
        select_instances(pool, instance_ids=["nope__nope-1"])
    with pytest.raises(ValueError, match="excluded repos"):
        select_instances(pool, instance_ids=["matplotlib__matplotlib-1"])
    with pytest.raises(ValueError, match="no instances left"):
        select_instances(
            pool,
            exclude_repos=("unipost-fixtures/tinycalc", "unipost-fixtures/strkit", "matplotlib/matplotlib"),
        )
    with pytest.raises(TypeError, match="not one string"):
        select_instances(pool, exclude_repos="matplotlib/matplotlib")


def test_eval_config_holds_out_exactly_the_selected_instances(instances, tmp_path):
    selected = select_instances(instances, instance_ids=[instances[0].instance_id, instances[2].instance_id])
    ids = [i.instance_id for i in selected]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ids, "heldout": ids}))
    trained = TrainConfig(env={"name": "swe", "tasks_path": str(INSTANCES), "image_scheme": "swegym"})
    config = eval_config(trained, tmp_path / "run", INSTANCES, split, len(ids))
    assert (config.env.name, config.env.swe_grading, config.env.heldout_tasks) == ("swe", "none", 2)
    assert config.env.image_scheme == "swebench"  # Verified's images, not the SWE-Gym ones it trained on
    assert config.run_dir == tmp_path / "run"
    make = make_env_factory(config.env)
    envs = [make(("heldout", k)) for k in range(2)]
    assert all(isinstance(e, DockerSWEEnv) and e.grading is None for e in envs)  # the harness grades
    assert [e.instance.instance_id for e in envs] == ids
    assert make(("train", 1)).instance.instance_id == ids[1]  # the Trainer's start-up check finds a task


def _trajectory(task_id: str, detail: str, env_error: str | None = None) -> Trajectory:
    return Trajectory(
        task_id=task_id, prompt=[], outcome=Outcome(detail=detail), meta={"env_error": env_error}
    )


def test_patches_from_trajectories_strip_engine_errors():
    diff = "diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n"
    trajs = [
        _trajectory("a__a-1", diff),
        _trajectory(
            "b__b-2", f"environment error (step 3: TimeoutError: x); {diff}", "step 3: TimeoutError: x"
        ),
        _trajectory(
            "c__c-3",
            "environment error (verify: RuntimeError: gone); verification failed",
            "verify: RuntimeError: gone",
        ),
        _trajectory("d__d-4", ""),
    ]
    assert patches_from(trajs) == {"a__a-1": diff, "b__b-2": diff, "c__c-3": "", "d__d-4": ""}


def test_resolve_rate_is_over_all_selected_instances(instances):
    patches = {
        instances[0].instance_id: instances[0].patch,
        instances[1].instance_id: "",
        instances[2].instance_id: "x",
    }
    report = {"resolved_ids": [instances[0].instance_id, "other__other-9"], "unresolved_ids": []}
    result = summarise(
        instances, patches, report, agent_submission_rate=0.5, excluded_repos=["matplotlib/matplotlib"]
    )
    assert (result.n, result.resolved, result.empty_patches) == (3, 1, 1)
    assert result.resolve_rate == pytest.approx(1 / 3)
    assert result.resolve_ci == wilson_interval(1, 3)
    assert "resolved 1/3 = 33.3%" in result.summary()
    with pytest.raises(ValueError, match="resolved_ids"):
        summarise(instances, patches, {"error": "boom"})


def _boundary_error():
    return DockerUnavailableError if available("docker") else OptionalDependencyError


def test_evaluate_run_checks_inputs_then_stops_at_the_docker_boundary(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        evaluate_run(tmp_path / "missing", INSTANCES, out)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(TrainConfig().to_json())
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        evaluate_run(run, INSTANCES, out)
    (run / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="no instances left"):
        evaluate_run(run, INSTANCES, out, instance_ids=[], limit=None)
    with pytest.raises(_boundary_error()) as info:
        evaluate_run(run, INSTANCES, out, limit=2)
    assert "Docker engine" in str(info.value) or "'docker'" in str(info.value)
    assert not out.exists()  # nothing was started before the check

    result = CliRunner().invoke(
        app, ["eval-swebench", str(run), "--instances", str(INSTANCES), "--out", str(out), "--limit", "1"]
    )
    assert result.exit_code != 0 and isinstance(result.exception, _boundary_error())

    spec = importlib.util.spec_from_file_location(
        "paper_eval", ROOT / "experiments" / "paper_eval_swebench_verified.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(_boundary_error()):
        script.main([str(run), "--instances", str(INSTANCES), "--out", str(out), "--limit", "1"])


def test_a_trained_run_loads_for_evaluation_without_teacher_or_config_change(tmp_path, cache_dir):
    """The checkpoint loading evaluate_run does (here on the run's own embedded env: a SWE env needs Docker
    at the Trainer's start-up check)."""
    from unipost.train.trainer import Trainer

    config = tiny_train_config(tmp_path, cache_dir, "dagger", iterations=1)
    Trainer(config).fit()
    run = config.run_dir
    before = (run / "config.json").read_bytes()
    changed = config.replace(env=config.env.model_copy(update={"heldout_tasks": 1}))
    trainer = load_for_eval(run, changed)
    assert trainer.start_iteration == 1 and trainer.teacher_policy is None and trainer.teacher_model is None
    assert not trainer.student.training
    assert (run / "config.json").read_bytes() == before
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.json").write_text(config.to_json())
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        load_for_eval(empty, config)
