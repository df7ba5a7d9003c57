"""Environment workers as Ray actors (local Ray, 2 CPUs) give the trajectories of in-process envs.

The real embedded mini-SWE environments run inside two Ray host actors; the unchanged RolloutEngine
drives them through :class:`RemoteEnv` proxies and the scripted expert runs next to each env
(:class:`RemoteExpert`). For the same tasks and seed the trajectories (prompt, every action, label,
observation) and outcomes must equal those of in-process environments, and the driver's store holds
each finished trajectory once. ``ray.init(local_mode=True)`` is deprecated in Ray 2.x, so this starts
a real local Ray with ``num_cpus=2``. Needs ``ray`` (``pip install 'unipost[ray]'``; skipped
otherwise) and bubblewrap for the env's sandbox. Marked slow (a local Ray start is ~12 s, the file
~50 s on 2 cores): ``pytest -m slow tests/test_ray_envs.py``, or the opt-in CI job
scripts/ci-optional/30-ray.sh.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="ray is optional: pip install 'unipost[ray]'")

from unipost.envs.embedded import bwrap_available  # noqa: E402
from unipost.envs.embedded.expert import ScriptedExpert  # noqa: E402
from unipost.objective import SFT  # noqa: E402
from unipost.rollout.engine import RolloutEngine  # noqa: E402
from unipost.rollout.ray_envs import RayEnvPool, RemoteExpert  # noqa: E402
from unipost.rollout.store import TrajectoryStore  # noqa: E402
from unipost.train.setup import env_factory  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not bwrap_available(), reason="the embedded env needs bubblewrap"),
    pytest.mark.slow,  # ~50 s with a local Ray start; run by scripts/ci-optional/30-ray.sh
]

TASKS = [("train", 0), ("train", 3), ("train", 5)]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def comparable(trajectory) -> dict:
    data = trajectory.model_dump(mode="json")
    data["meta"].pop("protocol", None)  # same protocol; repr only
    return data


def collect(factory, teacher, recipe, store=None):
    engine = RolloutEngine(
        factory, student=None, teacher=teacher, recipe=recipe, max_turns=12, concurrency=3, progress=False
    )
    return engine.collect(TASKS, iteration=0, store=store)


def test_remote_episodes_equal_in_process(local_ray, tmp_path):
    make_env = env_factory("easy", 600)
    recipe = SFT(rejection_sampling=False)
    local = collect(make_env, ScriptedExpert(), recipe)
    store = TrajectoryStore(tmp_path / "trajectories.jsonl")
    with RayEnvPool(make_env, num_workers=2, max_concurrency=4, num_cpus=0.5) as pool:
        remote = collect(pool.factory, RemoteExpert(), recipe, store=store)
        assert sum(ray.get([actor.live.remote() for actor in pool.actors])) == 0  # all envs closed
        assert pool._live == [0, 0]
    assert [t.outcome.resolved for t in local.trajectories] == [True, True, True]  # the expert solves them
    assert [comparable(t) for t in remote.trajectories] == [comparable(t) for t in local.trajectories]
    stored = store.load().trajectories
    assert sorted(t.task_id for t in stored) == sorted(t.task_id for t in local.trajectories)
    assert remote.stats.env_steps == local.stats.env_steps > 3 * 3


def test_env_errors_inside_actors_end_only_that_episode(local_ray):
    def flaky(task):
        if task == ("train", 3):
            raise RuntimeError("image pull failed")
        return env_factory("easy", 600)(task)

    with RayEnvPool(flaky, num_workers=1, max_concurrency=3, num_cpus=0.5) as pool:
        batch = collect(pool.factory, RemoteExpert(), SFT(rejection_sampling=False))
        assert pool._live == [0]
    errors = [t.meta["env_error"] for t in batch.trajectories]
    assert errors[0] is None and errors[2] is None
    assert "image pull failed" in errors[1]
    assert batch.trajectories[0].outcome.resolved and not batch.trajectories[1].outcome.resolved


def test_bad_arguments_say_what_is_wrong(local_ray):
    with pytest.raises(ValueError, match="num_workers must be an integer >= 1"):
        RayEnvPool(env_factory("easy", 600), num_workers=0)
    with pytest.raises(TypeError, match="env_factory must be callable"):
        RayEnvPool("not a factory")
    from unipost.rollout.policy import AgentState

    with pytest.raises(TypeError, match="RemoteEnv from a RayEnvPool"):
        RemoteExpert().act([AgentState([], [], env=object())])


def test_trainer_with_ray_env_workers_equals_in_process(local_ray, tmp_path):
    """The docs/scaling.md recipe: Trainer(env_factory=pool.factory, teacher_policy=RemoteExpert())
    trains on the same trajectories, to the same weights (atol 1e-6), as the in-process Trainer."""
    from factories import session_cache, tiny_train_config

    from unipost.train.trainer import Trainer

    def config(name):
        base = tiny_train_config(tmp_path, session_cache(), "sft", iterations=1)
        return base.replace(name=name, recipe_kwargs={"rejection_sampling": False})

    local = Trainer(config("local"))
    local.fit()
    with RayEnvPool(env_factory("easy", 600), num_workers=2, max_concurrency=4, num_cpus=0.5) as pool:
        remote = Trainer(config("remote"), env_factory=pool.factory, teacher_policy=RemoteExpert())
        remote.fit()
    pairs = zip(local.student.parameters(), remote.student.parameters(), strict=True)
    assert max((a - b).abs().max().item() for a, b in pairs) <= 1e-6
    turns = [t.turns for t in local.store.load().trajectories]
    assert turns and [t.turns for t in remote.store.load().trajectories] == turns
